"""The service deployments of the Ray Serve application (``deploy/ray_serve.py`` is the ingress).

Each deployment builds its service's settings from the application's ``args`` (the same pydantic
settings ``python -m services.*`` reads from flags and ``LMSTACK_*``) and calls the same handler;
its methods take and return the protobuf messages. A handler's exception becomes ``RpcFailed``
(code name + message, picklable) through ``services.errors.status_for`` and the servicer's own
``ERRORS``, exactly the status the gRPC server would send.

Tenants: every method takes the caller's ``services.tenants.Tenant`` as its first argument, resolved
by the ``Gateway`` from the request's API key (``KeyRing.resolve``, the standalone servers' rule), and
runs the handler under ``tenants.use(tenant)``: the handlers then scope, hide (NOT_FOUND) and count
quotas exactly as behind ``python -m services.*``. Nothing a client sends is read here: only the
gateway can call these deployments, and it passes the tenant it authenticated.

* ``Tokenizer``: ``TokenizerHandler`` over a tokenizer registry (store entries load on refresh).
* ``Inference``: ``InferenceHandler`` over the configured base models, loaded in ``__init__`` (a
  replica is RUNNING, and receives traffic, once its engines run), plus fine-tunes from the model
  store multiplexed with ``serve.multiplexed``: the first request for ``ft:...`` loads it into this
  replica (an adapter joins its base's LoRA bank), up to ``max_models_per_replica`` are kept, and
  Serve's LRU eviction unloads the least recently used once no request still uses it.
  ``check_health`` fails when an engine's step thread has died, so Serve replaces the replica.
* ``FineTuning``: ``FineTuneHandler`` over Redis, as ``python -m services.finetune``.
* ``FineTuneWorker``: ``services.finetune.worker.Worker``'s loop on a thread; a replica that dies is
  replaced by Serve, and the job it held is reclaimed from Redis by a live worker after
  ``reclaim_idle_s`` and resumed from its last checkpoint, as after ``kill -9`` of a worker process.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import Counter
from contextlib import aclosing
from typing import Any

import grpc
from ray import serve

from services import tenants
from services.errors import ServiceError

log = logging.getLogger("lmstack.ray")

METRICS_INTERVAL_S = 5.0


class RpcFailed(ServiceError):
    """A handler's error as the gRPC status it maps to; crosses actor boundaries intact (pickled as
    its code's name and message). A ``ServiceError``, so ``services.errors.status_for`` (the HTTP
    API's error mapping included) answers with that same status."""

    def __init__(self, code: str, message: str):
        super().__init__(code, message)
        self.code, self.message = grpc.StatusCode[code], message

    def __str__(self) -> str:
        return self.message


def failure(exc: BaseException, errors=None) -> RpcFailed:
    from services.errors import status_for

    code, message = status_for(exc, errors)
    if code.name == "INTERNAL":  # a bug: the traceback goes to the replica's log
        logging.getLogger("ray.serve").error("internal error", exc_info=exc)
    return RpcFailed(code.name, message)


