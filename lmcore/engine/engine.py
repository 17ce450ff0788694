"""The continuous-batching engine: ``step()`` = schedule, run the model once, emit outputs.

Layers, as in vLLM: the :class:`~lmcore.engine.scheduler.Scheduler` decides who runs (token counts only,
no model); the :class:`~lmcore.engine.runner.ModelRunner` owns the weights, the KV cache and the prefix
pool and turns the decision into one forward pass plus sampling; the :class:`Engine` keeps each
request's generation state (text, stop strings, log-probabilities) and emits :class:`StepOutput`.
The asyncio front end is :class:`lmcore.engine.async_engine.AsyncEngine` (it imports this module,
never the other way). No transport here.

Context policy: a request needs ``len(prompt) + max_tokens <= max_seq_len`` (the model's context
unless capped lower); anything longer is refused with a ``ValueError`` naming both numbers, never
silently truncated (truncating a prompt silently changes what is asked). The rule is written once,
in :func:`check_context`; :meth:`Engine.check_request` runs every check of a request, and services
call it (or :func:`check_context`) rather than restating them.

Batch invariance: each request owns its random stream (see :mod:`lmcore.engine.sampling`), so a seeded
request samples the same tokens alone or in any batch *as long as its logits are the same*. They
are the same up to float rounding: a BLAS matrix product's result for one row can depend on how
many rows are in the product (MKL switches kernels and blocking with the row count; measured on
this CPU: a row computed alone differs in the last bits from the same row in a batch of 2-15, and
again from 16 on). A token can therefore differ only where two candidates are within ~1e-6 of each
other (a near tie in greedy decoding, or the uniform landing within ~1e-6 of a CDF boundary when
sampling). ``bench/generate.py`` measures that divergence rate on GPT-2-small-shaped weights and
the test suite checks a 16-request mixed batch token for token. Exact invariance would need
batch-invariant matmul kernels (fixed reduction order whatever the batch), which PyTorch lacks.
"""

from __future__ import annotations

import itertools
import operator
import time
import uuid
from dataclasses import dataclass, replace

import torch

from lmcore.model.gpt import GPT

from .confinement import execute_each, unusable_error
from .constraints import Constraints, constraint_of
from .outputs import StepOutput
from .prefix_cache import PrefixCache
from .prompt_logprobs import PromptLogprobs
from .runner import ModelRunner
from .sampling import SamplingParams, TokenLogprob
from .scheduler import Scheduler, Sequence
from .speculative import DraftModel, Speculator
from .stats import RequestClock, StatsListener, StepStats
from .text_stream import TextStream


class EngineOverloaded(RuntimeError):
    """The waiting queue is full: retry later (a service maps this to RESOURCE_EXHAUSTED)."""


@dataclass(eq=False)
class _Generation:
    """The engine's per-request state beyond the scheduler's token counts."""

    seq: Sequence
    params: SamplingParams
    rng: object
    text: TextStream | None
    clock: RequestClock  # arrival, admission, first token: for the stats listener
    adapter: str | None = None  # the adapter's name as the request gave it


