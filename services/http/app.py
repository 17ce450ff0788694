"""The OpenAI-compatible HTTP API: a FastAPI app over an ``InferenceHandler``.

``create_app(handler, api_keys)`` builds the app; :mod:`services.http.server` runs it with uvicorn
beside (or instead of) the gRPC server, on the same handler, engines and model registry.

Routes (each group is an ``APIRouter`` in ``ROUTERS``; add a feature's routes as a router of its
own module and list it there):

* ``POST /v1/completions``, ``POST /v1/chat/completions`` (:mod:`services.http.openai`), unary
  or server-sent events;
* ``GET /v1/models``, ``GET /v1/models/{id}``: the served models, fine-tuned ones included, as
  ``ListModels`` shows them;
* ``POST /tokenize``, ``POST /detokenize`` (vLLM's shapes);
* ``GET /health``: 200 once the models are loaded, 503 before and while draining;
* ``GET /inspect`` (a web page) and ``POST /v1/inspect`` (the Inspect RPC as JSON):
  :mod:`services.http.inspect`.

Every route but ``/health`` needs ``Authorization: Bearer <key>`` when the server has API keys
(the same keys as gRPC, resolved to a tenant by the same ``services.tenants.KeyRing.resolve``:
``/v1/models`` shows the configured models plus the tenant's own fine-tuned ones, another tenant's
model is a 404 ``model_not_found``, a quota is a 429). Every error, a body that is not
valid JSON or breaks the schema included, is a 4xx/5xx in OpenAI's shape
(:mod:`services.http.errors`), never a traceback; an unexpected one is a 500 with the details in
the log, and the server keeps serving.
"""

from __future__ import annotations

import types
from contextlib import aclosing

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from services import tenants
from services.errors import NotFound, ServiceError, Unauthenticated, Unavailable, clip
from services.gen.lmstack.v1 import inference_pb2 as pb
from services.tenants import KeyRing

from . import openai
from .errors import HttpError, body, from_exception, from_validation
from .schemas import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest


class SSEResponse(StreamingResponse):
    """Server-sent events whose body generator is always closed, also when the client goes away
    mid-send (Starlette cancels the send and would leave the generator suspended): closing it
    closes the handler streams, which aborts their engine requests."""

    media_type = "text/event-stream"

    async def stream_response(self, send) -> None:
        async with aclosing(self.body_iterator):
            await super().stream_response(send)


def state(request: Request) -> types.SimpleNamespace:
    return request.app.state.lmstack


async def require_key(request: Request) -> None:
    """The same rule as gRPC's (``services.tenants.KeyRing.resolve``) on the ``Authorization``
    header (and an admin's ``LMSTACK-Tenant``): the request then runs as that tenant, so
    ``/v1/models`` lists and completions use only its models; and no work while the models load
    or the server drains (503)."""
    st = state(request)
    tenant, why = st.keys.resolve(request.headers.items())
    if tenant is None:
        raise Unauthenticated(why if request.headers.get("authorization") else
                              "missing API key: send the header 'Authorization: Bearer <key>'")
    tenants.set_current(tenant)  # this request's task (a streamed body's tasks inherit it)
    if not st.serving:
        raise Unavailable("the server is " + ("shutting down" if st.draining else "still loading its models")
                          + "; retry shortly")


api = APIRouter(dependencies=[Depends(require_key)])
open_routes = APIRouter()


@open_routes.get("/health")
async def health(request: Request):
    st = state(request)
    if st.serving:
        return {"status": "ok"}
    return JSONResponse(body(503, "draining" if st.draining else "loading models"), status_code=503)


