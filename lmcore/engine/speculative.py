"""Speculative decoding: propose several tokens cheaply, verify them in one forward pass, keep the agreed prefix.

A batch-1 decode step reads every weight to produce *one* token; reading them to score ``k + 1``
tokens costs about the same (the step is bound by weight reads or per-call overhead, not by the
arithmetic). So a step that feeds the last sampled token plus ``k`` *proposed* tokens gets the
model's distribution after each of them, and keeps every proposed token the model agrees with plus
one token of its own: between 1 and ``k + 1`` tokens per forward pass, never fewer than plain decoding.

**Proposers** (per request, inside continuous batching; :class:`Speculator` picks one):

* *prompt lookup* (:func:`prompt_lookup`): find the latest earlier occurrence of the last ``n``
  tokens (``n`` = 4, 3, 2, 1) in the prompt and the text so far, and propose what followed it. No
  second model; it wins where output copies input (code edits, quoting, repetitive structure).
* *a draft model* (:class:`DraftModel`): a smaller model with the same tokenizer proposes ``k``
  tokens, one cached forward step each. It keeps a KV cache of its own, one slot per engine slot,
  so a proposal costs the tokens the draft has not seen yet (the last verify step's kept ones)
  plus ``k - 1`` one-token steps, not a forward over the whole context per proposed token.

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
step-counting code expect). Requests with repetition/presence/frequency penalties never speculate:
their penalty state advances token by token.

**Structured output** (:mod:`lmcore.engine.constraints`) speculates like any request, with the
grammar in the loop: a proposal is cut at the first token the request's grammar refuses (its
matcher walks the proposal and rolls back); the verify step's logits at each position are masked
with the grammar's mask after the proposal's prefix up to there, and acceptance runs on those
masked distributions, so a constrained greedy request emits exactly its plain constrained greedy
tokens and a sampled one keeps the masked distribution. The matcher then advances by exactly the
emitted tokens. A cut point proposal (prompt lookup) stays exact as it is: the refused token has
probability 0 under the mask, so the residual there is the masked distribution itself. A cut
*sampled* draft keeps its distribution at the cut position (``draft_probs`` has one row more than
the draft): the refused token would have been rejected with certainty, so the token there is drawn
from the residual ``max(p - q, 0)``, exactly as the uncut proposal would have had it.
"""

from __future__ import annotations

import weakref
from typing import NamedTuple

import torch

from lmcore.model.kv_cache import CacheBatch, KVCache, PrefillSegment, decode_mask, segment_mask

from .sampling import SamplingParams, logits_to_probs, sample_from_probs, top_logprobs
from .scheduler import SchedulerOutput, VerifyChunk
from .weight_layout import DecodeWeights

SPECULATION_MODES = ("auto", "off", "prompt_lookup", "draft")
MAX_SPECULATIVE_TOKENS = 16
MAX_DRAFT_REST = 8  # steps: the longest a draft sits out for a sequence it keeps doubting (Speculator)


