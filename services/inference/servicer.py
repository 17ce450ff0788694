"""The gRPC adapter for InferenceHandler: one line per RPC, no logic.

``ERRORS`` is this service's addition to the shared error boundary (``services.errors``): a full
waiting queue (``lmcore.EngineOverloaded``) is ``RESOURCE_EXHAUSTED``, which clients retry with
backoff. ``add_to_server`` registers it with the servicer; other transports (Ray Serve) pass it to
``services.errors.status_for``.
"""

from __future__ import annotations

from contextlib import aclosing

import grpc

from lmcore.engine import EngineOverloaded
from services.gen.lmstack.v1 import inference_pb2_grpc

from .handler import InferenceHandler

SERVICE_NAME = "lmstack.v1.InferenceService"

ERRORS = {EngineOverloaded: (grpc.StatusCode.RESOURCE_EXHAUSTED, "server overloaded, retry later: {e}")}


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, handler: InferenceHandler):
        self.handler = handler

    async def Complete(self, request, context):
        return await self.handler.complete(request)

    async def CompleteStream(self, request, context):
        # aclosing: a cancelled call closes the handler's stream at once, aborting the engine request.
        async with aclosing(self.handler.complete_stream(request)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def FewShot(self, request, context):
        return await self.handler.few_shot(request)

    async def Score(self, request, context):
        return await self.handler.score(request)

    async def Inspect(self, request, context):
        return await self.handler.inspect(request)

    async def ListModels(self, request, context):
        return await self.handler.list_models(request)

    async def DeleteModel(self, request, context):
        return await self.handler.delete_model(request)


def add_to_server(server, handler: InferenceHandler) -> None:
    """Register the inference service and its error mapping on a ``services.server.GrpcServer``."""
    server.map_errors(ERRORS)
    server.add_service(inference_pb2_grpc.add_InferenceServiceServicer_to_server, InferenceServicer(handler),
                       SERVICE_NAME)
