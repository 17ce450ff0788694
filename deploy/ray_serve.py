"""Ray Serve application: lmstack past one machine, with the same handlers as the standalone servers.

One ingress deployment, ``LMStack``, answers both ``lmstack.v1.InferenceService`` and
``lmstack.v1.TokenizerService`` behind Ray Serve's gRPC proxy. Its methods are named after the
RPCs and take the request message (Ray Serve's gRPC convention); ``CompleteStream`` is a generator,
which Ray Serve turns into a server-streaming RPC. The bodies are one line each: the
``InferenceHandler`` and ``TokenizerHandler`` that ``python -m services.inference`` and
``python -m services.tokenizer`` also call, so both paths share every behaviour and every error.

Scaling: each replica loads the models and runs its own continuous-batching engine; Ray Serve's
router spreads requests over replicas (``num_replicas``, or ``autoscaling_config``). Errors keep
their status codes: the same ``services.errors.status_for`` mapping sets the code on Ray's gRPC
context before the exception propagates.

Run it (clients connect to the proxy's port, 9000 by default, and send the metadata
``application: lmstack``, which Ray's proxy routes by)::

    serve start --grpc-port 9000 --grpc-servicer-functions \\
        services.gen.lmstack.v1.inference_pb2_grpc.add_InferenceServiceServicer_to_server \\
        services.gen.lmstack.v1.tokenizer_pb2_grpc.add_TokenizerServiceServicer_to_server
    serve run deploy.ray_serve:app models=pycode=models/pycode num_replicas=2

or from Python: ``start_grpc(port)`` then ``serve.run(build_app({"models": "pycode=models/pycode"}))``.
"""

from __future__ import annotations

import asyncio

from ray import serve

GRPC_SERVICER_FUNCTIONS = [
    "services.gen.lmstack.v1.inference_pb2_grpc.add_InferenceServiceServicer_to_server",
    "services.gen.lmstack.v1.tokenizer_pb2_grpc.add_TokenizerServiceServicer_to_server",
]


def _with_status(grpc_context, exc: BaseException) -> None:
    """Give Ray's gRPC proxy the status code and message our own servers would send."""
    from services.errors import status_for
    from services.inference.servicer import ERRORS  # the inference service's own mappings (EngineOverloaded)

    if grpc_context is not None:
        code, message = status_for(exc, ERRORS)
        grpc_context.set_code(code)
        grpc_context.set_details(message)


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=128)
class LMStack:
    def __init__(self, models: str, model_store: str = "", default_model: str = "", max_batch_size: int = 16,
                 max_waiting: int = 64, torch_threads: int = 1, device: str = "cpu"):
        import torch

        from services.config import InferenceSettings, TokenizerSettings
        from services.inference.handler import InferenceHandler, inference_registry
        from services.tokenizer.handler import TokenizerHandler, tokenizer_registry

        torch.set_num_threads(torch_threads)
        common = dict(models=models, model_store=model_store, default_model=default_model)
        inference = InferenceSettings(**common, max_batch_size=max_batch_size, max_waiting=max_waiting,
                                      torch_threads=torch_threads, device=device)
        self.registries = [inference_registry(inference), tokenizer_registry(TokenizerSettings(**common))]
        self.inference = InferenceHandler(self.registries[0])
        self.tokenizer = TokenizerHandler(self.registries[1])
        self._loaded: asyncio.Task | None = None

    async def _ready(self) -> None:
        # Models load on the replica's event loop (their engines' drivers live there), once.
        if self._loaded is None:
            self._loaded = asyncio.ensure_future(asyncio.gather(*(r.load_all() for r in self.registries)))
        await self._loaded

    async def _call(self, method, request, grpc_context):
        try:
            await self._ready()
            return await method(request)
        except Exception as exc:
            _with_status(grpc_context, exc)
            raise

    # --- lmstack.v1.InferenceService ---------------------------------------------------------------
    async def Complete(self, request, grpc_context=None):
        return await self._call(self.inference.complete, request, grpc_context)

    async def CompleteStream(self, request, grpc_context=None):
        try:
            await self._ready()
            chunks = self.inference.complete_stream(request)
            try:
                async for chunk in chunks:
                    yield chunk
            finally:
                await chunks.aclose()  # a cancelled call aborts the engine request at once
        except Exception as exc:
            _with_status(grpc_context, exc)
            raise

    async def FewShot(self, request, grpc_context=None):
        return await self._call(self.inference.few_shot, request, grpc_context)

    async def Score(self, request, grpc_context=None):
        return await self._call(self.inference.score, request, grpc_context)

    async def Inspect(self, request, grpc_context=None):
        return await self._call(self.inference.inspect, request, grpc_context)

    async def ListModels(self, request, grpc_context=None):
        return await self._call(self.inference.list_models, request, grpc_context)

    # --- lmstack.v1.TokenizerService ---------------------------------------------------------------
    async def Encode(self, request, grpc_context=None):
        return await self._call(self.tokenizer.encode, request, grpc_context)

    async def EncodeBatch(self, request, grpc_context=None):
        return await self._call(self.tokenizer.encode_batch, request, grpc_context)

    async def Decode(self, request, grpc_context=None):
        return await self._call(self.tokenizer.decode, request, grpc_context)

    async def CountTokens(self, request, grpc_context=None):
        return await self._call(self.tokenizer.count_tokens, request, grpc_context)

    # health for Ray's controller: the replica is healthy once its models loaded
    async def check_health(self) -> None:
        if self._loaded is not None and self._loaded.done() and self._loaded.exception():
            raise RuntimeError(f"model loading failed: {self._loaded.exception()}")


def build_app(args: dict) -> serve.Application:
    """``serve run deploy.ray_serve:app models=... [num_replicas=N] [model_store=...] ...``."""
    args = dict(args)
    num_replicas = int(args.pop("num_replicas", 1))
    for key in ("max_batch_size", "max_waiting", "torch_threads"):
        if key in args:
            args[key] = int(args[key])
    return LMStack.options(num_replicas=num_replicas).bind(**args)


app = build_app


def start_grpc(port: int = 9000, http_port: int | None = None) -> None:
    """Start Serve with the gRPC proxy serving lmstack's services on ``port``."""
    from ray.serve.config import HTTPOptions, gRPCOptions

    http = HTTPOptions(host="127.0.0.1", port=http_port) if http_port else None
    serve.start(grpc_options=gRPCOptions(port=port, grpc_servicer_functions=GRPC_SERVICER_FUNCTIONS),
                http_options=http)