def rpc_status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status for what a call through a ``DeploymentHandle`` raised: the handler's own
    status, ``UNAVAILABLE`` for a lost replica (fail fast; Serve replaces it), ``RESOURCE_EXHAUSTED``
    for the router's back-pressure."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    from services.errors import status_for

    cause = exc.cause if isinstance(exc, RayTaskError) else exc
    if isinstance(cause, RpcFailed):
        return cause.code, cause.message
    if isinstance(exc, (ActorDiedError, ActorUnavailableError, RayActorError, DeploymentUnavailableError)):
        return grpc.StatusCode.UNAVAILABLE, ("the replica serving this call was lost; retry (Ray Serve is "
                                             f"replacing it): {type(exc).__name__}")
    if isinstance(exc, BackPressureError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, f"server overloaded, retry later: {exc.message}"
    return status_for(cause)


def replica_error(exc: BaseException) -> RpcFailed:
    """What a handle call raised, as the ``RpcFailed`` of its status (see :func:`rpc_status`)."""
    code, message = rpc_status(exc)
    return RpcFailed(code.name, message)


def service_settings(args: dict[str, Any]) -> dict:
    """Every service's settings from the application's args (unknown keys: the other services')."""
    from services.config import InferenceSettings, TokenizerSettings
    from services.finetune.settings import FineTuneSettings, WorkerSettings

    args = {k: v for k, v in args.items() if k not in ("max_models_per_replica", "num_workers")}
    return {"tokenizer": TokenizerSettings(**args), "inference": InferenceSettings(**args),
            "finetune": FineTuneSettings(**args), "worker": WorkerSettings(**args)}


def base_model_names(settings) -> list[str]:
    from services.models import parse_model_specs

    return [s.name for s in parse_model_specs(settings.models)]


async def _answer(method, tenant, *args, errors=None):
    """``method(*args)`` run as ``tenant``; its exception as the ``RpcFailed`` of its status."""
    try:
        with tenants.use(tenant):
            return await method(*args)
    except Exception as exc:
        raise failure(exc, errors) from None


async def _stream(gen_method, tenant, request, errors=None):
    """The items of ``gen_method(request)`` run as ``tenant``; closed early, the handler's stream is
    closed at once (its engine request aborted)."""
    try:
        with tenants.use(tenant):
            async with aclosing(gen_method(request)) as items:
                async for item in items:
                    yield item
    except Exception as exc:
        raise failure(exc, errors) from None


def _metrics_export(registry):
    from deploy.ray_metrics import RayMetricsExport

    return RayMetricsExport(registry, METRICS_INTERVAL_S).start()


def _job_store_export(settings):
    """The job-store gauges (jobs by status, oldest queued job, workers alive, store up, and each
    running job's ``job_id`` series), read from Redis at every export as ``python -m
    services.finetune`` reads them at every scrape; a job's series leave Ray's export when it stops
    running (``deploy/ray_metrics.py``)."""
    from prometheus_client import CollectorRegistry

    from services.finetune.metrics import register_job_store_metrics
    from services.finetune.store import Keys

    registry = CollectorRegistry()
    register_job_store_metrics(registry, settings.redis_url, Keys(settings.redis_prefix), settings.reclaim_idle_s,
                               password=settings.redis_password())
    return _metrics_export(registry)


@serve.deployment(ray_actor_options={"num_cpus": 0.5})
class Tokenizer:
    async def __init__(self, args: dict):
        from prometheus_client import CollectorRegistry

        from services.metrics import TokenizerMetrics
        from services.tokenizer.handler import TokenizerHandler, tokenizer_registry

        self.metrics_registry = CollectorRegistry()
        metrics = TokenizerMetrics(self.metrics_registry)
        self.registry = tokenizer_registry(service_settings(args)["tokenizer"], metrics)
        await self.registry.load_all()
        self.handler = TokenizerHandler(self.registry, metrics=metrics)
        self._export = _metrics_export(self.metrics_registry)

    async def encode(self, tenant, request):
        return await _answer(self.handler.encode, tenant, request)

    async def encode_batch(self, tenant, request):
        return await _answer(self.handler.encode_batch, tenant, request)

    async def decode(self, tenant, request):
        return await _answer(self.handler.decode, tenant, request)

    async def count_tokens(self, tenant, request):
        return await _answer(self.handler.count_tokens, tenant, request)


class HeldModel:
    """A fine-tune in an ``Inference`` replica's multiplexing cache. Serve calls ``__del__`` when
    its LRU evicts the model; the replica then unloads it once no request still uses it."""

    def __init__(self, name: str, evict):
        self.name, self._evict = name, evict

    def __del__(self):
        evict, self._evict = self._evict, None
        if evict is not None:
            try:
                evict(self.name)
            except RuntimeError:  # the replica's loop is gone (shutdown): nothing left to unload
                pass


@serve.deployment(ray_actor_options={"num_cpus": 1})
class Inference:
    async def __init__(self, args: dict):
        import torch
        from prometheus_client import CollectorRegistry

        from services.inference.handler import InferenceHandler, inference_registry
        from services.inference.servicer import ERRORS
        from services.metrics import InferenceMetrics

        settings = service_settings(args)["inference"]
        torch.set_num_threads(settings.torch_threads)
        self.errors = ERRORS
        self.base_models = set(base_model_names(settings))
        self.metrics_registry = CollectorRegistry()
        metrics = InferenceMetrics(self.metrics_registry)
        self.registry = inference_registry(settings, metrics, autoload_store=False)
        metrics.watch(self.registry)
        self.handler = InferenceHandler(self.registry, metrics, settings)
        self._in_use: Counter[str] = Counter()
        self._unloading: dict[str, asyncio.Task] = {}
        self._loop = asyncio.get_running_loop()

        async def load_fine_tune(name: str) -> HeldModel:  # a function: Serve keeps its cache on it
            return await self._load_fine_tune(name)

        self.fine_tune = serve.multiplexed(max_num_models_per_replica=int(args.get("max_models_per_replica", 3)))(
            load_fine_tune)
        await self.registry.load_all()
        self._export = _metrics_export(self.metrics_registry)

    # --- multiplexed fine-tunes ------------------------------------------------------------------
    async def _load_fine_tune(self, name: str) -> HeldModel:
        task = self._unloading.pop(name, None)
        if task is not None:  # evicted and asked for again before it was unloaded: keep it
            task.cancel()
        await self.registry.load_store_entry(name)
        return HeldModel(name, lambda n: self._loop.call_soon_threadsafe(self._schedule_unload, n))

    def _schedule_unload(self, name: str) -> None:
        if name not in self._unloading:
            self._unloading[name] = self._loop.create_task(self._unload_when_idle(name))

    async def _unload_when_idle(self, name: str) -> None:
        while self._in_use[name] or not await self.registry.unload(name):
            await asyncio.sleep(0.2)
        self._unloading.pop(name, None)

    async def _use(self, model: str, tenant) -> str:
        """Make ``model`` servable here (a fine-tune loads through the multiplexing cache); the
        caller counts the request in ``_in_use`` until it ends, which holds off an unload. Another
        tenant's fine-tune is never loaded for this caller: it is NOT_FOUND as an unknown name is."""
        name = model or self.registry.default
        if name not in self.base_models:
            self.registry.check_store_model(name, tenant)
            await self.fine_tune(name)
        self._in_use[name] += 1
        return name

    async def _call(self, method, tenant, model: str, *args):
        try:
            name = await self._use(model, tenant)
        except Exception as exc:
            raise failure(exc, self.errors) from None
        try:
            return await _answer(method, tenant, *args, errors=self.errors)
        finally:
            self._in_use[name] -= 1

    # --- lmstack.v1.InferenceService -------------------------------------------------------------
    async def complete(self, tenant, request):
        return await self._call(self.handler.complete, tenant, request.model, request)

    async def complete_stream(self, tenant, request):
        try:
            name = await self._use(request.model, tenant)
        except Exception as exc:
            raise failure(exc, self.errors) from None
        try:
            async with aclosing(_stream(self.handler.complete_stream, tenant, request, self.errors)) as chunks:
                async for chunk in chunks:
                    yield chunk
        finally:
            self._in_use[name] -= 1

    async def few_shot(self, tenant, request):
        return await self._call(self.handler.few_shot, tenant, request.model, request)

    async def score(self, tenant, request):
        return await self._call(self.handler.score, tenant, request.model, request)

    async def inspect(self, tenant, request):
        return await self._call(self.handler.inspect, tenant, request.model, request)

    async def list_models(self, tenant, request):
        """The models this replica serves, then the store's fine-tunes it has not loaded (any
        replica loads them on first use; their details show once loaded): the caller's own only."""
        from services.gen.lmstack.v1 import inference_pb2 as pb
        from services.models import read_adapter_base

        resp = await _answer(self.handler.list_models, tenant, request, errors=self.errors)
        for spec in self.registry.scan_store():
            if not tenant.owns(spec.owner):
                continue
            try:
                base = read_adapter_base(spec.path) if spec.is_adapter else ""
            except ValueError:
                continue
            resp.models.append(pb.ModelInfo(name=spec.name, source="store", base_model=base, tenant=spec.owner))
        return resp

    async def delete_model(self, tenant, request):
        """DeleteModel: out of the shared store and unloaded here; a replica that still holds it
        unloads it at its next ListModels rescan, and meanwhile answers NOT_FOUND for it (``_use``
        checks the store first)."""
        return await _answer(self.handler.delete_model, tenant, request, errors=self.errors)

    # --- what the OpenAI-compatible HTTP API needs beyond the RPCs (deploy/ray_http.py) --------
    async def tokenize(self, tenant, model: str, text: str, allow_special: bool):
        return await self._call(self.handler.tokenize, tenant, model, model, text, allow_special)

    async def detokenize(self, tenant, model: str, token_ids: list[int]):
        return await self._call(self.handler.detokenize, tenant, model, model, token_ids)

    async def chat_template(self, tenant, model: str):
        return await self._call(self.handler.chat_template, tenant, model, model)

    def default_model(self) -> str:
        return self.registry.default

    # --- for operators and tests -------------------------------------------------------------------
    def engine_stats(self) -> dict[str, dict]:
        """``Engine.stats()`` of each engine this replica runs, by model (running, waiting, aborted...)."""
        return {e.name: e.obj.engine_stats() for e in self.registry.entries() if e.obj.owns_engine}

    def loaded_models(self) -> list[str]:
        """The models this replica holds now (bases and fine-tunes), for operators and tests."""
        return self.registry.names()

    async def __del__(self):
        self._export.stop()
        await self.registry.close()
        self.handler.close()

    def check_health(self) -> None:
        for entry in self.registry.entries():
            served = entry.obj
            if served.owns_engine and not served.async_engine.running:
                raise RuntimeError(f"the engine of model {entry.name!r} stopped; this replica must be replaced")


@serve.deployment(ray_actor_options={"num_cpus": 0.5})
class FineTuning:
    async def __init__(self, args: dict):
        from services.finetune.handler import FineTuneHandler
        from services.finetune.servicer import ERRORS

        self.errors = ERRORS
        settings = service_settings(args)["finetune"]
        self.handler = FineTuneHandler(settings)
        await self.handler.connect()
        self._export = _job_store_export(settings)

    async def upload_dataset(self, tenant, chunks: list):
        async def stream():
            for chunk in chunks:
                yield chunk

        return await _answer(self.handler.upload_dataset, tenant, stream(), errors=self.errors)

    async def get_dataset(self, tenant, request):
        return await _answer(self.handler.get_dataset, tenant, request, errors=self.errors)

    async def create_job(self, tenant, request):
        return await _answer(self.handler.create_job, tenant, request, errors=self.errors)

    async def get_job(self, tenant, request):
        return await _answer(self.handler.get_job, tenant, request, errors=self.errors)

    async def list_jobs(self, tenant, request):
        return await _answer(self.handler.list_jobs, tenant, request, errors=self.errors)

    async def cancel_job(self, tenant, request):
        return await _answer(self.handler.cancel_job, tenant, request, errors=self.errors)

    async def list_checkpoints(self, tenant, request):
        return await _answer(self.handler.list_checkpoints, tenant, request, errors=self.errors)

    async def delete_dataset(self, tenant, request):
        return await _answer(self.handler.delete_dataset, tenant, request, errors=self.errors)

    async def watch_job(self, tenant, request):
        async with aclosing(_stream(self.handler.watch_job, tenant, request, self.errors)) as events:
            async for event in events:
                yield event


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=1)
class FineTuneWorker:
    """One fine-tuning worker (``python -m services.finetune.worker``'s loop) per replica."""

    async def __init__(self, args: dict):
        import torch

        from services.finetune.worker import Worker

        settings = service_settings(args)["worker"]
        replica = serve.get_replica_context().replica_id.unique_id
        settings = settings.model_copy(update={"worker_id": settings.worker_id or f"ray-{replica}"})
        torch.set_num_threads(settings.torch_threads)
        self.worker = Worker(settings)
        self.thread = threading.Thread(target=self.worker.run, name="lmstack-worker", daemon=True)
        self.thread.start()
        self._export = _metrics_export(self.worker.metrics.registry)

    def worker_id(self) -> str:
        return self.worker.id

    def check_health(self) -> None:
        if not self.thread.is_alive():
            raise RuntimeError(f"worker {self.worker.id}'s loop stopped")

    def __del__(self):
        # Serve stops the replica gracefully (scale down, redeploy): hand the job back, checkpointed.
        self.worker.shutdown.set()
        self.thread.join(timeout=60)
