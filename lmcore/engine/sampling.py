"""Sampling: from next-token logits to a chosen token, for a whole batch at once.

A language model outputs **logits**: one unnormalised score per vocabulary entry. Decoding picks the
next token from them. This module holds the request's knobs (:class:`SamplingParams`) and the small
pure functions that turn a batch of logit rows into token ids, in the order they are applied::

    logits -> apply_penalties -> (temperature, top-k, top-p) logits_to_probs -> sample_from_probs

Each row carries its own parameters (a batch mixes greedy and sampled requests), passed as tensors
so nothing loops over the batch in Python.

**Reproducibility.** A seeded request owns its random stream: a ``random.Random(seed)`` on the host
that draws exactly one uniform number per generated token. The token is chosen by inverse-CDF
sampling (the first token whose cumulative probability exceeds that number), so the choice depends
only on the request's own probabilities and its own stream, never on which other requests share
the batch or in which order they were drawn. vLLM's users report the opposite (vLLM issues #17524,
#51226) because a shared device generator is consumed by the whole batch. The remaining source of
divergence is the logits themselves; see :mod:`lmcore.engine` ("Batch invariance").
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .constraints import CONSTRAINT_KINDS, MAX_CHOICE_CHARS, MAX_CHOICES, MAX_CONSTRAINT_CHARS

MAX_STOP_STRINGS = 8
MAX_STOP_LENGTH = 256  # characters per stop string (matching holds back up to this much text)
MAX_LOGPROBS = 20
# Bounds that keep every logit finite: dividing fp32 logits by 1e-38 (or multiplying them by 1e38)
# overflows to +-inf and softmax turns that into NaN. Below MIN_TEMPERATURE use 0 (greedy).
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 100.0
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 100.0


class SamplingParams(BaseModel):
    """How to pick tokens for one request. Validated on construction; errors name the field."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    max_tokens: int = Field(16, ge=0, description="most tokens to generate; 0 only with prompt_logprobs "
                                                  "(score the prompt, generate nothing)")
    temperature: float = Field(1.0, ge=0.0, le=MAX_TEMPERATURE,
                               description=f"0 = greedy (argmax), else in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}]")
    top_k: int = Field(0, ge=0, description="keep only the k most likely tokens; 0 = off")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus: smallest set with this mass")
    repetition_penalty: float = Field(1.0, ge=MIN_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY,
                                      description="CTRL/HF penalty on seen tokens; 1 = off")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="OpenAI: minus this if generated")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="OpenAI: minus this x count")
    seed: int | None = Field(None, description="seed of this request's own random stream")
    stop: list[str] = Field(default_factory=list, description="stop strings, matched on text")
    logprobs: int = Field(0, ge=0, le=MAX_LOGPROBS, description="top-n alternatives per token; 0 = off")
    ignore_eos: bool = Field(False, description="keep generating past the end-of-text token")
    # Structured output (lmcore.engine.constraints): at most one of these. Their syntax is checked
    # here; whether the library accepts them, by Engine.check_request (it compiles them).
    json_schema: str | None = Field(None, description="a JSON Schema (text or dict) the output must follow")
    json_object: bool = Field(False, description="the output is any valid JSON object")
    regex: str | None = Field(None, description="a regular expression the whole output must match")
    grammar: str | None = Field(None, description="an EBNF/GBNF grammar (rule root) the output follows")
    choice: list[str] | None = Field(None, description="the output is exactly one of these strings")
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS,
                                        description="log-probability of every prompt token with this many "
                                                    "alternatives (lmcore.engine.prompt_logprobs); None = off")
    speculation: Literal["auto", "off", "prompt_lookup", "draft"] | None = Field(
        None, description="speculative decoding for this request (lmcore.engine.speculative); None = the engine's default")
    speculative_tokens: int | None = Field(None, ge=1, le=16, description="most tokens proposed per step; None = the engine's")

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, v):
        if v is None:
            return []
        if isinstance(v, str):  # OpenAI accepts a bare string
            return [v]
        return v

    @field_validator("temperature")
    @classmethod
    def _check_temperature(cls, v: float) -> float:
        if 0.0 < v < MIN_TEMPERATURE:
            raise ValueError(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}")
        return v

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v: list[str]) -> list[str]:
        if len(v) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(v)}")
        if any(s == "" for s in v):
            raise ValueError("stop strings must be non-empty")
        longest = max(map(len, v), default=0)
        if longest > MAX_STOP_LENGTH:
            raise ValueError(f"stop strings are at most {MAX_STOP_LENGTH} characters, got one of {longest}")
        return v

    @field_validator("json_schema", mode="before")
    @classmethod
    def _schema_text(cls, v):
        if v is None:
            return None
        if isinstance(v, str):
            if len(v) > MAX_CONSTRAINT_CHARS:
                raise ValueError(f"json_schema is {len(v)} characters, at most {MAX_CONSTRAINT_CHARS}")
            try:
                v = json.loads(v)
            except json.JSONDecodeError as e:
                raise ValueError(f"json_schema is not valid JSON: {e}") from None
        if not isinstance(v, dict | bool):
            raise ValueError(f"json_schema must be a JSON object (a schema), got {type(v).__name__}")
        return json.dumps(v)  # one text form (the compile cache's key); property order kept: it is the output's

    @field_validator("regex", "grammar")
    @classmethod
    def _check_text(cls, v, info):
        if v is not None:
            if not v:
                raise ValueError(f"{info.field_name} is empty")
            if len(v) > MAX_CONSTRAINT_CHARS:
                raise ValueError(f"{info.field_name} is {len(v)} characters, at most {MAX_CONSTRAINT_CHARS}")
        return v

    @field_validator("choice")
    @classmethod
    def _check_choice(cls, v):
        if v is None:
            return None
        if not v:
            raise ValueError("choice is empty: give at least one string")
        if len(v) > MAX_CHOICES:
            raise ValueError(f"at most {MAX_CHOICES} choices are allowed, got {len(v)}")
        if any(c == "" for c in v):
            raise ValueError("choices must be non-empty strings")
        longest = max(map(len, v))
        if longest > MAX_CHOICE_CHARS:
            raise ValueError(f"choices are at most {MAX_CHOICE_CHARS} characters, got one of {longest}")
        return v

    @model_validator(mode="after")
    def _zero_tokens_only_scores(self):
        # 0 tokens is a request that only scores its prompt (echo in OpenAI's API): without
        # prompt_logprobs it would produce nothing at all.
        if self.max_tokens == 0 and self.prompt_logprobs is None:
            raise ValueError("max_tokens must be at least 1 (0 only with prompt_logprobs, to score the prompt)")
        return self

    @model_validator(mode="after")
    def _one_constraint(self):
        given = [k for k in CONSTRAINT_KINDS if getattr(self, k) not in (None, False)]
        if len(given) > 1:
            raise ValueError(f"give at most one constraint (json_schema, json_object, regex, grammar, choice); "
                             f"got {', '.join(given)}")
        return self

    @property
    def constrained(self) -> bool:
        """Whether the output is constrained (see :mod:`lmcore.engine.constraints`)."""
        return (self.json_schema is not None or self.json_object or self.regex is not None
                or self.grammar is not None or self.choice is not None)

    def with_extra_stop(self, extra: list[str]) -> SamplingParams:
        """These parameters with ``extra`` stop strings added after the request's own (a prompt
        template's separators): the count limit applies to what the request itself asked for."""
        merged = list(self.stop) + [s for s in extra if s and s not in self.stop]
        return self.model_copy(update={"stop": merged})

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def uses_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)

    def make_rng(self) -> random.Random:
        """The request's own uniform stream (seeded, or from the OS when no seed is given)."""
        return random.Random(self.seed) if self.seed is not None else random.Random()


