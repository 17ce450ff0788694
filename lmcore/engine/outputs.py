"""What the engine hands back: per-step :class:`StepOutput` and per-request :class:`Completion`.

Shared by the engine (which emits step outputs), the offline ``generate`` and the
:class:`~lmcore.engine.async_engine.AsyncEngine` (which fold them into completions), so none of
those imports another just for a data type.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .sampling import TokenLogprob


@dataclass
class StepOutput:
    """What one step produced for one request."""

    request_id: str
    new_token_ids: list[int]
    text: str  # the new whole characters (stop text excluded); '' without a tokenizer
    finished: bool
    finish_reason: str | None  # "length" | "eos" | "stop" when finished; "error" when it failed alone
    logprobs: list[TokenLogprob] | None  # one per new token when params.logprobs > 0
    prompt_tokens: int
    completion_tokens: int
    error: Exception | None = None  # set (with finish_reason "error") when this request failed alone
    # With params.prompt_logprobs: on the first output only, one entry per prompt token (None first).
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclass
class Completion:
    """One prompt's result."""

    token_ids: list[int]
    finish_reason: str  # "length" | "eos" | "stop"
    logprobs: list[TokenLogprob] | None = None  # per token when params.logprobs > 0
    text: str | None = None  # when a tokenizer was given (stop text excluded)
    prompt_tokens: int = 0
    request_id: str = ""
    prompt_logprobs: list[TokenLogprob | None] | None = None  # with params.prompt_logprobs
    _text_parts: list[str] = field(default_factory=list, repr=False)


def collect(outputs, completions: dict[str, Completion], with_text: bool) -> None:
    """Fold step outputs into per-request completions (shared by generate and the async engine)."""
    for out in outputs:
        c = completions.get(out.request_id)
        if c is None:
            c = completions[out.request_id] = Completion([], "", None, None, out.prompt_tokens, out.request_id)
        c.token_ids.extend(out.new_token_ids)
        if out.prompt_logprobs is not None:
            c.prompt_logprobs = out.prompt_logprobs
        if out.logprobs is not None:
            c.logprobs = (c.logprobs or []) + out.logprobs
        c._text_parts.append(out.text)
        if out.finished:
            c.finish_reason = out.finish_reason
            if with_text:
                c.text = "".join(c._text_parts)
            c._text_parts = []