def prompt_lookup(tokens: list[int], k: int, max_ngram: int = 4, min_ngram: int = 1,
                  tokens_per_match: int = 2) -> list[int]:
    """Up to ``k`` tokens that followed the latest earlier occurrence of the longest matching suffix
    n-gram of ``tokens`` (prompt + output so far), or ``[]`` when no n-gram matches.

    A longer match is stronger evidence that the text repeats, so the proposal is at most
    ``tokens_per_match * n`` tokens for an ``n``-gram match: on ``pycode``'s held-out code a 1-gram
    match's next 4 tokens were kept 27% of the time, a 4-gram's 71%, while a verify row costs
    about a sixth of a one-row step here (``bench/generate.py``); cutting weak proposals short and
    letting strong ones run to ``k`` = 8 took prompt lookup from 1.53x to 1.61x plain decoding
    (simulated over 32 prompts, then measured: docs/generation.md)."""
    L = len(tokens)
    for n in range(min(max_ngram, L - 1), min_ngram - 1, -1):
        tail = tokens[L - n:]
        first = tail[0]
        # the latest start i < L - n with tokens[i:i+n] == tail, searched right to left
        i = L - n - 1
        while i >= 0:
            if tokens[i] == first and tokens[i:i + n] == tail:
                follow = tokens[i + n:i + n + min(k, tokens_per_match * n)]
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

    ``logits`` ``(k + 1, V)``: the target's logits after the last sampled token and after each
    draft token (under a constraint: masked by the grammar); ``draft_probs`` ``(k, V)`` the
    proposer's distributions (None: point proposals), or ``(k + 1, V)`` when the proposal was cut
    before a refused ``k + 1``-th token (then drawn from the residual there, as if rejected).
    """
    k = len(draft)
    if params.greedy:
        best = logits.argmax(-1).tolist()  # first maximum on ties, as plain greedy decoding
        n = 0
        while n < k and draft[n] == best[n]:
            n += 1
        return draft[:n] + [best[n]]
    p = _probs(logits, params)  # (k + 1, V)
    idx = torch.tensor(draft, device=p.device, dtype=torch.long)
    p_x = p[:k].gather(1, idx[:, None]).squeeze(1).tolist()  # p(x_j) at each row: one host sync
    q_x = [1.0] * k if draft_probs is None else draft_probs.gather(1, idx[:, None]).squeeze(1).tolist()
    for j in range(k):
        if rng.random() * q_x[j] < p_x[j]:  # accept with probability min(1, p/q)
            continue
        return draft[:j] + [_draw(_residual(p[j], draft[j], draft_probs, j), rng)]
    if draft_probs is not None and draft_probs.size(0) > k:  # cut before a refused token: rejected there
        return draft + [_draw(_residual(p[k], None, draft_probs, k), rng)]
    return draft + [_draw(p[k], rng)]


def _residual(p: torch.Tensor, rejected: int | None, draft_probs: torch.Tensor | None, j: int) -> torch.Tensor:
    """The distribution a rejected position draws from: ``max(p - q, 0)`` (renormalised by the draw)."""
    if draft_probs is None:
        residual = p.clone()
        residual[rejected] = 0.0  # max(p - onehot, 0): p with the rejected token removed
    else:
        residual = (p - draft_probs[j]).clamp_(min=0.0)
    if float(residual.sum()) <= 0.0:  # p == q up to rounding: any draw from p is exact
        residual = p
    return residual


class DraftAsk(NamedTuple):
    """One sequence's request for a draft proposal (:meth:`DraftModel.propose_many`)."""

    slot: int
    tokens: list[int]  # the sequence so far
    k: int  # most tokens to propose
    params: SamplingParams
    rng: object  # the request's random stream (draws for a sampled request)


