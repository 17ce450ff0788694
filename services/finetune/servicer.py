"""The gRPC adapter for FineTuneHandler: one line per RPC, no logic.

Errors go through the server's shared boundary (``services.errors.ErrorBoundary``), which covers
the client-streamed ``UploadDataset`` and the server-streamed ``WatchJob`` like the unary RPCs.
``add_to_server`` registers the two exceptions only this service knows about: a Redis outage is
``UNAVAILABLE`` on every RPC, with a message saying so, and a bad dataset is ``INVALID_ARGUMENT``.
"""

from __future__ import annotations

from contextlib import aclosing

import grpc
import redis

from lmcore.training import DatasetError
from services.gen.lmstack.v1 import finetune_pb2_grpc

from .handler import FineTuneHandler

SERVICE_NAME = "lmstack.v1.FineTuningService"

ERRORS = {
    redis.RedisError: (grpc.StatusCode.UNAVAILABLE, "the job store (Redis) is unavailable, retry shortly: {e}"),
    DatasetError: (grpc.StatusCode.INVALID_ARGUMENT, "invalid dataset: {e}"),
}


class FineTuningServicer(finetune_pb2_grpc.FineTuningServiceServicer):
    def __init__(self, handler: FineTuneHandler):
        self.handler = handler

    async def UploadDataset(self, request_iterator, context):
        return await self.handler.upload_dataset(request_iterator)

    async def GetDataset(self, request, context):
        return await self.handler.get_dataset(request)

    async def CreateJob(self, request, context):
        return await self.handler.create_job(request)

    async def GetJob(self, request, context):
        return await self.handler.get_job(request)

    async def ListJobs(self, request, context):
        return await self.handler.list_jobs(request)

    async def CancelJob(self, request, context):
        return await self.handler.cancel_job(request)

    async def ListCheckpoints(self, request, context):
        return await self.handler.list_checkpoints(request)

    async def DeleteDataset(self, request, context):
        return await self.handler.delete_dataset(request)

    async def WatchJob(self, request, context):
        # aclosing: a cancelled watch stops reading the job's event stream at once.
        async with aclosing(self.handler.watch_job(request)) as events:
            async for event in events:
                yield event


def add_to_server(server, handler: FineTuneHandler) -> None:
    """Register the fine-tuning service and its error mappings on a ``services.server.GrpcServer``
    (together: the one-line RPCs above rely on the mappings)."""
    server.map_errors(ERRORS)
    server.add_service(finetune_pb2_grpc.add_FineTuningServiceServicer_to_server, FineTuningServicer(handler),
                       SERVICE_NAME)