@dataclass(frozen=True)
class EngineConfig:
    """How an :class:`Engine` is sized and what it enables: the one source of truth for its knobs.

    Args:
        max_batch_size: KV-cache slots, i.e. the most sequences decoding at once.
        max_waiting: how many requests may wait for a slot once all slots are taken; beyond it
            :meth:`Engine.add_request` raises :class:`EngineOverloaded`.
        prefill_chunk_size: prompt tokens computed per step, shared by all prefilling requests.
            Smaller keeps the time per token of running streams steadier (a step's cost grows
            with its prompt tokens), larger gives a long prompt its first token sooner.
        enable_prefix_cache: reuse keys/values of shared prompt prefixes (see ``prefix_cache``).
        max_seq_len: cap on prompt + generated tokens per request (default: the model's context);
            the KV cache reserves ``max_batch_size * max_seq_len`` positions.
        prefix_cache_tokens: size of the prefix pool in tokens (default: 4 contexts).
        prefix_block_size: tokens per cached prefix block (a prefix is reused in whole blocks).
        eos_id: end-of-text token (default: the tokenizer's, else none).
        prepack_weights: keep contiguous ``(in, out)`` copies of the plain Linear weights and the
            head for fast decode (see :mod:`lmcore.engine.weight_layout`); costs one more copy.
        device, dtype: where and in what precision to run (default: the model's).
        speculation: speculative decoding's default (:mod:`lmcore.engine.speculative`): ``"off"``
            (here: a step is one token per request, as library callers expect; the inference
            service defaults to ``"auto"``), ``"auto"`` (prompt lookup for greedy requests),
            ``"prompt_lookup"`` or ``"draft"``; a request's ``SamplingParams.speculation`` overrides it.
        speculative_tokens: most tokens proposed per verify step.
        draft_model: a smaller GPT with the same vocabulary, for ``"draft"`` speculation.
        draft_min_confidence: a draft's proposal stops before the first token it gives less
            probability than this (:class:`lmcore.engine.speculative.DraftModel`); 0 = never.
    """

    max_batch_size: int = 16
    max_waiting: int = 64
    prefill_chunk_size: int = 256
    enable_prefix_cache: bool = True
    max_seq_len: int | None = None
    prefix_cache_tokens: int | None = None
    prefix_block_size: int = 16
    eos_id: int | None = None
    prepack_weights: bool = True
    device: str | torch.device | None = None
    dtype: torch.dtype | None = None
    speculation: str = "off"
    speculative_tokens: int = 8
    draft_model: GPT | None = None
    draft_min_confidence: float = 0.5

    def __post_init__(self):
        for name in ("max_batch_size", "prefill_chunk_size", "prefix_block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {self.max_waiting}")
        if self.max_seq_len is not None and self.max_seq_len < 1:
            raise ValueError(f"max_seq_len must be >= 1 (or None for the model's context), got {self.max_seq_len}")