class DraftModel:
    """A smaller model with the target's vocabulary proposing ``k`` tokens, one cached step each.

    Its KV cache has one slot per engine slot; ``cached[slot]`` lists the tokens whose keys and
    values that slot holds, at positions ``0..len - 1``. A proposal compares them with the
    sequence's tokens: the common prefix is reused (after a verify step it is everything up to the
    first rejected draft token; a new request in the slot simply shares nothing, or a prompt
    prefix), the rest is fed as one segment, then each proposed token is fed on its own. Entries
    past the common prefix are stale, invisible to attention (it reads only positions up to the
    fed one) and overwritten as the slot advances: the same rollback as the target's cache.

    The sequences of one engine step propose together (:meth:`propose_many`): each draft step is
    one forward over every sequence still proposing, as an engine step batches its decode rows, so
    a batch of 8 costs the draft's per-call overhead once per step instead of 8 times.
    """

    def __init__(self, model, vocab_size: int, n_slots: int, max_seq_len: int, min_confidence: float = 0.5):
        if model.config.vocab_size != vocab_size:
            raise ValueError(f"the draft model's vocabulary ({model.config.vocab_size}) differs from the "
                             f"target's ({vocab_size}): a draft must share the target's tokenizer")
        if not 0.0 <= min_confidence <= 1.0:
            raise ValueError(f"draft_min_confidence must be a probability in [0, 1], got {min_confidence}")
        self.model = model.eval()
        self.min_confidence = min_confidence  # a proposal stops before a token the draft gives less
        cfg, dev = model.config, model.device
        self.max_seq_len = T = min(cfg.block_size, max_seq_len)  # a longer sequence gets no proposal
        self.cache = KVCache(cfg.n_layer, n_slots, cfg.n_head, T, cfg.head_dim, dev, model.dtype)
        self.k_layers, self.v_layers = list(self.cache.k), list(self.cache.v)
        # A draft is small, so its steps are per-call overhead: the engine's addmm layouts, and every
        # index tensor a step needs is one upload plus views and additions (row of position 0 per
        # slot and head, in a layer's buffer viewed as (n_slots * nh * T, hs); a position adds to it).
        self.weights = DecodeWeights(model, dev, model.dtype, max_rows=n_slots)
        self.row_base = (torch.arange(n_slots * cfg.n_head, device=dev) * T).view(n_slots, cfg.n_head)
        self.cached: list[list[int]] = [[] for _ in range(n_slots)]
        self.forwards = 0  # forward passes run (one per draft step, whatever its batch)

    def propose(self, slot: int, tokens: list[int], k: int, params: SamplingParams,
                rng) -> tuple[list[int], torch.Tensor | None]:
        """Up to ``k`` tokens continuing ``tokens`` (the sequence so far), and their distributions
        ``(k, V)`` for a sampled request (None when greedy)."""
        return self.propose_many([DraftAsk(slot, tokens, k, params, rng)])[0]

    @torch.inference_mode()
    def propose_many(self, asks: list[DraftAsk]) -> list[tuple[list[int], torch.Tensor | None]]:
        """:meth:`propose` for several sequences at once, ``asks`` with distinct slots: one draft forward per step over all of them (the first feeds
        each sequence's unseen tokens, the later ones each proposed token), a sequence leaving
        the batch when it has its ``k`` tokens or doubts the next one."""
        n = len(asks)
        out: list[list[int]] = [[] for _ in range(n)]
        qs: list[list[torch.Tensor]] = [[] for _ in range(n)]
        feeds, starts, ks = [], [], []
        for a in asks:
            ks.append(min(a.k, self.max_seq_len - len(a.tokens) + 1))  # the last fed token sits at len(tokens) + k - 2
            starts.append(min(_common_prefix(self.cached[a.slot], a.tokens), len(a.tokens) - 1))  # feed at least the last
            feeds.append(a.tokens[starts[-1]:])
        live = sorted((i for i in range(n) if ks[i] > 0), key=lambda i: asks[i].slot)  # slot order, as decode rows
        fed = [0] * n
        while live:
            logits = self._step([(asks[i].slot, feeds[i], starts[i] + fed[i]) for i in live])  # (len(live), V)
            still = []
            for i, (tok, doubt, q) in zip(live, self._choose(logits, [asks[i] for i in live])):
                fed[i] += len(feeds[i])
                if doubt:
                    continue  # the draft doubts this token: a verify row it would likely waste
                out[i].append(tok)
                if q is not None:
                    qs[i].append(q)
                feeds[i] = [tok]
                if len(out[i]) < ks[i]:
                    still.append(i)
            live = still
        for i, a in enumerate(asks):
            if ks[i] > 0:
                self.cached[a.slot] = (a.tokens + out[i])[:starts[i] + fed[i]]  # what was fed (never the last proposed token)
        return [(out[i], torch.stack(qs[i]) if qs[i] else None) for i in range(n)]

    def _choose(self, logits: torch.Tensor, asks: list[DraftAsk]) -> list[tuple[int, bool, torch.Tensor | None]]:
        """Per row of ``logits`` ``(R, V)``: the draft's token, whether it doubts it (its probability
        under ``min_confidence``), and its distribution for a sampled request (None when greedy)."""
        best, ids = logits.max(-1)  # first maximum on ties, as argmax (and the runner)
        greedy = [a.params.greedy for a in asks]
        sure = None  # the greedy tokens' probabilities, one host sync for all rows
        if any(greedy) and self.min_confidence > 0:
            sure = torch.exp(best - logits.logsumexp(-1)).tolist()
        ids = ids.tolist()
        chosen = []
        for j, a in enumerate(asks):
            if greedy[j]:
                chosen.append((ids[j], sure is not None and sure[j] < self.min_confidence, None))
            else:
                q = _probs(logits[j:j + 1], a.params)[0]
                tok = _draw(q, a.rng)
                chosen.append((tok, float(q[tok]) < self.min_confidence, q))
        return chosen

    def _step(self, rows: list[tuple[int, list[int], int]]) -> torch.Tensor:
        """Feed each row's ``(slot, tokens, start)``, tokens at positions ``start..`` of the slot
        (keys and values written to the draft's cache), rows in ascending slot order, in one
        forward; the logits ``(len(rows), V)`` after each row's last token."""
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        last: list[int] = []
        for slot, feed, start in rows:
            tokens += feed
            positions += range(start, start + len(feed))
            slots += [slot] * len(feed)
            last.append(len(tokens) - 1)
        N, R = len(tokens), len(rows)
        ints = torch.tensor(tokens + positions + slots, device=self.row_base.device)  # one upload
        tok_t, pos_t, slot_t = ints[:N], ints[N:2 * N], ints[2 * N:]
        write = (self.row_base[slot_t] + pos_t[:, None]).view(-1)  # (N * nh,)
        if N == R:  # one token each: the decode path, one attention over the slots' range
            lo, hi, L = rows[0][0], rows[-1][0] + 1, max(positions) + 1
            index = None if hi - lo == R else slot_t - lo  # holes: slots in the range not proposing
            row_pos = pos_t if index is None else pos_t.new_zeros(hi - lo).index_copy_(0, index, pos_t)
            mask = None if index is None and min(positions) == L - 1 else decode_mask(row_pos, L, self.model.dtype)
            batch = CacheBatch(slots=slot_t, positions=pos_t, write_index=write, num_decode=R, decode_lo=lo,
                               decode_hi=hi, decode_len=L, decode_mask=mask, decode_index=index)
        else:  # some row feeds a segment (tokens the draft has not seen): every row is one
            segments, r0 = [], 0
            for slot, feed, start in rows:
                end = start + len(feed)
                segments.append(PrefillSegment(r0, r0 + len(feed), slot, start, segment_mask(start, end, ints.device)))
                r0 += len(feed)
            batch = CacheBatch(slots=slot_t, positions=pos_t, write_index=write, num_decode=0, prefill=tuple(segments))
        hidden = self.model.forward_cached(tok_t, batch, self.k_layers, self.v_layers, self.weights.layers(N))
        self.forwards += 1
        if N != R:
            hidden = hidden[torch.tensor(last, device=ints.device)]  # (R, C): each row's last token
        return self.weights.head(R)(hidden).float()


