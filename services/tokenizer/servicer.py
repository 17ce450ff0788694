"""The gRPC adapter for TokenizerHandler: one line per RPC, no logic."""

from __future__ import annotations

from services.gen.lmstack.v1 import tokenizer_pb2_grpc

from .handler import TokenizerHandler

SERVICE_NAME = "lmstack.v1.TokenizerService"


class TokenizerServicer(tokenizer_pb2_grpc.TokenizerServiceServicer):
    def __init__(self, handler: TokenizerHandler):
        self.handler = handler

    async def Encode(self, request, context):
        return await self.handler.encode(request)

    async def EncodeBatch(self, request, context):
        return await self.handler.encode_batch(request)

    async def Decode(self, request, context):
        return await self.handler.decode(request)

    async def CountTokens(self, request, context):
        return await self.handler.count_tokens(request)


def add_to_server(server, handler: TokenizerHandler) -> None:
    """Register the tokenizer service on a ``services.server.GrpcServer``."""
    server.add_service(tokenizer_pb2_grpc.add_TokenizerServiceServicer_to_server, TokenizerServicer(handler),
                       SERVICE_NAME)
