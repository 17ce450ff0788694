"""Prompt log-probabilities: how likely the model found every token of the prompt (``echo`` + ``logprobs``).

Evaluation harnesses score a text by asking a server to *echo* it with log-probabilities
(lm-evaluation-harness's ``local-completions``): ``log P(prompt_t | prompt_<t)`` for every prompt
token. The prefill a request runs anyway already computes a hidden state at every prompt position,
and position ``t-1``'s hidden state is what predicts token ``t``; so the figures cost one
projection onto the vocabulary for those rows, in the same step, and no second forward pass.

What is needed for that:

* every prompt position must be *computed*, so a request asking for prompt log-probabilities does
  not reuse cached prefix blocks (:meth:`PromptLogprobs.wants_all_positions`; the engine's prefix
  matcher asks it);
* each prefill chunk ``[start, end)`` of such a request projects its rows ``start .. end-1`` that
  predict a prompt token (position ``p`` predicts ``p + 1 < len(prompt)``; the last prompt
  position predicts the first *generated* token, whose figure the sampler reports as usual), at
  most ``chunk_rows`` rows at a time, so memory is ``chunk_rows x vocab`` whatever the prompt;
* the chunks' figures are gathered per request and handed out with its first generated token.

The result is vLLM's shape: one entry per prompt token, ``None`` for the first (nothing precedes
it), then a :class:`~lmcore.engine.sampling.TokenLogprob` with the ``n`` most likely alternatives
(``SamplingParams.prompt_logprobs = n``; 0: the token's own figure only). Figures are of the raw
model distribution (``log_softmax`` of the logits, no temperature or penalties), as those of
generated tokens are, and equal :func:`lmcore.tasks.score`'s for the same tokens.
"""

from __future__ import annotations

import torch

from .sampling import SamplingParams, TokenLogprob
from .scheduler import SchedulerOutput

CHUNK_ROWS = 64  # prompt rows projected onto the vocabulary at once (64 x 50k fp32 = 13 MB)


def wanted_rows(out: SchedulerOutput, params: dict[str, SamplingParams]) -> list[tuple[str, int, int, int]]:
    """``(request_id, first flat row, first position, rows)`` for the step's prefill chunks whose
    request asked for prompt log-probabilities. The flat layout is the runner's: decode rows first,
    then each prefill chunk's tokens in order."""
    found = []
    row = len(out.decode)
    for chunk in out.prefill:
        seq = chunk.seq
        n = chunk.end - chunk.start
        if params[seq.request_id].prompt_logprobs is not None:
            useful = min(chunk.end, seq.prompt_len - 1) - chunk.start  # rows predicting a prompt token
            if useful > 0:
                found.append((seq.request_id, row, chunk.start, useful))
        row += n
    return found


@torch.inference_mode()
def compute(project, hidden: torch.Tensor, out: SchedulerOutput, params: dict[str, SamplingParams],
            chunk_rows: int = CHUNK_ROWS) -> dict[str, tuple[int, list[TokenLogprob]]]:
    """The prompt figures of this step: ``{request_id: (first position predicted, entries)}``.

    ``project`` maps hidden states ``(R, C)`` to logits ``(R, V)`` (the runner's head), ``hidden``
    is the step's ``(N, C)`` final hidden states in the flat layout."""
    results: dict[str, tuple[int, list[TokenLogprob]]] = {}
    for rid, row, start, n in wanted_rows(out, params):
        seq_params = params[rid]
        top_n = seq_params.prompt_logprobs
        prompt = _prompt_of(out, rid)
        targets = torch.tensor(prompt[start + 1:start + 1 + n], device=hidden.device)  # (n,)
        entries: list[TokenLogprob] = []
        for i in range(0, n, chunk_rows):
            h = hidden[row + i:row + min(n, i + chunk_rows)]  # (r, C)
            logp = torch.log_softmax(project(h).float(), dim=-1)  # (r, V)
            tgt = targets[i:i + h.size(0)]
            chosen = logp.gather(-1, tgt[:, None]).squeeze(-1).tolist()
            if top_n:
                values, ids = torch.topk(logp, top_n, dim=-1)
                values, ids = values.tolist(), ids.tolist()
            else:
                values = ids = [[] for _ in chosen]
            entries += [TokenLogprob(int(t), lp, list(zip(ti, tv)))
                        for t, lp, ti, tv in zip(tgt.tolist(), chosen, ids, values)]
        results[rid] = (start + 1, entries)
    return results


def _prompt_of(out: SchedulerOutput, rid: str) -> list[int]:
    return next(c.seq.prompt_ids for c in out.prefill if c.seq.request_id == rid)


class PromptLogprobs:
    """The engine's per-request accumulator: chunks' figures in, the whole list out with the first
    generated token."""

    def __init__(self):
        self._pending: dict[str, list[TokenLogprob | None]] = {}

    @staticmethod
    def wants_all_positions(params: SamplingParams) -> bool:
        """Whether a request must compute every prompt position (no prefix-cache reuse)."""
        return params.prompt_logprobs is not None

    def start(self, request_id: str, params: SamplingParams) -> None:
        if params.prompt_logprobs is not None:
            self._pending[request_id] = [None]  # the first prompt token has nothing before it

    def add(self, step_results: dict[str, tuple[int, list[TokenLogprob]]]) -> None:
        for rid, (first, entries) in step_results.items():
            acc = self._pending.get(rid)
            if acc is not None:
                del acc[first:]  # a chunk recomputed after a failed step replaces its own figures
                acc.extend(entries)

    def take(self, request_id: str) -> list[TokenLogprob | None] | None:
        """The request's figures (once its prompt is computed), or None when it asked for none."""
        return self._pending.pop(request_id, None)

    def drop(self, request_id: str) -> None:
        self._pending.pop(request_id, None)
