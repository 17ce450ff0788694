"""The gRPC adapter for FineTuneHandler: one line per RPC, plus what the shared boundary cannot do.

``services.errors.ErrorBoundary`` wraps unary-request RPCs only, so the client-streamed
``UploadDataset`` maps its own exceptions (with the same ``status_for`` table). A Redis outage is
``UNAVAILABLE`` with a message saying so, on every RPC.
"""

from __future__ import annotations

import functools
import logging

import grpc
import redis

from lmcore.training import DatasetError
from services.errors import InvalidArgument, Unavailable, status_for
from services.gen.lmstack.v1 import finetune_pb2_grpc

from .handler import FineTuneHandler

SERVICE_NAME = "lmstack.v1.FineTuningService"
log = logging.getLogger("lmstack.finetune")


def _unavailable(e: Exception) -> Unavailable:
    return Unavailable(f"the job store (Redis) is unavailable, retry shortly: {e}")


def store_errors(fn):
    @functools.wraps(fn)
    async def wrapper(self, request, context):
        try:
            return await fn(self, request, context)
        except redis.RedisError as e:
            raise _unavailable(e) from None

    return wrapper


class FineTuningServicer(finetune_pb2_grpc.FineTuningServiceServicer):
    def __init__(self, handler: FineTuneHandler):
        self.handler = handler

    async def UploadDataset(self, request_iterator, context):
        try:
            return await self.handler.upload_dataset(request_iterator)
        except Exception as exc:  # this RPC's own error boundary (see the module docstring)
            if isinstance(exc, DatasetError):
                exc = InvalidArgument(f"invalid dataset: {exc}")
            elif isinstance(exc, redis.RedisError):
                exc = _unavailable(exc)
            code, message = status_for(exc)
            if code == grpc.StatusCode.INTERNAL:
                log.error("UploadDataset failed", exc_info=exc)
            else:
                log.info("UploadDataset -> %s: %s", code.name, message)
            await context.abort(code, message)

    @store_errors
    async def GetDataset(self, request, context):
        return await self.handler.get_dataset(request)

    @store_errors
    async def CreateJob(self, request, context):
        return await self.handler.create_job(request)

    @store_errors
    async def GetJob(self, request, context):
        return await self.handler.get_job(request)

    @store_errors
    async def ListJobs(self, request, context):
        return await self.handler.list_jobs(request)

    @store_errors
    async def CancelJob(self, request, context):
        return await self.handler.cancel_job(request)

    @store_errors
    async def ListCheckpoints(self, request, context):
        return await self.handler.list_checkpoints(request)

    async def WatchJob(self, request, context):
        try:
            async for event in self.handler.watch_job(request):
                yield event
        except redis.RedisError as e:
            raise _unavailable(e) from None


def add_to_server(server, handler: FineTuneHandler) -> None:
    """Register the fine-tuning service on a ``services.server.GrpcServer``."""
    server.add_service(finetune_pb2_grpc.add_FineTuningServiceServicer_to_server, FineTuningServicer(handler),
                       SERVICE_NAME)
