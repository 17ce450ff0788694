"""``python -m services.inspect_web [--inference-addr 127.0.0.1:50051] [--port 8001]``: the page on its own.

A small FastAPI app in front of a running inference service: ``GET /inspect`` (the page),
``POST /v1/inspect`` (the Inspect RPC as JSON, over gRPC), ``GET /v1/models`` (OpenAI's list shape,
from ListModels, for the page's model picker) and ``GET /health``. It binds 127.0.0.1 by default and
calls the inference service with ``--api-key`` (default ``$LMSTACK_API_KEY``), so bind it wider only
where everyone who reaches it may inspect the models.
"""

from __future__ import annotations

import argparse
import os
import sys


def build_app(inference_addr: str, api_key: str | None = None):
    import grpc
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    from services.config import DEFAULT_MAX_MESSAGE_BYTES
    from services.gen.lmstack.v1 import inference_pb2, inference_pb2_grpc
    from services.server import channel_options

    from . import error_body, grpc_inspect, inspect_router, status_of

    metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
    stubs: list = []

    def stub():  # a grpc.aio channel belongs to the loop it was made on: make it on the server's
        if not stubs:
            channel = grpc.aio.insecure_channel(inference_addr, options=channel_options(DEFAULT_MAX_MESSAGE_BYTES))
            stubs.append(inference_pb2_grpc.InferenceServiceStub(channel))
        return stubs[0]

    async def inspect(req):
        return await grpc_inspect(stub(), metadata)(req)

    app = FastAPI(title="lmstack inspect", docs_url=None, redoc_url=None)
    app.include_router(inspect_router(inspect))

    @app.get("/v1/models")
    async def models():
        try:
            resp = await stub().ListModels(inference_pb2.ListModelsRequest(), metadata=metadata, timeout=30)
        except grpc.RpcError as e:
            status, kind, message = status_of(e)
            return JSONResponse(error_body(status, message, kind), status_code=status)
        return {"object": "list", "data": [{"id": m.name, "object": "model", "owned_by": "lmstack",
                                            "n_layer": m.n_layer, "n_head": m.n_head} for m in resp.models]}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    return app


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m services.inspect_web", description=__doc__.splitlines()[0])
    p.add_argument("--inference-addr", default=os.environ.get("LMSTACK_INFERENCE_ADDR", "127.0.0.1:50051"))
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--api-key", default=os.environ.get("LMSTACK_API_KEY"))
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    import uvicorn

    print(f"lmstack inspect page: http://{args.host}:{args.port}/inspect (inference at {args.inference_addr})",
          flush=True)
    uvicorn.run(build_app(args.inference_addr, args.api_key), host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