async def _respond(handler, shape, body_, prompts: list, texts: list):
    openai.refuse_unsupported(body_)
    choices = shape.choices(body_.model, prompts, texts)
    openai.check_choices(choices)
    if not body_.stream:
        return await openai.run_unary(handler, shape, body_.model, choices)
    opened = await openai.open_streams(handler, choices)
    model = body_.model or handler.default_model
    include_usage = bool(body_.stream_options and body_.stream_options.include_usage)
    return SSEResponse(openai.sse_events(shape, model, choices, opened, include_usage),
                       headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@api.post("/v1/completions")
async def completions(body_: CompletionRequest, request: Request):
    handler = state(request).handler
    prompts = openai.split_prompts(body_.prompt)
    texts: list[str | None] = []
    for p in prompts:  # the prompt's text: echoed, and where text_offset starts
        if isinstance(p, str):
            texts.append(p)
        elif body_.echo or body_.logprobs is not None:
            texts.append((await handler.detokenize(body_.model, list(p)))[1])
        else:
            texts.append(None)
    return await _respond(handler, openai.CompletionShape(body_), body_, prompts, texts)


@api.post("/v1/chat/completions")
async def chat_completions(body_: ChatCompletionRequest, request: Request):
    handler = state(request).handler
    prompt = await _render_chat(handler, body_.model, body_.messages, True)
    return await _respond(handler, openai.ChatShape(body_), body_, [prompt], [prompt])


async def _render_chat(handler, model: str, messages, add_generation_prompt: bool) -> str:
    name, template = await handler.chat_template(model)
    if template is None:
        raise HttpError(400, f"model {name!r} has no chat template (tokenizer_config.json has no "
                             "chat_template): use /v1/completions, or serve a model that has one", "model",
                        "no_chat_template")
    return template.render([m.model_dump(exclude_none=True) for m in messages], add_generation_prompt)


def model_object(m: pb.ModelInfo) -> dict:
    return {"id": m.name, "object": "model", "created": 0, "owned_by": m.tenant or "lmstack",
            "parent": m.base_model or None, "max_model_len": m.context_length,
            "source": m.source, "is_default": m.is_default}


@api.get("/v1/models")
async def list_models(request: Request):
    reply = await state(request).handler.list_models(pb.ListModelsRequest())
    return {"object": "list", "data": [model_object(m) for m in reply.models]}


@api.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request):
    reply = await state(request).handler.list_models(pb.ListModelsRequest())
    found = next((m for m in reply.models if m.name == model_id), None)
    if found is None:
        raise NotFound(f"model {clip(model_id)} not found; GET /v1/models lists the served models")
    return model_object(found)


@api.post("/tokenize")
async def tokenize(body_: TokenizeRequest, request: Request):
    handler = state(request).handler
    if (body_.prompt is None) == (body_.messages is None):
        raise HttpError(400, "give either prompt or messages", "prompt")
    if body_.messages is not None:
        text = await _render_chat(handler, body_.model, body_.messages, body_.add_generation_prompt)
    else:
        text = body_.prompt
    _, ids, context = await handler.tokenize(body_.model, text, allow_special=body_.messages is not None)
    return {"tokens": ids, "count": len(ids), "max_model_len": context}


@api.post("/detokenize")
async def detokenize(body_: DetokenizeRequest, request: Request):
    _, text = await state(request).handler.detokenize(body_.model, list(body_.tokens))
    return {"prompt": text}


ROUTERS = [open_routes, api]  # a feature's own router goes here (e.g. services.http.inspect's)


def create_app(handler, api_keys: KeyRing | list[str] = ()) -> FastAPI:
    """The app over ``handler`` (an ``InferenceHandler``); ``app.state.lmstack.serving`` gates it
    (``services.http.server.HttpServer.set_serving`` flips it). ``api_keys``: the tenants' key ring
    (or plain keys: one admin tenant)."""
    app = FastAPI(title="lmstack OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None)
    keys = api_keys if isinstance(api_keys, KeyRing) else KeyRing.from_settings(list(api_keys))
    app.state.lmstack = types.SimpleNamespace(handler=handler, keys=keys, serving=False, draining=False)
    from . import inspect

    for router in [*ROUTERS, *inspect.routers(require_key, state)]:
        app.include_router(router)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError):
        return JSONResponse(from_validation(exc.errors()), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):  # 404 route, 405 method
        return JSONResponse(body(exc.status_code, str(exc.detail)), status_code=exc.status_code)

    async def handler_error(request: Request, exc: Exception):
        status, payload = from_exception(exc)
        return JSONResponse(payload, status_code=status)

    # Named classes are answered by Starlette's exception middleware; ``Exception`` itself (a bug:
    # a 500) by its outermost one, which also logs the traceback.
    for exc_type in (HttpError, ServiceError, ValueError, RuntimeError, TypeError, LookupError, Exception):
        app.add_exception_handler(exc_type, handler_error)

    return app
