"""The model runner: owns the weights' fast layouts, the KV cache and the prefix pool; runs one step.

Given the scheduler's decision it builds the step's flat token batch (:class:`CacheBatch`), runs the
model once over it, projects only the rows that sample a token onto the vocabulary, and samples.
The only host-device synchronisation per step is reading back the sampled ids (and, when asked,
their log-probabilities): everything else is enqueued, so the same code runs on a GPU.

The weights' fast layouts (re-laid-out copies kept beside the model, made when the runner is built)
are described in :mod:`lmcore.engine.weight_layout`. The runner also owns the LoRA bank
(:class:`lmcore.lora.LoRABank`, made when the first adapter is added): it wraps those layouts so
the base GEMMs keep them, and each step routes every token row to its request's adapter.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from lmcore.lora.bank import LoRABank
from lmcore.model.gpt import GPT
from lmcore.model.kv_cache import BlockPool, CacheBatch, KVCache, PrefillSegment, decode_mask, segment_mask

from . import prompt_logprobs
from .confinement import flag_unusable_rows
from .sampling import SamplingParams, apply_penalties, logits_to_probs, sample_from_probs, top_logprobs
from .scheduler import SchedulerOutput, Sequence
from .weight_layout import DecodeWeights


@dataclass
class StepInputs:
    """One step's inputs, on the device."""

    tokens: torch.Tensor  # (N,) token ids, flat
    batch: CacheBatch
    samplers: list[Sequence]  # the sequences that sample a token this step, in row order
    params: list[SamplingParams]  # theirs
    rows: torch.Tensor | None  # (R,) rows of the flat batch they sample from; None = the first R
    slots: torch.Tensor  # (R,) their slots
    uniforms: torch.Tensor | None  # (R,) one draw each from their own streams; None = all greedy
    greedy: torch.Tensor | None  # (R,) bool; None = no greedy row among sampled ones
    adapters: torch.Tensor | None = None  # (N,) LoRA adapter per token row (-1 = base); None = no bank


