"""The model runner: owns the weights' fast layouts, the KV cache and the prefix pool; runs one step.

Given the scheduler's decision it builds the step's flat token batch (:class:`CacheBatch`), runs the
model once over it, projects only the rows that sample a token onto the vocabulary, and samples.
The only host-device synchronisation per step is reading back the sampled ids (and, when asked,
their log-probabilities): everything else is enqueued, so the same code runs on a GPU.

**Weight layouts.** ``nn.Linear`` stores its weight as ``(out, in)`` and computes ``x @ W.T``; with
the few rows of a decode step, that transposed-operand GEMM is much slower on this CPU than the
same product against a contiguous ``(in, out)`` copy (profiled, GPT-2-small shapes: 1.6 ms vs
0.66 ms for ``c_attn`` at 8 rows, 9.9 ms vs 7.9 ms for the 50257-wide head at 1 row; tiny shapes:
9 us vs 5.7 us per call). So the runner keeps :class:`PackedLinear` copies of every plain
``nn.Linear`` (including the tied output head), made when it is built and held outside the model:
the state dict is untouched, and an Engine built after a LoRA merge or a fine-tune sees the new
weights (build a new Engine after changing weights). Anything that is *not* a plain Linear (a
LoRA wrapper, say) is called as the module it is, so unmerged adapters work unchanged. The price
is memory: one more copy of the Linear weights (``prepack_weights=False`` turns it off).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .kv_cache import CacheBatch, KVCache, PrefillSegment
from .model import GPT
from .sampling import SamplingParams, apply_penalties, logits_to_probs, sample_from_probs, top_logprobs
from .scheduler import SchedulerOutput, Sequence


class PackedLinear:
    """``x @ W.T + b`` computed as ``addmm(b, x, W_t)`` with ``W_t`` a contiguous ``(in, out)`` copy."""

    __slots__ = ("weight_t", "bias")

    def __init__(self, linear: nn.Linear):
        self.weight_t = linear.weight.detach().t().contiguous()  # (in, out)
        self.bias = linear.bias.detach() if linear.bias is not None else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, in) -> (N, out)
        if self.bias is None:
            return x @ self.weight_t
        return torch.addmm(self.bias, x, self.weight_t)


def pack(module: nn.Module, enabled: bool = True):
    """A :class:`PackedLinear` for a plain ``nn.Linear``; anything else is returned as is."""
    return PackedLinear(module) if enabled and type(module) is nn.Linear else module


class ModelRunner:
    def __init__(self, model: GPT, n_slots: int, max_seq_len: int, device: torch.device,
                 dtype: torch.dtype, prefix_blocks: int = 0, prefix_block_size: int = 16,
                 prepack_weights: bool = True):
        self.model = model
        self.device = device
        self.dtype = dtype
        cfg = model.config
        self.vocab_size = cfg.vocab_size
        self.cache = KVCache(cfg.n_layer, n_slots, cfg.n_head, max_seq_len, cfg.head_dim, device, dtype)
        self.n_head = cfg.n_head
        self.layers = [tuple(pack(m, prepack_weights) if i in (1, 2, 4, 5) else m for i, m in enumerate(layer))
                       for layer in model.decode_layers()]  # (ln_1, c_attn, c_proj, ln_2, c_fc, mlp.c_proj)
        self.head = pack(model.lm_head, prepack_weights)
        self.block_size = prefix_block_size
        if prefix_blocks > 0:  # (rows, n_layer, nh, block, hd): one row per cached prompt block
            shape = (prefix_blocks, cfg.n_layer, cfg.n_head, prefix_block_size, cfg.head_dim)
            self.pool_k = torch.zeros(shape, device=device, dtype=dtype)
            self.pool_v = torch.zeros(shape, device=device, dtype=dtype)
        # Per-slot sampling parameters, written once at admission, gathered by row every step.
        f32 = dict(device=device, dtype=torch.float32)
        self.temperature = torch.ones(n_slots, **f32)
        self.top_k = torch.zeros(n_slots, device=device, dtype=torch.long)
        self.top_p = torch.ones(n_slots, **f32)
        self.repetition = torch.ones(n_slots, **f32)
        self.presence = torch.zeros(n_slots, **f32)
        self.frequency = torch.zeros(n_slots, **f32)
        self.seen: torch.Tensor | None = None  # (n_slots, V) bool, allocated on first use of penalties
        self.counts: torch.Tensor | None = None  # (n_slots, V) float

    # --- admission --------------------------------------------------------------------------------
    def admit(self, seq: Sequence, params: SamplingParams) -> None:
        """Copy the sequence's cached prefix into its slot and record its sampling parameters."""
        s = seq.slot
        if seq.prefix_rows:
            rows = torch.tensor(seq.prefix_rows, device=self.device)
            n = len(seq.prefix_rows) * self.block_size
            # pool (nb, L, nh, bs, hd) -> (L, nh, nb*bs, hd): the blocks laid end to end
            for pool, buf in ((self.pool_k, self.cache.k), (self.pool_v, self.cache.v)):
                blocks = pool.index_select(0, rows).permute(1, 2, 0, 3, 4)  # (L, nh, nb, bs, hd)
                buf[:, s, :, :n] = blocks.reshape(buf.size(0), buf.size(2), n, buf.size(4))
        self.temperature[s] = params.temperature if params.temperature > 0 else 1.0
        self.top_k[s] = params.top_k
        self.top_p[s] = params.top_p
        self.repetition[s] = params.repetition_penalty
        self.presence[s] = params.presence_penalty
        self.frequency[s] = params.frequency_penalty
        if params.uses_penalties:
            if self.seen is None:
                n_slots = self.temperature.numel()
                self.seen = torch.zeros(n_slots, self.vocab_size, device=self.device, dtype=torch.bool)
                self.counts = torch.zeros(n_slots, self.vocab_size, device=self.device)
            self.seen[s] = False
            self.seen[s, torch.tensor(seq.prompt_ids, device=self.device)] = True
            self.counts[s] = 0.0

    def save_prefix_blocks(self, seq: Sequence, blocks: list[tuple[int, int]]) -> None:
        """Copy computed prompt blocks ``(block_index, pool_row)`` from the slot into the pool."""
        bs = self.block_size
        for j, row in blocks:
            self.pool_k[row] = self.cache.k[:, seq.slot, :, j * bs:(j + 1) * bs]
            self.pool_v[row] = self.cache.v[:, seq.slot, :, j * bs:(j + 1) * bs]

    # --- one step --------------------------------------------------------------------------------
    def build_batch(self, out: SchedulerOutput) -> tuple[torch.Tensor, CacheBatch, list[Sequence], list[int]]:
        """The flat token ids, their cache batch, and the sequences that sample (with their rows)."""
        tokens: list[int] = []
        slots: list[int] = []
        positions: list[int] = []
        samplers: list[Sequence] = []
        sample_rows: list[int] = []
        dev = self.device
        D = len(out.decode)
        batch_kw = {}
        if D:
            for i, seq in enumerate(out.decode):
                tokens.append(seq.next_input())
                slots.append(seq.slot)
                positions.append(seq.num_computed)
                samplers.append(seq)
                sample_rows.append(i)
            lo, hi = slots[0], slots[-1] + 1  # decode is in ascending slot order
            L = max(positions) + 1
            if hi - lo == D:
                index, range_pos = None, positions
            else:  # holes: dummy rows attend to position 0 only
                range_pos = [0] * (hi - lo)
                for s, p in zip(slots, positions):
                    range_pos[s - lo] = p
                index = torch.tensor([s - lo for s in slots], device=dev)
            if index is None and positions[0] == L - 1 and positions[-1] == L - 1 and min(positions) == L - 1:
                mask = None  # every row sees all L positions (a static batch, or batch 1): no mask
            else:
                pos_t = torch.tensor(range_pos, device=dev)
                visible = torch.arange(L, device=dev)[None, :] <= pos_t[:, None]  # (R, L)
                # Additive float mask (0 or -inf): SDPA's CPU kernel ran ~30% faster with it than with bool.
                mask = torch.zeros(visible.shape, device=dev, dtype=self.dtype).masked_fill_(~visible, float("-inf"))
                mask = mask[:, None, None, :]  # (R, 1, 1, L)
            batch_kw = dict(decode_lo=lo, decode_hi=hi, decode_len=L, decode_mask=mask, decode_index=index)
        segments = []
        for chunk in out.prefill:
            seq, start, end = chunk.seq, chunk.start, chunk.end
            r0 = len(tokens)
            tokens.extend(seq.prompt_ids[start:end])
            slots.extend([seq.slot] * (end - start))
            positions.extend(range(start, end))
            mask = None
            if start > 0:  # query i (position start+i) sees keys 0..start+i
                q_pos = torch.arange(start, end, device=dev)[:, None]
                mask = torch.arange(end, device=dev)[None, :] <= q_pos  # (T, end)
            segments.append(PrefillSegment(r0, len(tokens), seq.slot, start, mask))
            if chunk.completes_prompt:
                samplers.append(seq)
                sample_rows.append(len(tokens) - 1)
        # Cache rows written this step, viewing a layer's buffer as (n_slots * nh * max_seq, hs).
        nh, T = self.n_head, self.cache.max_seq_len
        write = [(s * nh + h) * T + p for s, p in zip(slots, positions) for h in range(nh)]
        batch = CacheBatch(
            slots=torch.tensor(slots, device=dev), positions=torch.tensor(positions, device=dev),
            write_index=torch.tensor(write, device=dev), num_decode=D, prefill=tuple(segments), **batch_kw,
        )
        return torch.tensor(tokens, device=dev), batch, samplers, sample_rows

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Project final hidden states ``(R, C)`` onto the vocabulary: ``(R, V)``."""
        return self.head(hidden)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, params: dict[str, SamplingParams], rngs: dict) -> tuple:
        """Run one step. Returns ``(samplers, token_ids, logprob_rows)`` on the host."""
        idx, batch, samplers, rows = self.build_batch(out)
        hidden = self.model.forward_cached(idx, batch, self.cache.k, self.cache.v, self.layers)  # (N, C)
        if not samplers:
            return samplers, [], None
        if rows == list(range(len(rows))):
            hidden = hidden[: len(rows)]
        else:
            hidden = hidden.index_select(0, torch.tensor(rows, device=self.device))
        logits = self.logits(hidden).float()  # (R, V)
        ps = [params[s.request_id] for s in samplers]
        ids, lp = self.sample(logits, samplers, ps, rngs)
        return samplers, ids, lp

    def sample(self, logits: torch.Tensor, seqs: list[Sequence], ps: list[SamplingParams], rngs: dict):
        dev = self.device
        raw = logits
        slot_t = torch.tensor([s.slot for s in seqs], device=dev)
        penalised = self.seen is not None and any(p.uses_penalties for p in ps)
        if penalised:
            logits = apply_penalties(logits, self.seen[slot_t], self.counts[slot_t], self.repetition[slot_t],
                                     self.presence[slot_t], self.frequency[slot_t])
        ids = logits.max(-1).indices  # (R,) greedy; first maximum on ties, like argmax, ~3x faster on CPU
        sampled_rows = [i for i, p in enumerate(ps) if not p.greedy]
        if sampled_rows:
            k_max = max(p.top_k for p in ps)
            any_top_p = any(p.top_p < 1.0 for p in ps)
            probs = logits_to_probs(
                logits, self.temperature[slot_t], self.top_k[slot_t] if k_max else None,
                self.top_p[slot_t] if any_top_p else None, k_max=k_max,
            )
            u = [rngs[s.request_id].random() if not p.greedy else 0.0 for s, p in zip(seqs, ps)]
            choice = sample_from_probs(probs, torch.tensor(u, device=dev))
            if len(sampled_rows) == len(ps):
                ids = choice
            else:
                greedy = torch.tensor([p.greedy for p in ps], device=dev)
                ids = torch.where(greedy, ids, choice)
        if penalised:
            self.counts.index_put_((slot_t, ids), torch.ones_like(ids, dtype=self.counts.dtype), accumulate=True)
            self.seen[slot_t, ids] = True
        n_lp = max(p.logprobs for p in ps)
        if n_lp:
            chosen, values, top_ids = top_logprobs(raw, ids, n_lp)
            ids_list = ids.tolist()  # the one host sync of the step (with the logprobs below)
            return ids_list, (chosen.tolist(), values.tolist(), top_ids.tolist())
        return ids.tolist(), None
