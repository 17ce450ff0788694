"""Speculative decoding: propose several tokens cheaply, verify them in one forward pass, keep the agreed prefix.

A batch-1 decode step reads every weight to produce *one* token; reading them to score ``k + 1``
tokens costs about the same (the step is bound by weight reads or per-call overhead, not by the
arithmetic). So a step that feeds the last sampled token plus ``k`` *proposed* tokens gets the
model's distribution after each of them, and keeps every proposed token the model agrees with plus
one token of its own: between 1 and ``k + 1`` tokens per forward pass, never fewer than plain decoding.

**Proposers** (per request, inside continuous batching; :class:`Speculator` picks one):

* *prompt lookup* (:func:`prompt_lookup`): find the latest earlier occurrence of the last ``n``
  tokens (``n`` = 3, 2, 1) in the prompt and the text so far, and propose what followed it. No
  second model; it wins where output copies input (code edits, quoting, repetitive structure).
* *a draft model* (:class:`DraftModel`): a smaller model with the same tokenizer proposes ``k``
  tokens, one forward pass each. Here the draft runs its plain forward on the recent context (no
  KV cache of its own), which is right for small drafts and says what its cost is.

**Verification keeps the output distribution exact** (:func:`verify`, Leviathan et al. 2023 /
Chen et al. 2023). With ``p`` the target's probabilities at a row (after temperature, top-k and
top-p, as plain sampling computes them) and ``q`` the proposer's (one-hot for prompt lookup), a
proposed token ``x`` is accepted with probability ``min(1, p(x) / q(x))``; on the first rejection
the token is drawn from the residual ``max(p - q, 0)`` renormalised and the rest is dropped; if
all ``k`` are accepted one more token is drawn from the last row's ``p``. The emitted tokens then
have exactly the distribution of plain sampling. Greedy is the special case ``p`` = one-hot of the
argmax: a proposed token is kept iff it is the argmax, so the output is token for token plain
greedy decoding (up to the float rounding a different row count can cause in a BLAS product, the
same caveat as batching: :mod:`lmcore.engine.engine`). Every uniform comes from the request's own
stream, so a seeded request is reproducible alone or batched.

**The KV cache rolls back for free**: the verify step writes keys and values at every fed
position, and the sequence's computed count then advances only past the kept ones
(:meth:`lmcore.engine.scheduler.Scheduler.accept`). Attention never reads past a row's own
position, so the stale entries are invisible until the next step overwrites them; the prefix cache
stores prompt blocks only, never generated (let alone rejected) tokens.

**When it is on** (``EngineConfig.speculation``, per request ``SamplingParams.speculation``):
``"auto"`` uses prompt lookup for greedy requests without penalties (identical output by
construction, and a proposal is made only when an n-gram matches, so text that never repeats costs
nothing); sampled requests decode plainly unless they ask (their seeded streams then change: the
same distribution, different draws). The inference service's default is ``"auto"``; a bare
``Engine`` defaults to ``"off"`` (one token per request per step, what library callers and their
step-counting code expect). Requests with repetition/presence/frequency penalties or structured
output (:mod:`lmcore.engine.constraints`) never speculate: their penalty state and grammar matcher
advance token by token.
"""

from __future__ import annotations

import torch

from .sampling import SamplingParams, logits_to_probs, sample_from_probs, top_logprobs
from .scheduler import SchedulerOutput, VerifyChunk

SPECULATION_MODES = ("auto", "off", "prompt_lookup", "draft")
MAX_SPECULATIVE_TOKENS = 16


def prompt_lookup(tokens: list[int], k: int, max_ngram: int = 3, min_ngram: int = 1) -> list[int]:
    """Up to ``k`` tokens that followed the latest earlier occurrence of the longest matching suffix
    n-gram of ``tokens`` (prompt + output so far), or ``[]`` when no n-gram matches."""
    L = len(tokens)
    for n in range(min(max_ngram, L - 1), min_ngram - 1, -1):
        tail = tokens[L - n:]
        first = tail[0]
        # the latest start i < L - n with tokens[i:i+n] == tail, searched right to left
        i = L - n - 1
        while i >= 0:
            if tokens[i] == first and tokens[i:i + n] == tail:
                follow = tokens[i + n:i + n + k]
                if follow:
                    return follow
            i -= 1
    return []


def _probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Rows of sampling probabilities, exactly as plain sampling computes them, normalised."""
    n = logits.size(0)
    probs = logits_to_probs(
        logits, torch.full((n,), params.temperature, device=logits.device),
        torch.full((n,), params.top_k, device=logits.device, dtype=torch.long) if params.top_k else None,
        torch.full((n,), params.top_p, device=logits.device) if params.top_p < 1.0 else None,
        k_max=params.top_k)
    return probs / probs.sum(-1, keepdim=True)


def _draw(probs: torch.Tensor, rng) -> int:
    """One inverse-CDF draw from a probability row with one uniform of the request's stream."""
    return int(sample_from_probs(probs[None], torch.tensor([rng.random()], dtype=probs.dtype))[0])


