"""InferenceHandler: protobuf in, lmcore (Engine, FewShotPrompt, score), protobuf out.

No transport code: the gRPC servicer and a Ray Serve deployment call the same methods. Each served
full model has its own ``lmcore.Engine`` (continuous batching over a KV cache) driven by an
``AsyncEngine`` background thread. A LoRA adapter from the model store whose base model is served
gets no engine of its own: it is loaded into the base engine's adapter bank
(``Engine.add_adapter``, ``lmcore.lora.LoRABank``) and its requests run in the base's batches with
``adapter=<name>``, beside the base's own requests and other adapters' (S-LoRA, LoRAX); the prefix
cache stays per adapter. When its directory leaves the store, the next refresh unloads it from the
bank (once no request uses it). An adapter whose base is not served is loaded on its own
(``lmcore.lora.load_adapter_model``).
``complete_stream`` yields a chunk per engine output as it is produced, and ``complete`` is the
same stream gathered. When the consumer stops early (client cancel, deadline, disconnect), closing
the stream aborts the engine request, which frees its slot before the next step.

Validation policy: lmcore owns the rules of what it executes and the handler asks it. Sampling
fields and stop strings are checked by ``lmcore.SamplingParams`` (a pydantic ``ValidationError``:
``INVALID_ARGUMENT``), the prompt's token ids and prompt + max_tokens against the context by
``Engine.check_request`` before anything is queued (its ``ValueError``: ``INVALID_ARGUMENT``, the
message naming both numbers; a structured-output constraint is compiled there, so a bad schema,
regex or grammar is named before anything is queued), prompt styles by ``FewShotPrompt``. The handler checks only what is
about the request's form: an empty prompt, both prompt forms at once, Score's choices.

Tenants (``services.tenants``): a fine-tuned model in the store belongs to the tenant whose job
published it. ListModels shows the configured models plus the caller's own; naming another
tenant's model is ``NOT_FOUND`` with the message an unknown name gets (its list: the caller's
models only). Every generation request is admitted by ``services.quotas.RequestQuotas``
(concurrent_requests, tokens_per_minute) and charged its tokens when it ends. DeleteModel unloads
one of the caller's fine-tuned models and removes it from the store.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from services import tenants
from services.config import InferenceSettings
from services.errors import InvalidArgument
from services.gen.lmstack.v1 import common_pb2
from services.gen.lmstack.v1 import inference_pb2 as pb
from services.limits import BoundedExecutor, offload
from services.metrics import InferenceMetrics
from services.models import Entry, ModelRegistry, ModelSpec, parse_model_specs, resolve_base
from services.quotas import RequestQuotas

from . import inspection

log = logging.getLogger("lmstack.inference")

if TYPE_CHECKING:  # lmcore is imported when a model loads, not when the service module does
    from lmcore import GPT, AsyncEngine, Engine, SamplingParams, Tokenizer, TokenLogprob

SAMPLING_FIELDS = ("max_tokens", "temperature", "top_k", "top_p", "repetition_penalty",
                   "presence_penalty", "frequency_penalty", "seed", "logprobs", "ignore_eos", "speculation",
                   "speculative_tokens")
FLOAT_FIELDS = {"temperature", "top_p", "repetition_penalty", "presence_penalty", "frequency_penalty"}
CONSTRAINT_FIELDS = ("json_schema", "json_object", "regex", "grammar")  # structured output (+ repeated choice)


# --- loading ---------------------------------------------------------------------------------------
@dataclass
class ServedModel:
    """One model as served: weights, tokenizer, its engine and the engine's asyncio driver.

    For an adapter in a base model's bank, ``model``, ``engine`` and ``async_engine`` are the
    base's (shared, not owned) and ``adapter`` is the name requests pass to the engine.
    """

    name: str
    model: GPT
    tokenizer: Tokenizer
    engine: Engine
    async_engine: AsyncEngine | None = None
    adapter: str | None = None  # the adapter's name in the base engine's LoRA bank
    base: str = ""  # the served base model's name, for a banked adapter
    parameters: int = 0  # 0: the model's own count

    @property
    def context_length(self) -> int:
        return self.model.config.block_size

    @property
    def owns_engine(self) -> bool:
        return self.adapter is None

    def load(self) -> tuple[int, int]:
        """(running, waiting) requests, for the queue gauges: a banked adapter's own, or for a
        model with an engine every request in it (its adapters' too: they share its slots)."""
        return self.engine.load(self.adapter)

    def engine_stats(self) -> dict | None:
        """``Engine.stats()`` of the engine this model owns; None for a banked adapter (its base
        reports the shared engine once)."""
        return self.engine.stats() if self.owns_engine else None


def make_loader(settings: InferenceSettings):
    """The registry loader: a model directory (or store adapter) -> ServedModel with an Engine."""

    def load(spec: ModelSpec, registry: ModelRegistry) -> ServedModel:
        from lmcore import Engine, EngineConfig, load_model

        if spec.is_adapter:
            from lmcore.lora import load_adapter_model

            base = resolve_base(spec, registry)
            if base is not None and base.obj.owns_engine:
                return bank_adapter(spec, base)
            model = load_adapter_model(spec.base_model, spec.path)
        else:
            model = load_model(spec.path, device=settings.device, quantize=settings.quantization_of(spec.name))
        if model.tokenizer is None:
            raise ValueError(f"{spec.path}: no tokenizer files (tokenizer.json or vocab.json + merges.txt); "
                             "save the model with its tokenizer")
        draft = settings.draft_model_of(spec.name)
        config = EngineConfig(max_batch_size=settings.max_batch_size, max_waiting=settings.max_waiting,
                              speculation=settings.speculation, speculative_tokens=settings.speculative_tokens,
                              draft_model=load_model(draft, device=settings.device) if draft else None,
                              draft_min_confidence=settings.draft_min_confidence)
        engine = Engine(model, config, tokenizer=model.tokenizer)
        return ServedModel(spec.name, model, model.tokenizer, engine)

    return load


def bank_adapter(spec: ModelSpec, base: Entry) -> ServedModel:
    """Serve an adapter from its base's engine: load it into the bank (between two steps)."""
    served: ServedModel = base.obj
    served.async_engine.add_adapter(spec.name, spec.path)
    spec.base_model = base.name
    parameters = served.model.num_parameters() + served.engine.adapter_parameters(spec.name)
    return ServedModel(spec.name, served.model, served.tokenizer, served.engine, served.async_engine,
                       adapter=spec.name, base=base.name, parameters=parameters)


def make_starter(settings: InferenceSettings, metrics: InferenceMetrics | None = None):
    """Start each engine's background step thread with ``settings.torch_threads`` intra-op threads
    (reporting its steps and requests to ``metrics`` when given)."""

    async def start(entry: Entry) -> None:
        await start_engine(entry, settings.torch_threads, metrics)

    return start


async def start_engine(entry: Entry, torch_threads: int = 1, metrics: InferenceMetrics | None = None) -> None:
    from lmcore import AsyncEngine

    served: ServedModel = entry.obj
    if metrics is not None:
        metrics.model_loaded(entry.name)
    if not served.owns_engine:  # an adapter in a base's bank: the base's engine is already running
        return
    if metrics is not None:
        served.engine.set_stats_listener(metrics.engine_listener(entry.name))
    served.async_engine = AsyncEngine(served.engine, num_threads=torch_threads)
    served.async_engine.start()


async def stop_engine(entry: Entry, idle_only: bool = False) -> bool:
    """The registry's close hook: unload a banked adapter from its base's bank, or stop a model's
    engine. Returns False ("busy": the registry retries at its next refresh) while requests still
    use the adapter, or, with ``idle_only`` (the model left the store), while the engine has work."""
    served: ServedModel = entry.obj
    if not served.owns_engine:
        try:
            await asyncio.to_thread(served.async_engine.remove_adapter, served.adapter)
        except ValueError:  # unfinished requests use it
            return False
        return True
    if served.async_engine is not None:
        if idle_only and served.engine.load() != (0, 0):
            return False
        await asyncio.to_thread(served.async_engine.stop)
    return True


def inference_registry(settings: InferenceSettings, metrics: InferenceMetrics | None = None,
                       autoload_store: bool = True) -> ModelRegistry:
    """The models to serve; ``autoload_store=False`` for a replica that loads fine-tunes on demand."""
    return ModelRegistry(parse_model_specs(settings.models), make_loader(settings), settings.default_model,
                         settings.model_store, start_entry=make_starter(settings, metrics), close_entry=stop_engine,
                         refresh_interval_s=settings.store_refresh_interval_s, autoload_store=autoload_store,
                         max_loaded_store_models=settings.max_loaded_models)


# --- protobuf <-> lmcore ---------------------------------------------------------------------------
def sampling_params(sp: common_pb2.SamplingParams, extra_stop: list[str] | tuple = (),
                    prompt_logprobs: int | None = None) -> SamplingParams:
    """``lmstack.v1.SamplingParams`` -> ``lmcore.SamplingParams``; unset fields keep lmcore's defaults.

    lmcore validates every field (stop strings included: at most ``lmcore.engine.MAX_STOP_STRINGS``,
    none empty); its ``ValidationError`` becomes ``INVALID_ARGUMENT`` naming the field.
    ``prompt_logprobs``: CompleteRequest's (a request field, not a sampling one, on the wire)."""
    from lmcore import SamplingParams

    kw: dict[str, Any] = {} if prompt_logprobs is None else {"prompt_logprobs": prompt_logprobs}
    for f in SAMPLING_FIELDS:
        if sp.HasField(f):
            v = getattr(sp, f)
            # float32 on the wire: 0.7 arrives as 0.699999988; give lmcore the number the user wrote.
            kw[f] = float(f"{v:.7g}") if f in FLOAT_FIELDS else v
    stops = list(sp.stop)
    if stops or extra_stop:
        kw["stop"] = stops + [s for s in extra_stop if s not in stops]
    for f in CONSTRAINT_FIELDS:
        if sp.HasField(f):
            kw[f] = getattr(sp, f)
    if sp.choice:
        kw["choice"] = list(sp.choice)
    return SamplingParams(**kw)


async def check_request(served: ServedModel, ids: list[int], params: SamplingParams) -> list[int]:
    """``Engine.check_request`` before queueing; a constrained request's check compiles its grammar
    (ms, more for a large schema; the first one also imports the library), so it runs in a worker
    thread, never on the event loop. The compiled grammar is cached for the request to reuse."""
    if params.constrained:
        return await asyncio.to_thread(served.engine.check_request, ids, params)
    return served.engine.check_request(ids, params)


def _token_text(tokenizer: Tokenizer, token_id: int) -> str:
    return tokenizer.token_bytes(token_id).decode("utf-8", errors="replace")


def logprobs_pb(items: list[TokenLogprob], tokenizer: Tokenizer) -> list[common_pb2.TokenLogprob]:
    """lmcore's per-token log-probabilities -> ``TokenLogprob`` messages (``top``: (id, logprob) pairs)."""
    return [common_pb2.TokenLogprob(
        token_id=item.token_id, token=_token_text(tokenizer, item.token_id), logprob=item.logprob,
        top_logprobs=[common_pb2.TopLogprob(token_id=i, token=_token_text(tokenizer, i), logprob=lp)
                      for i, lp in item.top]) for item in items]


def prompt_logprobs_pb(items: list, prompt_ids: list[int], tokenizer: Tokenizer) -> list[common_pb2.TokenLogprob]:
    """The engine's prompt figures (None first) -> one ``TokenLogprob`` per prompt token; the first
    carries its id and text only."""
    first = common_pb2.TokenLogprob(token_id=prompt_ids[0], token=_token_text(tokenizer, prompt_ids[0]))
    return [first, *logprobs_pb(items[1:], tokenizer)]


def complete_params(req: pb.CompleteRequest) -> SamplingParams:
    """A CompleteRequest's ``lmcore.SamplingParams``; ``max_tokens`` 0 with ``prompt_logprobs``
    only scores the prompt (lmcore's rule)."""
    has_plp = req.HasField("prompt_logprobs")
    return sampling_params(req.sampling, prompt_logprobs=req.prompt_logprobs if has_plp else None)


def model_info(entry: Entry) -> pb.ModelInfo:
    served: ServedModel = entry.obj
    cfg = served.model.config
    return pb.ModelInfo(name=entry.name, context_length=cfg.block_size, vocab_size=cfg.vocab_size,
                        parameters=served.parameters or served.model.num_parameters(), n_layer=cfg.n_layer, n_head=cfg.n_head,
                        n_embd=cfg.n_embd, is_default=entry.is_default, source=entry.spec.source,
                        base_model=entry.spec.base_model, tenant=entry.spec.owner)


def unloaded_model_info(spec: ModelSpec) -> pb.ModelInfo | None:
    """A store model not loaded yet (it loads on first use), from its config; None if unreadable."""
    from lmcore import GPTConfig

    try:
        cfg = GPTConfig.from_json_file(spec.path / "config.json")
    except (OSError, ValueError, TypeError):
        return None
    return pb.ModelInfo(name=spec.name, context_length=cfg.block_size, vocab_size=cfg.vocab_size,
                        n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, source=spec.source,
                        tenant=spec.owner)


# --- the handler -----------------------------------------------------------------------------------
class InferenceHandler:
    """Complete, CompleteStream, FewShot, Score, Inspect and ListModels over the registry's engines.

    ``settings``: the server's limits (``InferenceSettings``: Score's and FewShot's bounds, the
    message limit Inspect's responses must fit, the worker threads' torch threads).
    """

    def __init__(self, registry: ModelRegistry, metrics: InferenceMetrics | None = None,
                 settings: InferenceSettings | None = None, quotas: RequestQuotas | None = None):
        self.registry = registry
        self.quotas = quotas if quotas is not None else RequestQuotas()  # per tenant (services.quotas)
        self.metrics = metrics
        self.limits = settings if settings is not None else InferenceSettings()
        self.max_message_bytes = self.limits.max_message_bytes
        self.inspector = inspection.InspectRunner(self.limits.torch_threads,
                                                    self.limits.inspect_max_waiting)
        self._score_pool: BoundedExecutor | None = None  # made on the first Score (its threads start then)
        self._chat_templates: dict = {}  # model name -> lmcore ChatTemplate or None (chat_template)

    @property
    def default_model(self) -> str:
        return self.registry.default

    def close(self) -> None:
        self.inspector.close()
        if self._score_pool is not None:
            self._score_pool.shutdown()

    async def _served(self, model: str) -> tuple[str, ServedModel]:
        """The model the caller names, if its tenant may use it (another's is NOT_FOUND)."""
        tenant = tenants.current()
        entry = self.registry.lookup(model)
        if entry is None or not tenant.owns(entry.spec.owner):
            entry = await self.registry.get(model, tenant)
        return entry.name, entry.obj

    @staticmethod
    async def _prompt_ids(req: pb.CompleteRequest, served: ServedModel, params: SamplingParams) -> list[int]:
        """The request's prompt as token ids, refused before any work when it cannot fit the
        context (the engine's rules: ``check_context`` on the id count, ``check_prompt_text`` on
        the characters); a long text is tokenized off the event loop."""
        from lmcore.engine import check_context

        if req.prompt and req.prompt_token_ids:
            raise InvalidArgument("give either prompt or prompt_token_ids, not both")
        if req.prompt_token_ids:
            check_context(len(req.prompt_token_ids), params.max_tokens, served.engine.max_seq_len)
            return list(req.prompt_token_ids)
        if not req.prompt:
            raise InvalidArgument("prompt is empty: give prompt text or prompt_token_ids")
        served.engine.check_prompt_text(len(req.prompt), params)
        special = {"allowed_special": "all"} if req.allow_special else {}
        return await offload(served.tokenizer.encode, req.prompt, size=len(req.prompt), **special)

    def _record(self, name: str, start: float, first: float | None, n_prompt: int, n: int, finished: bool) -> None:
        if self.metrics is None:
            return
        if finished:
            self.metrics.finished(name, start, first, time.perf_counter(), n_prompt, n)
        else:
            self.metrics.aborted.labels(name).inc()

    async def _generate(self, name: str, served: ServedModel, ids: list[int], params) -> AsyncIterator:
        """The engine's outputs for one request, with metrics; closing it early aborts the request."""
        start, first, n, finished = time.perf_counter(), None, 0, False
        ticket = self.quotas.admit(tenants.current(), len(ids))
        try:
            async with aclosing(served.async_engine.stream(ids, params, adapter=served.adapter)) as outputs:
                async for out in outputs:
                    if out.new_token_ids and first is None:
                        first = time.perf_counter()
                    n += len(out.new_token_ids)
                    finished = out.finished
                    yield out
        finally:
            ticket.release(n)
            self._record(name, start, first, len(ids), n, finished)

    async def complete_stream(self, req: pb.CompleteRequest) -> AsyncIterator[pb.CompleteChunk]:
        """One chunk per engine output: a token per step while the client keeps up, everything
        produced meanwhile (merged by the AsyncEngine) once it falls behind.

        The per-output path is kept lean (profiled: it runs once per token per stream at full
        speed): the engine stream is consumed directly, without the generic ``_generate`` layer."""
        name, served = await self._served(req.model)
        params = complete_params(req)
        ids = await check_request(served, await self._prompt_ids(req, served, params), params)  # vocabulary, context
        n_prompt = len(ids)
        chunk_type = pb.CompleteChunk
        start, first, completion, finished = time.perf_counter(), None, 0, False
        ticket = self.quotas.admit(tenants.current(), n_prompt)
        try:
            async with aclosing(served.async_engine.stream(ids, params, adapter=served.adapter)) as outputs:
                async for out in outputs:
                    new = out.new_token_ids
                    if first is None and new:
                        first = time.perf_counter()
                    completion += len(new)
                    chunk = chunk_type(text=out.text, token_ids=new)
                    if out.logprobs:
                        chunk.logprobs.extend(logprobs_pb(out.logprobs, served.tokenizer))
                    if out.prompt_logprobs is not None:
                        chunk.prompt_logprobs.extend(prompt_logprobs_pb(out.prompt_logprobs, ids, served.tokenizer))
                    if out.finished:
                        finished = True
                        chunk.finish_reason = out.finish_reason or ""
                        usage = chunk.usage
                        usage.prompt_tokens, usage.completion_tokens = n_prompt, completion
                        usage.total_tokens = n_prompt + completion
                    yield chunk
        finally:
            ticket.release(completion)
            self._record(name, start, first, n_prompt, completion, finished)

    async def complete(self, req: pb.CompleteRequest) -> pb.CompleteResponse:
        resp = pb.CompleteResponse(model=req.model or self.registry.default)
        text: list[str] = []
        async with aclosing(self.complete_stream(req)) as chunks:
            async for chunk in chunks:
                text.append(chunk.text)
                resp.token_ids.extend(chunk.token_ids)
                resp.logprobs.extend(chunk.logprobs)
                if chunk.prompt_logprobs:
                    resp.prompt_logprobs.extend(chunk.prompt_logprobs)
                if chunk.finish_reason:
                    resp.finish_reason = chunk.finish_reason
                    resp.usage.CopyFrom(chunk.usage)
        resp.text = "".join(text)
        return resp

    async def few_shot(self, req: pb.FewShotRequest) -> pb.FewShotResponse:
        from lmcore import FewShotPrompt
        from lmcore.engine import check_context

        name, served = await self._served(req.model)
        if not req.query.strip():
            raise InvalidArgument("query is empty: give the input to answer")
        params = sampling_params(req.sampling)
        limit = self.limits.max_few_shot_examples
        if len(req.examples) > limit:
            raise InvalidArgument(f"too many examples: {len(req.examples)} given, at most {limit}")
        budget = served.engine.max_seq_len - params.max_tokens
        if budget <= 0:  # not even a one-token prompt fits: say so before rendering
            check_context(1, params.max_tokens, served.engine.max_seq_len)

        def render():  # bounded by the budget (FewShotPrompt never tokenizes what cannot fit)
            examples = [(e.input, e.output) for e in req.examples]
            kw = {"style": req.style} if req.style else {}
            return FewShotPrompt(req.instruction, examples, **kw).render(req.query, served.tokenizer, budget)

        size = len(req.instruction) + len(req.query) + sum(len(e.input) + len(e.output) for e in req.examples)
        rendered = await offload(render, size=size)
        stop = [rendered.stop] if isinstance(rendered.stop, str) else list(rendered.stop or ())
        if stop:  # the style's separators come on top of the request's own (at most MAX_STOP_STRINGS)
            params = params.with_extra_stop(stop)
        ids = await check_request(served, rendered.token_ids, params)
        text, n, finish = [], 0, ""
        async with aclosing(self._generate(name, served, ids, params)) as outputs:
            async for out in outputs:
                text.append(out.text or "")
                n += len(out.new_token_ids)
                if out.finished:
                    finish = out.finish_reason or ""
        return pb.FewShotResponse(text="".join(text).strip(), examples_used=rendered.examples_used,
                                  prompt_tokens=len(ids), completion_tokens=n, finish_reason=finish,
                                  prompt=rendered.text, model=name)

    async def score(self, req: pb.ScoreRequest) -> pb.ScoreResponse:
        """Bounded work: at most ``max_score_choices`` choices, each refused before tokenizing when
        it cannot fit the context; tokenizing and the forward passes run on the Score executor
        (``score_threads`` threads, ``score_max_waiting`` queued, then RESOURCE_EXHAUSTED), never
        in the shared default executor nor on the engines' step threads; memory O(tokens)."""
        from lmcore.engine import check_prompt_chars

        name, served = await self._served(req.model)
        n_choices = len(req.choices)
        if not n_choices:
            raise InvalidArgument("choices is empty: give at least one continuation to score")
        if n_choices > self.limits.max_score_choices:
            raise InvalidArgument(f"too many choices: {n_choices} given, at most {self.limits.max_score_choices}")
        choices = list(req.choices)
        if any(c == "" for c in choices):
            raise InvalidArgument("choices must not be empty strings")
        check_prompt_chars(len(req.context) + max(map(len, choices)), served.tokenizer.max_token_chars, 0,
                           served.context_length)
        if self._score_pool is None:
            threads = self.limits.torch_threads
            self._score_pool = BoundedExecutor(self.limits.score_threads, self.limits.score_max_waiting, "score",
                                               initializer=lambda: _set_torch_threads(threads))
        ticket = self.quotas.admit(tenants.current())
        tokens = 0
        try:
            results, continuations = await self._score_pool.run(self._score, served, req.context, choices,
                                                                self.limits.score_batch_tokens)
            tokens = sum(map(len, continuations))
        finally:
            ticket.release(tokens)
        out = pb.ScoreResponse(model=name)
        for text, ids, r in zip(choices, continuations, results):
            out.choices.append(pb.ChoiceScore(text=text, logprob=float(r.logprob),
                                              token_logprobs=[float(x) for x in r.token_logprobs],
                                              num_tokens=len(ids)))
        out.best = max(range(len(results)), key=lambda i: results[i].logprob)
        return out

    @staticmethod
    def _score(served: ServedModel, context: str, choices: list[str], batch_tokens: int):
        from lmcore.tasks import score

        tok = served.tokenizer
        # GPT-2 has no BOS token; <|endoftext|> stands in for "start of document" when there is no context.
        context_ids = tok.encode(context) if context else [tok.eos_id]
        continuations = [tok.encode(c) for c in choices]
        longest = len(context_ids) + max(len(c) for c in continuations)
        if longest > served.context_length:
            raise InvalidArgument(f"context + longest choice is {longest} tokens, past the model's context of "
                                  f"{served.context_length}")
        # A plain forward in this worker thread, through the adapter (or the base alone): the
        # engine's batches, routed on its step thread, are unaffected.
        with served.engine.use_adapter(served.adapter):
            return score(served.model, context_ids, continuations, max_batch_tokens=batch_tokens), continuations

    async def inspect(self, req: pb.InspectRequest) -> pb.InspectResponse:
        """Tokens, next-token probabilities, attention and the logit lens of one text (no generation)."""
        name, served = await self._served(req.model)
        ticket = self.quotas.admit(tenants.current())
        resp = None
        try:
            resp = await inspection.inspect(req, name, served, self.inspector, self.max_message_bytes)
            return resp
        finally:
            ticket.release(len(resp.tokens) if resp is not None else 0)

    async def list_models(self, req: pb.ListModelsRequest) -> pb.ListModelsResponse:
        """The configured models and the caller's own fine-tuned ones (an admin: every model)."""
        await self.registry.refresh()
        tenant = tenants.current()
        models = [model_info(e) for e in self.registry.entries() if tenant.owns(e.spec.owner)]
        models += [m for m in await asyncio.to_thread(lambda: [unloaded_model_info(s) for s in
                                                               self.registry.unloaded(tenant)]) if m is not None]
        return pb.ListModelsResponse(models=models)

    async def delete_model(self, req: pb.DeleteModelRequest) -> pb.DeleteModelResponse:
        """Unload a fine-tuned model and remove it from the store (the caller's own; an admin's: any)."""
        tenant = tenants.current()
        spec = self.registry.store_spec(req.name, tenant)  # NotFound for unknown, others' and configured ones
        unloaded = await self.registry.delete(spec)
        log.info("model %s deleted by tenant %s (%s)", spec.name, tenant.name, "unloaded" if unloaded else "not loaded")
        return pb.DeleteModelResponse(name=spec.name, unloaded=unloaded)

    # --- what the OpenAI HTTP front end (services.http) needs beyond the RPCs -------------------
    async def tokenize(self, model: str, text: str, allow_special: bool = False) -> tuple[str, list[int], int]:
        """``(model name, token ids, context length)`` of a text, refused before tokenizing when it
        cannot fit the model's context (the same bound a prompt has)."""
        from lmcore.engine import check_prompt_chars

        name, served = await self._served(model)
        check_prompt_chars(len(text), served.tokenizer.max_token_chars, 0, served.context_length)
        special = {"allowed_special": "all"} if allow_special else {}
        return name, await offload(served.tokenizer.encode, text, size=len(text), **special), served.context_length

    async def detokenize(self, model: str, token_ids: list[int]) -> tuple[str, str]:
        """``(model name, text)`` of token ids (each in the vocabulary, at most a context's worth)."""
        name, served = await self._served(model)
        if len(token_ids) > served.context_length:
            raise InvalidArgument(f"{len(token_ids)} token ids given, at most the context of {served.context_length}")
        vocab = min(served.model.config.vocab_size, served.tokenizer.vocab_size)
        bad = next((t for t in token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidArgument(f"token {bad} is outside the vocabulary: this model's ids are 0..{vocab - 1}")
        return name, served.tokenizer.decode(token_ids)

    async def chat_template(self, model: str):
        """``(model name, lmcore ChatTemplate or None)``: the template of the model's directory (an
        adapter without one uses its base's), read once per model."""
        from lmcore.tokenizer.chat_template import ChatTemplate

        entry = self.registry.lookup(model) or await self.registry.get(model)
        if entry.name not in self._chat_templates:
            template = await asyncio.to_thread(ChatTemplate.from_dir, entry.spec.path)
            base = self.registry.lookup(entry.spec.base_model) if entry.spec.base_model else None
            if template is None and base is not None:
                template = await asyncio.to_thread(ChatTemplate.from_dir, base.spec.path)
            self._chat_templates[entry.name] = template
        return entry.name, self._chat_templates[entry.name]


def _set_torch_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)