def _common_prefix(a: list[int], b: list[int]) -> int:
    """The length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:  # the usual case after a fully accepted proposal: one C-speed comparison
        return n
    i = 0
    while a[i] == b[i]:
        i += 1
    return i


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
        # per sequence (dropped with it): the draft's rest after proposing nothing (_draft_rests)
        self._rest: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def check(self, params: SamplingParams) -> None:
        """The request-level rule (Engine.check_request runs it)."""
        if params.speculation == "draft" and self.draft is None:
            raise ValueError("speculation 'draft' was asked for, but this engine has no draft model")

    def mode_for(self, params: SamplingParams) -> str | None:
        mode = params.speculation or self.mode
        if mode == "off" or params.uses_penalties:
            return None
        if mode == "auto":
            return "prompt_lookup" if params.greedy else None
        return mode

    def propose(self, plan: SchedulerOutput, params: dict[str, SamplingParams], rngs: dict,
                allowed_prefix=None) -> None:
        """Move the decode sequences that get a proposal this step into ``plan.verify``.
        ``allowed_prefix(request_id, draft)``: how many leading draft tokens a constrained
        request's grammar accepts (:meth:`lmcore.engine.constraints.Constraints.allowed_prefix`)."""
        proposals: dict[int, tuple[list[int], torch.Tensor | None]] = {}  # by position in plan.decode
        asks, askers = [], []  # the draft's, proposed together in one batch
        for i, seq in enumerate(plan.decode):
            p = params[seq.request_id]
            mode = self.mode_for(p)
            # room: the tokens it may still emit (one comes from the verify itself) and the cache
            room = min(p.speculative_tokens or self.k, seq.max_tokens - len(seq.output_ids) - 1,
                       self.max_seq_len - seq.num_computed - 1)
            if mode is None or room <= 0:
                continue
            tokens = seq.prompt_ids + seq.output_ids
            if mode == "prompt_lookup":
                proposals[i] = (prompt_lookup(tokens, room), None)
            elif not self._draft_rests(seq):
                asks.append(DraftAsk(seq.slot, tokens, room, p, rngs[seq.request_id]))
                askers.append(i)
        if asks:
            for i, (draft, probs) in zip(askers, self.draft.propose_many(asks)):
                self._draft_proposed(plan.decode[i], draft)
                proposals[i] = (draft, probs)
        keep = []
        for i, seq in enumerate(plan.decode):
            draft, probs = proposals.get(i, ([], None))
            if draft and params[seq.request_id].constrained:
                n = allowed_prefix(seq.request_id, draft)
                # a cut sampled draft keeps q at the cut (verify draws the residual there)
                draft, probs = draft[:n], (probs[:n + 1] if probs is not None and n < len(draft) else probs)
            if draft or probs is not None:
                plan.verify.append(VerifyChunk(seq, draft, probs))
            else:
                keep.append(seq)
        plan.decode = keep

    def _draft_rests(self, seq) -> bool:
        """Whether the draft sits this step out for ``seq``: after a step where it doubted its very
        first token (no proposal, one draft step wasted), it rests for 1 step, then after another
        such step 2, 4, ... up to ``MAX_DRAFT_REST``; any proposal ends the rest. A resting sequence
        decodes plainly, and the draft catches up on its next proposal in one segment. Output is
        unchanged (whether a step speculates never changes the emitted tokens' distribution); the
        rests depend on the sequence's own history only, so a seeded request stays reproducible."""
        rest = self._rest.get(seq)
        if rest is None or rest[0] == 0:
            return False
        rest[0] -= 1
        return True

    def _draft_proposed(self, seq, draft: list[int]) -> None:
        if draft:
            self._rest.pop(seq, None)
        else:
            last = self._rest.get(seq, (0, 0))[1]
            n = min(2 * last or 1, MAX_DRAFT_REST)
            self._rest[seq] = [n, n]  # [steps left to rest, this rest's length]

    def restore(self, plan: SchedulerOutput) -> None:
        """Undo :meth:`propose` (a failed step is re-run one request at a time, plainly)."""
        if plan.verify:
            plan.decode = sorted(plan.decode + [v.seq for v in plan.verify], key=lambda s: s.slot)
            plan.verify = []

    def verify(self, chunk: VerifyChunk, logits: torch.Tensor, params: SamplingParams, rng,
               masked: torch.Tensor | None = None):
        """``(tokens, logprobs)`` a verify step emits for ``chunk`` (logprobs: ``(chosen, values,
        ids)`` lists per token when the request asked for them, else None). ``masked``: the logits
        under the request's grammar, which acceptance uses; logprobs stay the raw ``logits``' (pre-mask)."""
        tokens = verify(logits if masked is None else masked, chunk.draft, chunk.draft_probs, params, rng)
        self.steps += 1
        self.proposed += len(chunk.draft)
        self.accepted += len(tokens) - 1
        lp = None
        if params.logprobs:
            rows = logits[:len(tokens)]
            chosen, values, ids = top_logprobs(rows, torch.tensor(tokens, device=rows.device), params.logprobs)
            lp = (chosen.tolist(), values.tolist(), ids.tolist())
        return tokens, lp