def verify(logits: torch.Tensor, draft: list[int], draft_probs: torch.Tensor | None, params: SamplingParams,
           rng) -> list[int]:
    """The tokens a verify step emits: the accepted prefix of ``draft`` plus one token.

    ``logits`` ``(k + 1, V)``: the target's raw logits after the last sampled token and after each
    draft token; ``draft_probs`` ``(k, V)`` the proposer's distributions (None: point proposals).
    """
    k = len(draft)
    if params.greedy:
        best = logits.argmax(-1).tolist()  # first maximum on ties, as plain greedy decoding
        n = 0
        while n < k and draft[n] == best[n]:
            n += 1
        return draft[:n] + [best[n]]
    p = _probs(logits, params)  # (k + 1, V)
    idx = torch.tensor(draft, device=p.device)
    p_x = p[:k].gather(1, idx[:, None]).squeeze(1).tolist()  # p(x_j) at each row: one host sync
    q_x = [1.0] * k if draft_probs is None else draft_probs.gather(1, idx[:, None]).squeeze(1).tolist()
    for j in range(k):
        if rng.random() * q_x[j] < p_x[j]:  # accept with probability min(1, p/q)
            continue
        residual = p[j].clone()
        if draft_probs is None:
            residual[draft[j]] = 0.0  # max(p - onehot, 0): p with the rejected token removed
        else:
            residual = (residual - draft_probs[j]).clamp_(min=0.0)
        if float(residual.sum()) <= 0.0:  # p == q up to rounding: any draw from p is exact
            residual = p[j]
        return draft[:j] + [_draw(residual, rng)]
    return draft + [_draw(p[k], rng)]


class DraftModel:
    """A smaller model with the target's vocabulary proposing ``k`` tokens, one forward each."""

    def __init__(self, model, vocab_size: int):
        if model.config.vocab_size != vocab_size:
            raise ValueError(f"the draft model's vocabulary ({model.config.vocab_size}) differs from the "
                             f"target's ({vocab_size}): a draft must share the target's tokenizer")
        self.model = model.eval()
        self.context = model.config.block_size

    @torch.inference_mode()
    def propose(self, tokens: list[int], k: int, params: SamplingParams, rng) -> tuple[list[int], torch.Tensor | None]:
        ctx = list(tokens[-(self.context - k):])
        out: list[int] = []
        qs = []
        for _ in range(k):
            logits = self.model(torch.tensor([ctx], device=self.model.device))[0, -1:].float()  # (1, V)
            if params.greedy:
                tok = int(logits.argmax(-1))
            else:
                q = _probs(logits, params)[0]
                tok = _draw(q, rng)
                qs.append(q)
            out.append(tok)
            ctx.append(tok)
        return out, (torch.stack(qs) if qs else None)


class Speculator:
    """The engine's speculation policy and bookkeeping: who speculates this step, with how many
    tokens, from which proposer; verification; proposed/accepted counts for the stats."""

    def __init__(self, mode: str, k: int, max_seq_len: int, draft: DraftModel | None = None):
        if mode not in SPECULATION_MODES:
            raise ValueError(f"speculation must be one of {list(SPECULATION_MODES)}, got {mode!r}")
        if mode == "draft" and draft is None:
            raise ValueError("speculation='draft' needs a draft model (EngineConfig.draft_model)")
        if not 1 <= k <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"speculative_tokens must be in [1, {MAX_SPECULATIVE_TOKENS}], got {k}")
        self.mode, self.k, self.max_seq_len, self.draft = mode, k, max_seq_len, draft
        self.proposed = 0  # draft tokens fed to verify steps
        self.accepted = 0  # of those, kept
        self.steps = 0  # verify steps run

    def check(self, params: SamplingParams) -> None:
        """The request-level rule (Engine.check_request runs it)."""
        if params.speculation == "draft" and self.draft is None:
            raise ValueError("speculation 'draft' was asked for, but this engine has no draft model")

    def mode_for(self, params: SamplingParams) -> str | None:
        mode = params.speculation or self.mode
        if mode == "off" or params.uses_penalties or params.constrained:
            return None
        if mode == "auto":
            return "prompt_lookup" if params.greedy else None
        return mode

    def propose(self, plan: SchedulerOutput, params: dict[str, SamplingParams], rngs: dict) -> None:
        """Move the decode sequences that get a proposal this step into ``plan.verify``."""
        keep = []
        for seq in plan.decode:
            p = params[seq.request_id]
            mode = self.mode_for(p)
            # room: the tokens it may still emit (one comes from the verify itself) and the cache
            room = min(p.speculative_tokens or self.k, seq.max_tokens - len(seq.output_ids) - 1,
                       self.max_seq_len - seq.num_computed - 1)
            draft, probs = [], None
            if mode is not None and room > 0:
                tokens = seq.prompt_ids + seq.output_ids
                if mode == "prompt_lookup":
                    draft = prompt_lookup(tokens, room)
                else:
                    draft, probs = self.draft.propose(tokens, room, p, rngs[seq.request_id])
            if draft:
                plan.verify.append(VerifyChunk(seq, draft, probs))
            else:
                keep.append(seq)
        plan.decode = keep

    def restore(self, plan: SchedulerOutput) -> None:
        """Undo :meth:`propose` (a failed step is re-run one request at a time, plainly)."""
        if plan.verify:
            plan.decode = sorted(plan.decode + [v.seq for v in plan.verify], key=lambda s: s.slot)
            plan.verify = []

    def verify(self, chunk: VerifyChunk, logits: torch.Tensor, params: SamplingParams, rng):
        """``(tokens, logprobs)`` a verify step emits for ``chunk`` (logprobs: ``(chosen, values,
        ids)`` lists per token when the request asked for them, else None)."""
        tokens = verify(logits, chunk.draft, chunk.draft_probs, params, rng)
        self.steps += 1
        self.proposed += len(chunk.draft)
        self.accepted += len(tokens) - 1
        lp = None
        if params.logprobs:
            rows = logits[:len(tokens)]
            chosen, values, ids = top_logprobs(rows, torch.tensor(tokens, device=rows.device), params.logprobs)
            lp = (chosen.tolist(), values.tolist(), ids.tolist())
        return tokens, lp
