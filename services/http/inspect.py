"""``/inspect`` (a web page) and ``POST /v1/inspect`` (the Inspect RPC as JSON) on the HTTP server.

``POST /v1/inspect`` takes ``InspectRequest``'s fields as JSON (``{"model": "...", "text": "...",
"top_k": 5, "attention": true, "layers": [0], "logit_lens": true}``; an unknown field is a 400),
calls ``InferenceHandler.inspect`` (so lmcore and the handler make every check, and errors map as
every other route's: OpenAI's shape, 400/401/404/429/503), and answers every ``InspectResponse``
field, names as in the proto (``docs/api.md``); ``bytes`` fields (a token's ``piece``, a layer's
float16 ``weights``) are base64, as protobuf's JSON mapping has them. It needs the API key when the
server has keys, like the other ``/v1`` routes.

The page (``static/``: HTML, JS and CSS shipped in the package, nothing from a CDN, so it works
offline) is open: it holds no data. In the browser it lists ``GET /v1/models``, calls ``POST
/v1/inspect`` (with the key typed into its key field, if any) and shows the tokens colored by
surprise, a token's top-k next tokens, where it attends for a chosen layer and head (lines as in
BertViz's head view, or a heatmap) and the logit-lens table.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse

from services.gen.lmstack.v1 import inference_pb2 as pb

from .errors import HttpError

STATIC = Path(__file__).with_name("static")
ASSETS = {"inspect.js": "text/javascript", "inspect.css": "text/css"}


def to_json(resp: pb.InspectResponse) -> dict:
    """An ``InspectResponse`` as JSON: proto field names, every field present, bytes as base64."""
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(resp, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def from_json(body) -> pb.InspectRequest:
    """A JSON body as an ``InspectRequest``; a 400 naming the bad field."""
    from google.protobuf.json_format import ParseDict, ParseError

    if not isinstance(body, dict):
        raise HttpError(400, "the body must be a JSON object with InspectRequest's fields")
    try:
        return ParseDict(body, pb.InspectRequest())
    except ParseError as e:
        raise HttpError(400, f"bad InspectRequest: {e}") from None


def routers(require_key, state) -> list[APIRouter]:
    """The page's open router and the API's keyed one (``services.http.app`` passes its key check
    and state accessor, so auth and the serving gate are the other routes' own)."""
    page = APIRouter()

    @page.get("/inspect", include_in_schema=False)
    async def inspect_page():
        return FileResponse(STATIC / "inspect.html", media_type="text/html")

    @page.get("/inspect/{asset}", include_in_schema=False)
    async def inspect_asset(asset: str):
        if asset not in ASSETS:
            raise HttpError(404, f"no such file: /inspect/{asset}")
        return FileResponse(STATIC / asset, media_type=ASSETS[asset])

    api = APIRouter(dependencies=[Depends(require_key)])

    @api.post("/v1/inspect")
    async def inspect(request: Request):
        try:
            body = await request.json()
        except ValueError:
            raise HttpError(400, "the body is not valid JSON") from None
        resp = await state(request).handler.inspect(from_json(body))
        return to_json(resp)

    return [page, api]
