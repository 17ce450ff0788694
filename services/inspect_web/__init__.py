"""The ``/inspect`` web page and ``POST /v1/inspect``: the Inspect RPC as JSON, and a page that draws it.

``inspect_router(inspect)`` is a FastAPI ``APIRouter`` for any HTTP server: ``inspect`` is an async
callable ``InspectRequest -> InspectResponse`` (an ``InferenceHandler.inspect`` in-process, or a gRPC
stub's ``Inspect`` through :func:`grpc_inspect`), so the page and the endpoint never hold a second
copy of the checks: lmcore and the inference handler make them, errors come back in OpenAI's shape
``{"error": {"message", "type", "param", "code"}}`` with the gRPC code mapped to 400/401/404/429/503.

``POST /v1/inspect`` takes the ``InspectRequest`` fields as JSON (``{"model": "...", "text": "...",
"top_k": 5, "attention": true, "layers": [0], "logit_lens": true}``; an unknown field is a 400)
and answers the ``InspectResponse`` fields, names as in the proto, every field present; ``bytes``
fields (a token's ``piece``, a layer's float16 ``weights``) are base64, as protobuf's JSON mapping
has them.

The page (``static/``: HTML, JS and CSS shipped in the package; nothing from a CDN, so it works
offline) lists ``GET /v1/models``, calls ``POST /v1/inspect`` and shows the tokens colored by
surprise, a token's top-k next tokens, where it attends for a chosen layer and head (lines as in
BertViz's head view, or a heatmap) and the logit-lens table. ``python -m services.inspect_web``
serves it on its own, in front of a running inference service.
"""


from collections.abc import Awaitable, Callable
from pathlib import Path

from services.gen.lmstack.v1 import inference_pb2 as pb

STATIC = Path(__file__).with_name("static")
ASSETS = {"inspect.js": "text/javascript", "inspect.css": "text/css"}

# gRPC status name -> (HTTP status, OpenAI error type)
HTTP_ERRORS = {
    "INVALID_ARGUMENT": (400, "invalid_request_error"),
    "FAILED_PRECONDITION": (400, "invalid_request_error"),
    "OUT_OF_RANGE": (400, "invalid_request_error"),
    "UNAUTHENTICATED": (401, "authentication_error"),
    "PERMISSION_DENIED": (403, "permission_error"),
    "NOT_FOUND": (404, "not_found_error"),
    "RESOURCE_EXHAUSTED": (429, "rate_limit_error"),
    "UNAVAILABLE": (503, "service_unavailable"),
    "DEADLINE_EXCEEDED": (504, "timeout"),
}

Inspect = Callable[[pb.InspectRequest], Awaitable[pb.InspectResponse]]


def error_body(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code or str(status)}}


def to_json(resp: pb.InspectResponse) -> dict:
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(resp, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def from_json(body) -> pb.InspectRequest:
    """The JSON body as an ``InspectRequest``; ValueError naming the bad field."""
    from google.protobuf.json_format import ParseDict, ParseError

    if not isinstance(body, dict):
        raise ValueError("the body must be a JSON object with InspectRequest's fields")
    try:
        return ParseDict(body, pb.InspectRequest())
    except ParseError as e:
        raise ValueError(f"bad InspectRequest: {e}") from None


def status_of(exc: BaseException) -> tuple[int, str, str]:
    """``(HTTP status, OpenAI error type, message)`` of what the inspect call raised."""
    import grpc

    from services.errors import status_for

    if isinstance(exc, grpc.RpcError) and callable(getattr(exc, "code", None)):
        code, message = exc.code(), exc.details() or ""
    else:
        code, message = status_for(exc)
    status, kind = HTTP_ERRORS.get(code.name, (500, "server_error"))
    return status, kind, message


def inspect_router(inspect: Inspect):
    """``GET /inspect`` (the page), ``GET /inspect/{asset}`` and ``POST /v1/inspect`` over ``inspect``."""
    from fastapi import APIRouter, Request
    from fastapi.responses import FileResponse, JSONResponse

    router = APIRouter()

    @router.get("/inspect", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "inspect.html", media_type="text/html")

    @router.get("/inspect/{asset}", include_in_schema=False)
    async def asset(asset: str):
        if asset not in ASSETS:
            return JSONResponse(error_body(404, f"no such file: {asset}", "not_found_error"), status_code=404)
        return FileResponse(STATIC / asset, media_type=ASSETS[asset])

    @router.post("/v1/inspect")
    async def v1_inspect(request: Request):
        try:
            body = await request.json()
        except ValueError:
            return JSONResponse(error_body(400, "the body is not valid JSON"), status_code=400)
        try:
            req = from_json(body)
        except ValueError as e:
            return JSONResponse(error_body(400, str(e)), status_code=400)
        try:
            resp = await inspect(req)
        except Exception as e:  # mapped exactly as the gRPC boundary maps it
            status, kind, message = status_of(e)
            return JSONResponse(error_body(status, message, kind), status_code=status)
        return JSONResponse(to_json(resp))

    return router


def grpc_inspect(stub, metadata: tuple = (), timeout: float = 120.0) -> Inspect:
    """``inspect`` through an ``InferenceService`` stub on a ``grpc.aio`` channel."""

    async def call(req: pb.InspectRequest) -> pb.InspectResponse:
        return await stub.Inspect(req, metadata=metadata, timeout=timeout)

    return call


__all__ = ["HTTP_ERRORS", "STATIC", "error_body", "from_json", "grpc_inspect", "inspect_router", "status_of",
           "to_json"]