class Engine:
    """Serve many generation requests at once, one :meth:`step` at a time.

    ``Engine(model, EngineConfig(max_batch_size=8), tokenizer=tok)``; keyword overrides of the
    config's fields are accepted too (``Engine(model, max_batch_size=8)``).

    Args:
        model: a :class:`~lmcore.model.GPT` (LoRA-wrapped Linears are fine). Put in eval mode and
            moved to the config's ``device``/``dtype`` when given. Weight layouts the runner copies
            (the output head) are taken now: build a new Engine after changing the weights.
        config: an :class:`EngineConfig` (default: its defaults).
        tokenizer: optional; enables text deltas, stop strings and the end-of-text token.
    """

    def __init__(self, model: GPT, config: EngineConfig | None = None, *, tokenizer=None, **overrides):
        if config is not None and not isinstance(config, EngineConfig):
            raise TypeError(f"Engine's second argument is an EngineConfig, got {type(config).__name__}; "
                            "pass a tokenizer as tokenizer=...")
        config = replace(config or EngineConfig(), **overrides)
        self.config = config
        device = torch.device(config.device) if config.device is not None else model.device
        dtype = config.dtype if config.dtype is not None else model.dtype
        self.model = model.to(device=device, dtype=dtype).eval()
        self.tokenizer = tokenizer
        if config.eos_id is not None:
            self.eos_id = config.eos_id
        else:
            self.eos_id = tokenizer.eos_id if tokenizer is not None else None
        ctx = model.config.block_size
        self.max_seq_len = min(ctx, config.max_seq_len) if config.max_seq_len else ctx
        self.max_waiting = config.max_waiting
        self.prefix_cache: PrefixCache | None = None
        prefix_blocks = 0
        block = config.prefix_block_size
        if config.enable_prefix_cache:
            tokens = config.prefix_cache_tokens if config.prefix_cache_tokens is not None else 4 * self.max_seq_len
            prefix_blocks = max(1, tokens // block)
            self.prefix_cache = PrefixCache(prefix_blocks, block)
        # Structured output: compiled grammars and per-request matchers (lmcore.engine.constraints).
        self.constraints = Constraints(tokenizer, model.config.vocab_size)
        # An engine that speculates by default verifies up to k proposed tokens per sequence a step.
        speculating = config.speculation != "off" or config.draft_model is not None
        max_rows = config.max_batch_size * (1 + config.speculative_tokens) if speculating else None
        self.runner = ModelRunner(self.model, config.max_batch_size, self.max_seq_len, device, dtype,
                                  prefix_blocks, block, config.prepack_weights, constraints=self.constraints,
                                  max_rows=max_rows)
        matcher = self._match_prefix if self.prefix_cache is not None else None
        self.scheduler = Scheduler(config.max_batch_size, config.prefill_chunk_size, matcher)
        draft = None
        if config.draft_model is not None:
            draft = DraftModel(config.draft_model.to(device), model.config.vocab_size, config.max_batch_size,
                               self.max_seq_len, config.draft_min_confidence)
        self.speculator = Speculator(config.speculation, config.speculative_tokens, self.max_seq_len, draft)
        self._gens: dict[str, _Generation] = {}
        self._prompt_lp = PromptLogprobs()  # echo's figures, gathered over a prompt's prefill chunks
        self._ids = itertools.count()
        self._stats = dict(steps=0, tokens_generated=0, prompt_tokens_computed=0, requests_finished=0,
                           requests_aborted=0, requests_failed=0, prefix_cache_query_tokens=0)
        self._stats_listener: StatsListener | None = None

    # --- requests -----------------------------------------------------------------------------
    def add_request(self, prompt_ids: list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, adapter: str | int | None = None) -> str:
        """Queue a request; returns its id. Raises ValueError (bad input) or EngineOverloaded.

        Checks it with :meth:`check_request`. ``adapter``: the name (or index) of a LoRA adapter
        loaded with :meth:`add_adapter`; requests with different adapters share one batch.
        """
        params = params if params is not None else SamplingParams()
        prompt_ids = self.check_request(prompt_ids, params)
        adapter_index = self.runner.adapter_index(adapter)
        # Queued requests first claim the free slots; beyond those, at most max_waiting may wait.
        free_slots = self.scheduler.max_slots - self.scheduler.num_running
        if self.scheduler.num_waiting >= self.max_waiting + free_slots:
            raise EngineOverloaded(
                f"engine overloaded: {self.scheduler.num_running} requests running (all "
                f"{self.scheduler.max_slots} slots) and {self.max_waiting} waiting (max_waiting); retry later"
            )
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}-{uuid.uuid4().hex[:8]}"
        seq = Sequence(request_id, prompt_ids, params.max_tokens, adapter=adapter_index)
        self.scheduler.add(seq)  # raises on a duplicate id
        if params.constrained:
            self.constraints.add(request_id, *constraint_of(params))
        text = TextStream(self.tokenizer.stream_decoder(), params.stop) if self.tokenizer is not None else None
        self._gens[request_id] = _Generation(seq, params, params.make_rng(), text, RequestClock(),
                                             None if adapter is None else str(adapter))
        self._prompt_lp.start(request_id, params)
        return request_id

    def abort(self, request_id: str) -> bool:
        """Drop a request now; its slot is free for the next step. False if it was unknown/finished."""
        gen = self._gens.pop(request_id, None)
        if gen is None:
            return False
        self.scheduler.finish(gen.seq)
        self.constraints.remove(request_id)
        self._prompt_lp.drop(request_id)
        self._stats["requests_aborted"] += 1
        self._request_finished(gen, "aborted")
        return True

    def abort_all(self) -> list[str]:
        """Drop every unfinished request (running or waiting); returns their ids."""
        ids = list(self._gens)
        for rid in ids:
            self.abort(rid)
        return ids

    def check_request(self, prompt_ids, params: SamplingParams) -> list[int]:
        """The checks :meth:`add_request` makes on what it is asked to run, callable beforehand (a
        service checks before it queues anything, so the message reaches the caller unchanged).
        Returns the prompt as a list of ints; raises ValueError naming what is wrong."""
        try:  # ints (numpy's and torch's too), never floats or strings
            prompt_ids = [operator.index(t) for t in prompt_ids]
        except TypeError:
            raise ValueError("prompt_ids must be a list of integer token ids") from None
        if not prompt_ids:
            raise ValueError("the prompt is empty: give at least one token")
        vocab = self.model.config.vocab_size
        bad = next((t for t in prompt_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"prompt token {bad} is outside the vocabulary: this model's ids are 0..{vocab - 1}")
        check_context(len(prompt_ids), params.max_tokens, self.max_seq_len)
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer (the engine was built without one)")
        if params.constrained:  # compiles it (cached): a schema, regex or grammar the library refuses is named here
            self.constraints.compile(*constraint_of(params))
        self.speculator.check(params)
        return prompt_ids

    def check_prompt_text(self, n_chars: int, params: SamplingParams) -> None:
        """Before tokenizing a text prompt of ``n_chars`` characters: ValueError when it cannot
        fit the context with ``params.max_tokens`` (:func:`check_prompt_chars`)."""
        max_token_chars = self.tokenizer.max_token_chars if self.tokenizer is not None else 1
        check_prompt_chars(n_chars, max_token_chars, params.max_tokens, self.max_seq_len)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def num_unfinished(self) -> int:
        return self.scheduler.num_waiting + self.scheduler.num_running

    def load(self, adapter: str | None = None) -> tuple[int, int]:
        """``(running, waiting)`` requests: all of them, or those of one LoRA adapter. Safe to call
        from another thread (a metrics scrape) while the engine steps: it reads a snapshot."""
        if adapter is None:
            return self.scheduler.num_running, self.scheduler.num_waiting
        index = self.runner.adapter_index(adapter)
        return (sum(s.adapter == index for s in list(self.scheduler.running)),
                sum(s.adapter == index for s in list(self.scheduler.waiting)))

    def stats(self) -> dict:
        """Counters since the engine was built and a snapshot of its occupancy; safe to call from
        another thread (a metrics scrape) while the engine steps. ``kv_cache_tokens_used`` counts
        the positions holding keys and values (prefix-cache copies included) out of
        ``kv_cache_tokens_total`` = slots x ``max_seq_len``."""
        pc = self.prefix_cache
        running = list(self.scheduler.running)
        return {
            **self._stats,
            "running": len(running),
            "waiting": self.scheduler.num_waiting,
            "max_batch_size": self.scheduler.max_slots,
            "max_waiting": self.max_waiting,
            "kv_cache_tokens_used": sum(s.num_computed for s in running),
            "kv_cache_tokens_total": self.scheduler.max_slots * self.max_seq_len,
            "kv_cache_bytes": self.runner.cache.nbytes(),
            "prefix_cache_enabled": pc is not None,
            "prefix_cache_queries": pc.queries if pc is not None else 0,
            "prefix_cache_hits": pc.hits if pc is not None else 0,
            "prefix_cache_hit_tokens": pc.hit_tokens if pc is not None else 0,
            "prefix_cache_blocks_used": len(pc) if pc is not None else 0,
            "prefix_cache_blocks_total": pc.num_blocks if pc is not None else 0,
            "spec_decode_steps": self.speculator.steps,
            "spec_proposed_tokens": self.speculator.proposed,
            "spec_accepted_tokens": self.speculator.accepted,
            "spec_draft_forwards": self.speculator.draft.forwards if self.speculator.draft is not None else 0,
        }

    def set_stats_listener(self, listener: StatsListener | None) -> None:
        """Report every step and every finished request to ``listener`` (see :mod:`lmcore.engine.stats`);
        None stops reporting. Its callbacks run on the stepping thread."""
        self._stats_listener = listener

    def _request_finished(self, gen: _Generation, reason: str) -> None:
        if self._stats_listener is not None:
            seq = gen.seq
            self._stats_listener.on_request_finished(gen.clock.finished(
                seq.request_id, gen.adapter, reason, seq.prompt_len, seq.num_cached_prefix, len(seq.output_ids)))

    # --- the step -----------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        """Schedule, run the model once over every scheduled token, emit what was generated."""
        started = time.perf_counter()
        plan = self.scheduler.schedule()
        if plan.is_empty:
            return []
        for seq in plan.admitted:
            self._gens[seq.request_id].clock.admitted = started
            self.runner.admit(seq, self._gens[seq.request_id].params)
        params = {s.request_id: self._gens[s.request_id].params for s in plan.decode}
        rngs = {s.request_id: self._gens[s.request_id].rng for s in plan.decode}
        for chunk in plan.prefill:
            rid = chunk.seq.request_id
            params[rid], rngs[rid] = self._gens[rid].params, self._gens[rid].rng
        # speculating decodes move to plan.verify, a constrained one's proposal cut at the first token its grammar refuses
        self.speculator.propose(plan, params, rngs, self.constraints.allowed_prefix)
        try:
            samplers, token_ids, logprobs = self.runner.execute(plan, params, rngs)
            failures = {}
        except Exception:  # confine it: re-run request by request, fail only those that fail again
            self.speculator.restore(plan)
            samplers, token_ids, logprobs, failures = execute_each(self.runner, plan, params, rngs)
        outputs = [self._fail(rid, RuntimeError(f"generation failed: {type(e).__name__}: {e}"))
                   for rid, e in failures.items()]
        if failures:
            plan.prefill = [c for c in plan.prefill if c.seq.request_id not in failures]
            plan.decode = [s for s in plan.decode if s.request_id not in failures]
        prompt_figures = self.runner.take_prompt_logprobs()
        if prompt_figures:
            self._prompt_lp.add(prompt_figures)
        self.scheduler.advance(plan)
        self._stats["steps"] += 1
        self._stats["prompt_tokens_computed"] += sum(c.end - c.start for c in plan.prefill)
        if self.prefix_cache is not None:
            for chunk in plan.prefill:
                new_blocks = self.prefix_cache.insert(chunk.seq.prompt_ids, chunk.end, namespace=-2 - chunk.seq.adapter)
                if new_blocks:
                    self.runner.save_prefix_blocks(chunk.seq, new_blocks)
        for i, (seq, tok) in enumerate(zip(samplers, token_ids)):
            if tok < 0:  # no usable distribution for this row (see confinement): it fails alone
                outputs.append(self._fail(seq.request_id, unusable_error(tok, self._gens[seq.request_id].params)))
                continue
            lp = None
            if logprobs is not None and self._gens[seq.request_id].params.logprobs:
                n = self._gens[seq.request_id].params.logprobs
                chosen, values, ids = logprobs
                lp = [TokenLogprob(tok, chosen[i], list(zip(ids[i][:n], values[i][:n])))]
            outputs.append(self._append(seq, tok, lp))
        masked = self.runner.verify_masked or [None] * len(plan.verify)
        outputs += [self._emit_verified(chunk, logits, m)
                    for chunk, logits, m in zip(plan.verify, self.runner.verify_logits, masked)]
        if self._stats_listener is not None:
            n_verify = sum(len(v.tokens) for v in plan.verify)  # speculating decodes: their fed tokens
            self._stats_listener.on_step(StepStats(len(plan.decode) + len(plan.prefill) + len(plan.verify),
                                                   len(plan.decode) + n_verify,
                                                   plan.num_tokens - len(plan.decode) - n_verify,
                                                   time.perf_counter() - started))
        return outputs

    def _emit_verified(self, chunk, logits, masked) -> StepOutput:
        """A verify step's kept tokens, appended one by one (stop strings, eos, max_tokens and the
        grammar's end stop the request at the exact token; a constrained request's matcher advances
        by exactly these), as one StepOutput; the cache keeps only what was fed and kept.
        ``masked``: the logits under the request's grammar (None: unconstrained)."""
        seq, gen = chunk.seq, self._gens[chunk.seq.request_id]
        tokens, lps = self.speculator.verify(chunk, logits, gen.params, gen.rng, masked)
        self.scheduler.accept(seq, len(tokens))  # the fed last token + the accepted draft tokens
        merged = None
        for i, tok in enumerate(tokens):
            lp = None
            if lps is not None:
                n = gen.params.logprobs
                lp = [TokenLogprob(tok, lps[0][i], list(zip(lps[2][i][:n], lps[1][i][:n])))]
            out = self._append(seq, tok, lp)
            if merged is None:
                merged = out
            else:
                merged.new_token_ids += out.new_token_ids
                merged.text += out.text
                merged.logprobs = merged.logprobs + out.logprobs if lp is not None else None
                merged.finished, merged.finish_reason = out.finished, out.finish_reason
                merged.completion_tokens = out.completion_tokens
            if out.finished:
                break
        return merged

    def _append(self, seq: Sequence, tok: int, lp) -> StepOutput:
        gen = self._gens[seq.request_id]
        if seq.max_tokens == 0:  # it only scores its prompt: the token its prefill gave is not kept
            return self._finish_scored(seq, gen)
        grammar_ended = False
        if gen.params.constrained:  # advance its matcher; a token it refuses fails the request alone
            try:
                grammar_ended = self.constraints.accept(seq.request_id, tok)
            except ValueError as e:
                return self._fail(seq.request_id, RuntimeError(f"generation failed: {e}"))
        if not seq.output_ids:
            gen.clock.first_token = time.perf_counter()
        seq.output_ids.append(tok)
        self._stats["tokens_generated"] += 1
        reason = None
        is_eos = tok == self.eos_id and not gen.params.ignore_eos
        if grammar_ended:  # the output is a complete string of the constraint: "stop", like a stop string
            reason, is_eos = "stop", tok == self.eos_id
        delta = ""
        if gen.text is not None and not is_eos:
            delta = gen.text.push(tok)
            if gen.text.stopped:
                reason = "stop"
        if reason is None and is_eos:
            reason = "eos"
        if reason is None and len(seq.output_ids) >= seq.max_tokens:
            reason = "length"
        if reason is not None:
            if gen.text is not None and (reason != "stop" or not gen.text.stopped):
                delta += gen.text.finish()
            self._finish(seq, gen, reason)
        prompt_lp = self._prompt_lp.take(seq.request_id) if len(seq.output_ids) == 1 else None
        return StepOutput(seq.request_id, [tok], delta, reason is not None, reason, lp,
                          seq.prompt_len, len(seq.output_ids), prompt_logprobs=prompt_lp)

    def _finish_scored(self, seq: Sequence, gen) -> StepOutput:
        """End a ``max_tokens=0`` request after its prefill: its prompt figures, no tokens, "length"
        (so a prompt may fill the whole context: nothing after it is ever fed)."""
        self._finish(seq, gen, "length")
        return StepOutput(seq.request_id, [], "", True, "length", None, seq.prompt_len, 0,
                          prompt_logprobs=self._prompt_lp.take(seq.request_id))

    def _finish(self, seq: Sequence, gen, reason: str) -> None:
        """A request ended normally: its slot, matcher and bookkeeping go."""
        self.scheduler.finish(seq)
        self.constraints.remove(seq.request_id)
        del self._gens[seq.request_id]
        self._stats["requests_finished"] += 1
        self._request_finished(gen, reason)

    def _fail(self, request_id: str, error: Exception) -> StepOutput:
        """End one request with ``error`` (finish_reason "error"); the rest of the batch goes on."""
        gen = self._gens.pop(request_id)
        self.scheduler.finish(gen.seq)
        self.constraints.remove(request_id)
        self._prompt_lp.drop(request_id)
        self._stats["requests_failed"] += 1
        self._request_finished(gen, "error")
        return StepOutput(request_id, [], "", True, "error", None, gen.seq.prompt_len, len(gen.seq.output_ids),
                          error=error)

    def _match_prefix(self, seq: Sequence) -> tuple[int, list[int]]:
        if PromptLogprobs.wants_all_positions(self._gens[seq.request_id].params):
            return 0, []  # its prompt figures need every position computed
        rows = self.prefix_cache.match(seq.prompt_ids, namespace=-2 - seq.adapter)
        self._stats["prefix_cache_query_tokens"] += seq.prompt_len
        return len(rows) * self.prefix_cache.block_size, rows

    # --- LoRA adapters ------------------------------------------------------------------------
    def add_adapter(self, name: str, adapter_dir) -> int:
        """Load a LoRA adapter directory into the runner's bank (:class:`lmcore.lora.LoRABank`);
        requests then name it with ``add_request(..., adapter=name)`` and share batches with the
        base and other adapters.

        The first adapter creates the bank: it wraps the model's projections in place and the
        runner's fast weight layouts, so the base GEMMs keep them. Call it between steps
        (``AsyncEngine.add_adapter`` does). Returns the adapter's index; a name already loaded
        returns its index again.
        """
        return self.runner.add_adapter(name, adapter_dir)

    def remove_adapter(self, name: str) -> None:
        """Unload an adapter (between steps), freeing its tensors; refused (ValueError) while a
        request still uses it. Its index is never reused, so its prefix blocks just age out."""
        index = self.runner.adapter_index(name)
        if any(g.seq.adapter == index for g in self._gens.values()):
            raise ValueError(f"adapter {name!r} is still in use by unfinished requests")
        self.runner.remove_adapter(name)

    def adapters(self) -> list[str]:
        """The LoRA adapters loaded, in the order they were added."""
        return self.runner.adapters()

    def adapter_parameters(self, name: str) -> int:
        """How many numbers adapter ``name`` adds to the base model (its A and B as loaded)."""
        return self.runner.adapter_parameters(name)

    def use_adapter(self, adapter: str | None):
        """Context manager: this thread's plain ``engine.model(...)`` calls go through ``adapter``
        (None: the base alone); the engine's own batches (on their step thread) are unaffected."""
        return self.runner.use_adapter(adapter)


def check_prompt_chars(n_chars: int, max_token_chars: int, max_tokens: int, max_seq_len: int) -> None:
    """The context rule for text not yet tokenized: ``n_chars`` characters are at least
    ``ceil(n_chars / max_token_chars)`` tokens (``Tokenizer.max_token_chars``), so a text that
    cannot fit is refused before any tokenizing (a 32 MiB prompt costs nothing). ValueError."""
    at_least = -(-n_chars // max(1, max_token_chars))
    if at_least + max_tokens > max_seq_len:
        raise ValueError(
            f"text of {n_chars} characters is at least {at_least} tokens, which with max_tokens {max_tokens} "
            f"exceeds the context of {max_seq_len} tokens: shorten it or lower max_tokens"
        )


def check_context(n_prompt: int, max_tokens: int, max_seq_len: int) -> None:
    """The context rule: a request needs ``prompt + max_tokens <= max_seq_len``; ValueError otherwise."""
    if n_prompt + max_tokens > max_seq_len:
        raise ValueError(
            f"prompt of {n_prompt} tokens + max_tokens {max_tokens} = {n_prompt + max_tokens} exceeds "
            f"the context of {max_seq_len} tokens: shorten the prompt or lower max_tokens"
        )