class ModelRunner:
    def __init__(self, model: GPT, n_slots: int, max_seq_len: int, device: torch.device,
                 dtype: torch.dtype, prefix_blocks: int = 0, prefix_block_size: int = 16,
                 prepack_weights: bool = True, constraints=None, max_rows: int | None = None):
        self.model = model
        self.constraints = constraints  # lmcore.engine.constraints.Constraints: masks of constrained rows
        self.device = device
        self.dtype = dtype
        cfg = model.config
        self.vocab_size = cfg.vocab_size
        self.cache = KVCache(cfg.n_layer, n_slots, cfg.n_head, max_seq_len, cfg.head_dim, device, dtype)
        self.n_head = cfg.n_head
        self.k_layers, self.v_layers = list(self.cache.k), list(self.cache.v)  # per-layer views, made once
        # max_rows: the most rows of a decode step (a verify segment adds up to k rows per sequence)
        self.weights = DecodeWeights(model, device, dtype, max_rows or n_slots, prepack_weights)
        self.bank: LoRABank | None = None  # LoRA adapters, every row picking its own (add_adapter)
        self.pool = None  # keys/values of cached prompt blocks (see lmcore.engine.prefix_cache)
        if prefix_blocks > 0:
            self.pool = BlockPool(prefix_blocks, prefix_block_size, cfg.n_layer, cfg.n_head, cfg.head_dim,
                                  device, dtype)
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
        self.last_draws: tuple | None = None  # the latest step's (samplers, uniforms), see prepare
        self._prompt_logprobs: dict = {}  # this step's prompt figures (take_prompt_logprobs)
        self.verify_logits: list[torch.Tensor] = []  # the latest step's raw logits per VerifyChunk, (k+1, V) each
        # ... and the same masked by each constrained chunk's grammar (None: no chunk is constrained)
        self.verify_masked: list[torch.Tensor] | None = None

    # --- admission --------------------------------------------------------------------------------
    def admit(self, seq: Sequence, params: SamplingParams) -> None:
        """Copy the sequence's cached prefix into its slot and record its sampling parameters."""
        s = seq.slot
        if seq.prefix_rows:
            self.pool.load(self.cache, s, seq.prefix_rows)
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
        self.pool.save(self.cache, seq.slot, blocks)

    # --- LoRA adapters ---------------------------------------------------------------------------
    def add_adapter(self, name: str, adapter_dir) -> int:
        """Load an adapter into the bank (made on first use: it wraps the model's projections in
        place and the fast weight layouts, so the base GEMMs keep their layouts); returns its index."""
        if self.bank is None:
            self.bank = LoRABank(self.model)
            self.weights.wrap_blocks(self.bank.wrap)
        return self.bank.add(name, adapter_dir)

    def remove_adapter(self, name: str) -> None:
        self._require_bank(name).remove(name)

    def adapter_index(self, adapter: str | int | None) -> int:
        """The bank index a request's ``adapter`` names (-1: the base model); ValueError if unknown."""
        if adapter is None:
            return -1
        return self._require_bank(adapter).index(adapter)

    def adapters(self) -> list[str]:
        return self.bank.adapters() if self.bank is not None else []

    def adapter_parameters(self, adapter: str | int) -> int:
        return self._require_bank(adapter).parameters(adapter)

    def use_adapter(self, adapter: str | int | None):
        """A context manager running this thread's plain ``model(...)`` calls through ``adapter``."""
        if adapter is None and self.bank is None:
            return nullcontext(self.model)
        return self._require_bank(adapter).use(adapter)

    def _require_bank(self, adapter: str | int) -> LoRABank:
        if self.bank is None:
            raise ValueError(f"adapter {adapter!r} requested, but the engine has no LoRA bank "
                             "(load one with Engine.add_adapter)")
        return self.bank

    # --- one step --------------------------------------------------------------------------------
    def _upload(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        """One host list -> one device tensor. On a GPU through pinned memory without blocking, so
        building the next inputs never waits for the device."""
        t = torch.tensor(values, dtype=dtype)
        if self.device.type == "cpu":
            return t
        return t.pin_memory().to(self.device, non_blocking=True)

    def prepare(self, out: SchedulerOutput, params: dict[str, SamplingParams], rngs: dict) -> StepInputs:
        """Everything the step needs on the device, built from the schedule: the int lists of every
        step below go up in **one** upload (and the sampling draws in one more), then are viewed."""
        tokens, slots, positions, samplers, rows, spans = self._flat_rows(out)
        D, R = len(out.decode), len(samplers)
        lo, hi, L, holes, range_pos = self._decode_range(slots, positions, D)
        uniform_decode = D and not holes and min(positions[:D]) == L - 1
        parts = [tokens, slots, positions, self._write_index(slots, positions), [s.slot for s in samplers],
                 rows, [s - lo for s in slots[:D]] if holes else [], range_pos,
                 self._adapter_rows(out) if self.bank is not None else []]
        ints = self._upload([v for part in parts for v in part], torch.long)
        views = []
        at = 0
        for part in parts:
            views.append(ints[at:at + len(part)])
            at += len(part)
        tok_t, slot_t, pos_t, write_t, sample_slot_t, row_t, index_t, range_pos_t, adapter_t = views

        mask = None
        if D and not uniform_decode:  # each row sees positions <= its own (dummy rows: 0 only)
            mask = decode_mask(range_pos_t if holes else pos_t[:D], L, self.dtype)
        batch = CacheBatch(slots=slot_t, positions=pos_t, write_index=write_t, num_decode=D, decode_lo=lo,
                           decode_hi=hi, decode_len=L, decode_mask=mask,
                           decode_index=index_t if holes else None, prefill=self._prefill_segments(spans))
        ps = [params[s.request_id] for s in samplers]
        uniforms, greedy = self._sampling_draws(samplers, ps, rngs)
        return StepInputs(tok_t, batch, samplers, ps, None if rows == list(range(R)) else row_t,
                          sample_slot_t, uniforms, greedy, adapter_t if self.bank is not None else None)

    @staticmethod
    def _flat_rows(out: SchedulerOutput) -> tuple:
        """The flat token layout: decode rows first (ascending slot), then each prefill chunk's
        tokens. Returns host lists ``(tokens, slots, positions)`` (one entry per row), the
        ``samplers`` (sequences that sample a token: every decode row, and prefill chunks that
        complete their prompt) with the ``rows`` they sample from, and the prefill ``spans``
        ``(first row, slot, start, end)``."""
        tokens: list[int] = []
        slots: list[int] = []
        positions: list[int] = []
        samplers: list[Sequence] = []
        rows: list[int] = []
        for i, seq in enumerate(out.decode):
            tokens.append(seq.next_input())
            slots.append(seq.slot)
            positions.append(seq.num_computed)
            samplers.append(seq)
            rows.append(i)
        spans = []
        for chunk in out.prefill:
            seq, start, end = chunk.seq, chunk.start, chunk.end
            spans.append((len(tokens), seq.slot, start, end))
            tokens.extend(seq.prompt_ids[start:end])
            slots.extend([seq.slot] * (end - start))
            positions.extend(range(start, end))
            if chunk.completes_prompt:
                samplers.append(seq)
                rows.append(len(tokens) - 1)
        for v in out.verify:  # speculation: a segment like a prefill chunk, every row's logits kept
            seq, toks = v.seq, v.tokens
            spans.append((len(tokens), seq.slot, seq.num_computed, seq.num_computed + len(toks)))
            tokens.extend(toks)
            slots.extend([seq.slot] * len(toks))
            positions.extend(range(seq.num_computed, seq.num_computed + len(toks)))
        return tokens, slots, positions, samplers, rows, spans

    def _write_index(self, slots: list[int], positions: list[int]) -> list[int]:
        """Cache rows written this step, ``nh`` per token, viewing a layer's buffer as
        ``(n_slots * nh * max_seq, hs)``: row ``(slot * nh + head) * max_seq + position``."""
        nh, T = self.n_head, self.cache.max_seq_len
        return [(s * nh + h) * T + p for s, p in zip(slots, positions) for h in range(nh)]

    @staticmethod
    def _decode_range(slots: list[int], positions: list[int], D: int) -> tuple[int, int, int, bool, list[int]]:
        """Decode attention runs over the slot range ``[lo, hi)`` reading ``L`` keys per slot.
        ``holes``: some slot of the range does not decode (free, or still prefilling); then
        ``range_pos`` holds each range row's position, 0 for a hole (a dummy query, dropped)."""
        if not D:
            return 0, 0, 0, False, []
        lo, hi = slots[0], slots[D - 1] + 1
        L = max(positions[:D]) + 1
        holes = hi - lo != D
        range_pos: list[int] = []
        if holes:
            range_pos = [0] * (hi - lo)
            for s, p in zip(slots[:D], positions[:D]):
                range_pos[s - lo] = p
        return lo, hi, L, holes, range_pos

    @staticmethod
    def _adapter_rows(out: SchedulerOutput) -> list[int]:
        """One LoRA adapter index per token row (-1: the base), in the layout of the tokens."""
        adapters = [s.adapter for s in out.decode]
        for chunk in out.prefill:
            adapters.extend([chunk.seq.adapter] * (chunk.end - chunk.start))
        for v in out.verify:
            adapters.extend([v.seq.adapter] * len(v.tokens))
        return adapters

    def _prefill_segments(self, spans: list[tuple[int, int, int, int]]) -> tuple[PrefillSegment, ...]:
        """One segment per prefill chunk; a chunk past position 0 gets its causal mask over the
        cached keys (query i, at position start+i, sees keys 0..start+i)."""
        return tuple(PrefillSegment(r0, r0 + end - start, slot, start, segment_mask(start, end, self.device))
                     for r0, slot, start, end in spans)

    def _sampling_draws(self, samplers: list[Sequence], ps: list[SamplingParams], rngs: dict) -> tuple:
        """``(uniforms (R,), greedy (R,) bool)`` on the device, in one upload: one draw per sampled
        token from the request's own stream. ``(None, None)`` when every row is greedy; ``greedy``
        is None when no row is."""
        if all(p.greedy for p in ps):
            return None, None
        R = len(samplers)
        u = [0.0 if p.greedy else rngs[s.request_id].random() for s, p in zip(samplers, ps)]
        self.last_draws = (samplers, u)
        g = [p.greedy for p in ps]
        floats = self._upload(u + [float(x) for x in g], torch.float32)
        return floats[:R], (floats[R:] > 0.5) if any(g) else None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Project final hidden states ``(R, C)`` onto the vocabulary: ``(R, V)``."""
        return self.weights.head(hidden.size(0))(hidden)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, params: dict[str, SamplingParams], rngs: dict) -> tuple:
        """Run one step: ``(samplers, token_ids, logprobs)``, the latter two on the host."""
        self.last_draws = None  # (samplers, uniforms) once drawn: a failed step replays them
        step = self.prepare(out, params, rngs)
        masks = self._begin_masks(step, out)  # large ones filled on a worker thread while the forward runs
        try:
            return self._execute(out, params, step, masks)
        except BaseException:
            if masks is not None:  # the filler walks the matchers: let it finish before anyone else does
                masks.wait()
            raise

    def _execute(self, out: SchedulerOutput, params: dict[str, SamplingParams], step: StepInputs, masks) -> tuple:
        layers = self.weights.layers(step.tokens.size(0))
        if step.adapters is None:
            hidden = self.model.forward_cached(step.tokens, step.batch, self.k_layers, self.v_layers, layers)
        else:  # this (the step) thread's rows, one adapter each, for this forward only
            self.bank.route(step.adapters)
            try:
                hidden = self.model.forward_cached(step.tokens, step.batch, self.k_layers, self.v_layers, layers)
            finally:
                self.bank.route(None)
        if any(params[c.seq.request_id].prompt_logprobs is not None for c in out.prefill):
            self._prompt_logprobs.update(prompt_logprobs.compute(self.logits, hidden, out, params))
        self.verify_logits, self.verify_masked = [], None
        if out.verify:  # the verify segments are the last rows: their logits, all in one head call
            n_verify = sum(len(v.tokens) for v in out.verify)
            hidden, verify_hidden = hidden[:hidden.size(0) - n_verify], hidden[hidden.size(0) - n_verify:]
            if not step.samplers:
                self._keep_verify_logits(out, self.logits(verify_hidden).float(), masks)
                return [], [], None
        if not step.samplers:
            return [], [], None
        R = len(step.samplers)
        hidden = hidden[:R] if step.rows is None else hidden.index_select(0, step.rows)  # (R, C)
        if out.verify:
            logits = self.logits(torch.cat([hidden, verify_hidden])).float()
            self._keep_verify_logits(out, logits[R:], masks)
            logits = logits[:R]
        else:
            logits = self.logits(hidden).float()  # (R, V)
        ids, lp = self.sample(logits, step, masks)
        return step.samplers, ids, lp

    def _keep_verify_logits(self, out: SchedulerOutput, logits: torch.Tensor, masks) -> None:
        """Split the verify rows' logits per chunk, raw and (constrained chunks) grammar-masked."""
        sizes = [len(v.tokens) for v in out.verify]
        self.verify_logits = list(logits.split(sizes))
        if masks is not None and masks.verify_rows:
            self.verify_masked = list(masks.apply_verify(logits).split(sizes))

    def _begin_masks(self, step: StepInputs, out: SchedulerOutput):
        """The structured-output masks of this step's constrained rows (None: no row is)."""
        if self.constraints is None or not self.constraints.active or not (step.samplers or out.verify):
            return None
        return self.constraints.begin_masks([s.request_id for s in step.samplers],
                                            [(v.seq.request_id, v.draft) for v in out.verify])

    def take_prompt_logprobs(self) -> dict:
        """The prompt log-probabilities the steps since the last call computed, by request id
        (:mod:`lmcore.engine.prompt_logprobs`); empty for requests that asked for none."""
        found, self._prompt_logprobs = self._prompt_logprobs, {}
        return found

    def sample(self, logits: torch.Tensor, step: StepInputs, masks=None):
        """Penalties, structured-output masks (``masks``: their rows only), greedy/temperature/
        top-k/top-p choice, log-probabilities (of the raw logits: pre-mask); one host sync."""
        ps, slot_t = step.params, step.slots
        raw = logits
        penalised = self.seen is not None and any(p.uses_penalties for p in ps)
        if penalised:
            logits = apply_penalties(logits, self.seen[slot_t], self.counts[slot_t], self.repetition[slot_t],
                                     self.presence[slot_t], self.frequency[slot_t])
        if masks is not None:
            logits = masks.apply(logits)
        best, ids = logits.max(-1)  # (R,) greedy; first maximum on ties, like argmax, ~3x faster on CPU
        if step.uniforms is not None:
            k_max = max(p.top_k for p in ps)
            any_top_p = any(p.top_p < 1.0 for p in ps)
            probs = logits_to_probs(
                logits, self.temperature[slot_t], self.top_k[slot_t] if k_max else None,
                self.top_p[slot_t] if any_top_p else None, k_max=k_max,
            )
            choice = sample_from_probs(probs, step.uniforms)
            ids = choice if step.greedy is None else torch.where(step.greedy, ids, choice)
        # A masked row's -inf entries are refused tokens: its allowed ones are raw logits, so a row
        # without a finite maximum still means the model's own logits were not finite there.
        ids = flag_unusable_rows(ids, best, raw if penalised else None)
        safe = ids.clamp(min=0)  # flagged rows (-1/-2) index token 0 below; the engine fails them
        if penalised:
            self.counts.index_put_((slot_t, safe), (ids >= 0).to(self.counts.dtype), accumulate=True)
            self.seen[slot_t, safe] |= ids >= 0
        n_lp = max(p.logprobs for p in ps)
        if n_lp:
            chosen, values, top_ids = top_logprobs(raw, safe, n_lp)
            packed = torch.cat([ids.double()[:, None], chosen.double()[:, None], values.double(),
                                top_ids.double()], dim=1).tolist()  # the step's one host sync
            ids_list = [int(r[0]) for r in packed]
            return ids_list, ([r[1] for r in packed], [r[2:2 + n_lp] for r in packed],
                              [[int(i) for i in r[2 + n_lp:]] for r in packed])
        return ids.tolist(), None  # the step's one host sync