@dataclass
class TokenLogprob:
    """The chosen token's log-probability and the ``n`` most likely alternatives at that step.

    Log-probabilities are those of the model's own distribution (``log_softmax`` of the raw logits,
    before temperature, top-k/p and penalties), as OpenAI and vLLM report them by default.
    """

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token_id, logprob), best first


# --- the pure functions ---------------------------------------------------------------------------


def apply_penalties(
    logits: torch.Tensor,  # (B, V) float
    seen: torch.Tensor,  # (B, V) bool: token in prompt or output (repetition penalty)
    counts: torch.Tensor,  # (B, V) float: times generated so far (presence/frequency)
    repetition: torch.Tensor,  # (B,)
    presence: torch.Tensor,  # (B,)
    frequency: torch.Tensor,  # (B,)
) -> torch.Tensor:
    """HF's repetition penalty (divide positive / multiply negative logits of seen tokens), then
    OpenAI's presence and frequency penalties. Neutral rows (1, 0, 0) come out bit-identical."""
    rep = repetition[:, None]
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalised, logits)
    logits = logits - frequency[:, None] * counts
    return logits - presence[:, None] * (counts > 0).to(logits.dtype)


def logits_to_probs(
    logits: torch.Tensor,  # (B, V)
    temperature: torch.Tensor,  # (B,) > 0 for sampled rows (greedy rows are handled by the caller)
    top_k: torch.Tensor | None = None,  # (B,) long, 0 = off; None when no row uses it
    top_p: torch.Tensor | None = None,  # (B,) float, 1 = off; None when no row uses it
    k_max: int | None = None,  # the largest top_k in the batch, known on the host (avoids a device sync)
) -> torch.Tensor:
    """Temperature-scaled, top-k/top-p-filtered probabilities ``(B, V)`` (filtered entries are 0).

    Top-k keeps every token tied with the k-th (as nanoGPT does); top-p keeps the smallest set of
    most likely tokens whose mass reaches ``p`` (always at least the most likely one).
    """
    logits = logits.float() / temperature[:, None]
    if top_k is not None and k_max is None:
        k_max = int(top_k.max())
    if top_k is not None and k_max > 0:
        k_max = min(logits.size(-1), k_max)
        kth = torch.topk(logits, k_max, dim=-1).values  # (B, k_max) descending
        idx = (top_k.clamp(1, k_max) - 1)[:, None]
        threshold = kth.gather(-1, idx)  # (B, 1): the k-th largest
        threshold = torch.where(top_k[:, None] > 0, threshold, torch.full_like(threshold, -float("inf")))
        logits = logits.masked_fill(logits < threshold, -float("inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs  # mass of strictly more likely tokens
        drop_sorted = mass_before >= top_p[:, None]  # the top token has mass_before 0: always kept
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
    return probs


def sample_from_probs(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: for each row, the first token whose cumulative mass exceeds ``u * total``.

    One uniform per row, drawn from that request's own stream: the choice is a function of the row
    alone, so it cannot depend on the batch around it. Zero-probability tokens are never chosen
    (their cumulative mass equals their predecessor's, so they are never the *first* to exceed it).
    A row without a usable distribution (NaN or infinite mass, or none at all) gets ``-1``: never an
    id past the vocabulary, and never a change to any other row (each row is searched on its own).
    """
    cdf = probs.cumsum(-1)  # (B, V)
    total = cdf[:, -1:].contiguous()  # (B, 1): filtered rows need not sum to 1
    target = uniforms[:, None].to(cdf.dtype) * total  # (B, 1)
    choice = torch.searchsorted(cdf, target, right=True)  # (B, 1)
    # u rounded up to 1 in float32 would land past the end: fall back to the last token with mass
    # (the first index whose cumulative mass reaches the total).
    last = torch.searchsorted(cdf, total, right=False)
    choice = torch.minimum(choice, last).squeeze(-1)
    usable = torch.isfinite(total.squeeze(-1)) & (total.squeeze(-1) > 0)
    return torch.where(usable, choice, torch.full_like(choice, -1))


def top_logprobs(logits: torch.Tensor, chosen: torch.Tensor, n: int):
    """``(chosen_logprob (B,), top_values (B, n), top_ids (B, n))`` from raw logits ``(B, V)``."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen_lp = logp.gather(-1, chosen[:, None]).squeeze(-1)
    if n > 0:
        values, ids = torch.topk(logp, n, dim=-1)
    else:
        values = ids = None
    return chosen_lp, values, ids
