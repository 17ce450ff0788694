"""Ray Serve application: lmstack past one machine, with the same handlers as the standalone servers.

``deploy/serve.yaml`` is the whole platform as one Serve application, ``lmstack``, built by
``app(args)`` below. Its deployments are the design card's separate services, each scaled on its own:

* ``Gateway`` (the ingress): Ray's gRPC proxy routes every lmstack RPC to it by method name
  (``Complete``, ``Encode``, ``CreateJob``, ...); each method forwards the request message through a
  ``DeploymentHandle`` to the deployment that owns it and turns what comes back into a gRPC status.
  Ray's HTTP proxy routes the application's ``route_prefix`` to it too: the OpenAI-compatible API
  of ``services.http``, over the same handles (``deploy/ray_http.py``).
* ``Tokenizer``, ``Inference`` (multiplexed fine-tunes, autoscaled) and ``FineTuning`` (the job API
  over Redis) in ``deploy/ray_services.py``, calling the ``TokenizerHandler``, ``InferenceHandler``
  and ``FineTuneHandler`` that ``python -m services.*`` call: one body of logic, every error the same.
* ``FineTuneWorker``: ``num_workers`` replicas, each running the fine-tuning worker loop.

Why a gateway: a status must survive a lost replica. When an ``Inference`` replica dies mid-stream,
the gateway sees ``ActorDiedError`` from its handle and answers ``UNAVAILABLE`` at once (Ray's proxy
would answer ``INTERNAL`` if the dead replica were the ingress itself), and Serve's router sends new
calls to the remaining replicas while the controller replaces it. The hop costs one actor call per
message (measured in ``bench/serving.py --ray``).

Errors: each service deployment maps its handler's exceptions with ``services.errors.status_for``
and its servicer's ``ERRORS`` (as the gRPC servers do) into an ``RpcFailed`` that pickles across
actors; the gateway sets that code and message on Ray's gRPC context. Router back-pressure
(``max_queued_requests``) is ``RESOURCE_EXHAUSTED`` like a full engine queue.

Tenants: the gateway authenticates every call with the standalone servers' keys (``api_keys`` /
``api_keys_file`` in the args; ``services.tenants.KeyRing.resolve``, gRPC metadata or the HTTP
``Authorization`` header): no valid key is ``UNAUTHENTICATED`` (HTTP 401). It passes the resolved
``Tenant`` to the downstream deployment as the call's first argument, which runs the handler as
that tenant: scoping, NOT_FOUND for another tenant's models/jobs/datasets, and quotas are the
handlers' (request quotas count per ``Inference`` replica, as per inference process).

Routing of fine-tunes: a request whose ``model`` is not a configured base model goes to
``Inference`` with ``multiplexed_model_id=<model>``, so Serve's router prefers replicas that already
hold that fine-tune (``services.client.Client(application="lmstack")`` also sends it as metadata).

Run it: ``serve run deploy/serve.yaml`` (clients connect to the proxy's gRPC port, 9000, with
metadata ``application: lmstack``; OpenAI clients to ``http://HOST:8000/v1``), or from Python
``run_config(yaml.safe_load(...))``, which is what ``serve run`` does with a config file.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from deploy.ray_http import HandleInference, inference_for
from deploy.ray_services import (
    FineTuneWorker,
    FineTuning,
    Inference,
    RpcFailed,
    Tokenizer,
    base_model_names,
    rpc_status,
    service_settings,
)

APPLICATION = "lmstack"
GRPC_SERVICER_FUNCTIONS = [
    "services.gen.lmstack.v1.inference_pb2_grpc.add_InferenceServiceServicer_to_server",
    "services.gen.lmstack.v1.tokenizer_pb2_grpc.add_TokenizerServiceServicer_to_server",
    "services.gen.lmstack.v1.finetune_pb2_grpc.add_FineTuningServiceServicer_to_server",
]


def _set_status(grpc_context, exc: BaseException) -> None:
    if grpc_context is not None:
        code, message = rpc_status(exc)
        grpc_context.set_code(code)
        grpc_context.set_details(message)


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=1000)
@serve.ingress()  # HTTP: the app of __serve_build_asgi_app__, built on each replica
class Gateway:
    """The ingress: one method per lmstack RPC, each forwarding to the deployment that owns it, and
    the OpenAI-compatible HTTP API (``deploy/ray_http.py``)."""

    def __init__(self, tokenizer: DeploymentHandle, inference: DeploymentHandle, finetuning: DeploymentHandle,
                 workers: DeploymentHandle | None, base_models: list[str], max_dataset_bytes: int, keys):
        self.tokenizer, self.inference, self.finetuning = tokenizer, inference, finetuning
        self.workers = workers  # bound so the workers deploy with the application; never called
        self.base_models = set(base_models)
        self.max_dataset_bytes = max_dataset_bytes
        self.keys = keys  # services.tenants.KeyRing: the standalone servers' keys and rule

    async def __serve_build_asgi_app__(self):
        from services.http.app import create_app

        default = await self.inference.default_model.remote()
        app = create_app(HandleInference(self.inference, self.base_models, default), self.keys)
        app.state.lmstack.serving = True  # Serve routes HTTP here only once the replica is up
        return app

    def _caller(self, grpc_context):
        """The tenant of this RPC, from its metadata by ``KeyRing.resolve`` (every transport's one
        rule); UNAUTHENTICATED without a valid key. Downstream deployments get it as an argument."""
        tenant, why = self.keys.resolve(grpc_context.invocation_metadata() if grpc_context is not None else ())
        if tenant is None:
            raise RpcFailed("UNAUTHENTICATED", why)
        return tenant

    def _inference_for(self, model: str) -> DeploymentHandle:
        return inference_for(self.inference, self.base_models, model)

    async def _unary(self, call, request, grpc_context):
        try:
            return await call.remote(self._caller(grpc_context), request)
        except Exception as exc:
            _set_status(grpc_context, exc)
            raise

    async def _stream(self, handle: DeploymentHandle, method: str, request, grpc_context):
        try:
            responses = getattr(handle.options(stream=True), method).remote(self._caller(grpc_context), request)
        except Exception as exc:
            _set_status(grpc_context, exc)
            raise
        try:
            async for message in responses:
                yield message
        except Exception as exc:
            _set_status(grpc_context, exc)
            raise
        finally:
            responses.cancel()  # a client that went away stops the work downstream (no-op once done)

    # --- lmstack.v1.InferenceService -------------------------------------------------------------
    async def Complete(self, request, grpc_context=None):
        return await self._unary(self._inference_for(request.model).complete, request, grpc_context)

    async def CompleteStream(self, request, grpc_context=None):
        async for chunk in self._stream(self._inference_for(request.model), "complete_stream", request,
                                        grpc_context):
            yield chunk

    async def FewShot(self, request, grpc_context=None):
        return await self._unary(self._inference_for(request.model).few_shot, request, grpc_context)

    async def Score(self, request, grpc_context=None):
        return await self._unary(self._inference_for(request.model).score, request, grpc_context)

    async def Inspect(self, request, grpc_context=None):
        return await self._unary(self._inference_for(request.model).inspect, request, grpc_context)

    async def ListModels(self, request, grpc_context=None):
        return await self._unary(self.inference.list_models, request, grpc_context)

    async def DeleteModel(self, request, grpc_context=None):  # to a replica that holds it, if one does
        return await self._unary(self._inference_for(request.name).delete_model, request, grpc_context)

    # --- lmstack.v1.TokenizerService -------------------------------------------------------------
    async def Encode(self, request, grpc_context=None):
        return await self._unary(self.tokenizer.encode, request, grpc_context)

    async def EncodeBatch(self, request, grpc_context=None):
        return await self._unary(self.tokenizer.encode_batch, request, grpc_context)

    async def Decode(self, request, grpc_context=None):
        return await self._unary(self.tokenizer.decode, request, grpc_context)

    async def CountTokens(self, request, grpc_context=None):
        return await self._unary(self.tokenizer.count_tokens, request, grpc_context)

    # --- lmstack.v1.FineTuningService ------------------------------------------------------------
    async def UploadDataset(self, request_iterator, grpc_context=None):
        # A handle cannot carry a stream: gather the chunks, stopping one chunk past the size limit
        # (the handler owns the limit and says so); the handler validates them as it would a stream.
        chunks, size = [], 0
        try:
            tenant = self._caller(grpc_context)  # before reading a byte
            async for chunk in request_iterator:
                chunks.append(chunk)
                size += len(chunk.data)
                if size > self.max_dataset_bytes:
                    break
        except Exception as exc:
            _set_status(grpc_context, exc)
            raise
        try:
            return await self.finetuning.upload_dataset.remote(tenant, chunks)
        except Exception as exc:
            _set_status(grpc_context, exc)
            raise

    async def GetDataset(self, request, grpc_context=None):
        return await self._unary(self.finetuning.get_dataset, request, grpc_context)

    async def CreateJob(self, request, grpc_context=None):
        return await self._unary(self.finetuning.create_job, request, grpc_context)

    async def GetJob(self, request, grpc_context=None):
        return await self._unary(self.finetuning.get_job, request, grpc_context)

    async def ListJobs(self, request, grpc_context=None):
        return await self._unary(self.finetuning.list_jobs, request, grpc_context)

    async def CancelJob(self, request, grpc_context=None):
        return await self._unary(self.finetuning.cancel_job, request, grpc_context)

    async def ListCheckpoints(self, request, grpc_context=None):
        return await self._unary(self.finetuning.list_checkpoints, request, grpc_context)

    async def DeleteDataset(self, request, grpc_context=None):
        return await self._unary(self.finetuning.delete_dataset, request, grpc_context)

    async def WatchJob(self, request, grpc_context=None):
        async for event in self._stream(self.finetuning, "watch_job", request, grpc_context):
            yield event


def build_app(args: dict[str, Any]) -> serve.Application:
    """The application from ``args`` (``deploy/serve.yaml``'s ``applications[].args``).

    ``args`` are the services' own settings fields (``models``, ``model_store``, ``default_model``,
    ``redis_url``, ``device``, ``max_batch_size``, ``max_waiting``, ``torch_threads``,
    ``reclaim_idle_s``, ...: see ``services/config.py``), validated here so a bad config fails at
    deploy time, plus ``num_workers`` (fine-tuning worker replicas, default 1; 0 for none) and
    ``max_models_per_replica`` (fine-tunes one ``Inference`` replica keeps, LRU, default 3).
    ``Inference``'s ``max_ongoing_requests`` is its engine's slots plus waiting queue, and its
    router queue (``max_queued_requests``) the waiting queue, so Serve's back-pressure and the
    engine's agree.
    """
    from services.tenants import KeyRing

    args = dict(args)
    num_workers = int(args.pop("num_workers", 1))
    settings = service_settings(args)  # validates every field
    inference = settings["inference"]
    keys = KeyRing.from_settings(inference.api_keys, inference.api_keys_file)  # a bad keys file fails here
    capacity = inference.max_batch_size + inference.max_waiting
    workers = FineTuneWorker.options(num_replicas=num_workers).bind(args) if num_workers else None
    return Gateway.bind(
        Tokenizer.bind(args),
        Inference.options(max_ongoing_requests=capacity, max_queued_requests=inference.max_waiting).bind(args),
        FineTuning.bind(args),
        workers,
        base_model_names(inference),
        settings["finetune"].max_dataset_bytes,
        keys,
    )


app = build_app


def start_grpc(port: int = 9000, http_port: int | None = None, proxy_location: str = "EveryNode") -> None:
    """Start Serve with the gRPC proxy serving lmstack's services on ``port``."""
    from ray.serve.config import HTTPOptions, gRPCOptions

    http = HTTPOptions(host="127.0.0.1", port=http_port) if http_port else None
    serve.start(grpc_options=gRPCOptions(port=port, grpc_servicer_functions=GRPC_SERVICER_FUNCTIONS),
                http_options=http, proxy_location=proxy_location)


def run_config(config: dict, timeout_s: float = 600.0) -> None:
    """Deploy a Serve config (``deploy/serve.yaml`` as a dict) on the connected Ray cluster, as
    ``serve run``/``serve deploy`` do: validate it with Ray's ``ServeDeploySchema``, start Serve with
    its proxy options, apply it, and wait until every application is RUNNING."""
    import time

    from ray.serve._private.api import serve_start
    from ray.serve.config import gRPCOptions
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    client = serve_start(http_options=schema.http_options.model_dump(), proxy_location=schema.proxy_location,
                         grpc_options=gRPCOptions(**schema.grpc_options.model_dump()))
    client.deploy_apps(schema)
    deadline = time.monotonic() + timeout_s
    while True:
        status = serve.status().applications
        states = {app.name: status[app.name].status if app.name in status else "NOT_STARTED"
                  for app in schema.applications}
        if all(s == "RUNNING" for s in states.values()):
            return
        failed = {n: status[n].message for n, s in states.items() if s in ("DEPLOY_FAILED", "UNHEALTHY")}
        if failed or time.monotonic() > deadline:
            raise RuntimeError(f"Serve applications not RUNNING: {states} {failed}")
        time.sleep(1.0)

