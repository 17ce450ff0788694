"""Errors in OpenAI's shape, mapped from the same typed errors the gRPC boundary uses.

``{"error": {"message", "type", "param", "code"}}`` with the HTTP status that OpenAI's clients turn
into their exception classes (``openai.BadRequestError`` for 400, ``AuthenticationError`` 401,
``NotFoundError`` 404, ``RateLimitError`` 429, ``InternalServerError`` 5xx). The status comes from
:func:`services.errors.status_for` with the inference service's own mappings
(``services.inference.servicer.ERRORS``: a full queue is ``RESOURCE_EXHAUSTED``), so HTTP and gRPC
can never disagree about what an exception means; only the gRPC code -> HTTP status table is here.
"""

from __future__ import annotations

import logging

import grpc

from services.errors import clip, status_for
from services.inference.servicer import ERRORS

log = logging.getLogger("lmstack.http")

HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400, grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403, grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
ERROR_TYPE = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
              404: "not_found_error", 429: "rate_limit_error", 503: "service_unavailable", 504: "timeout"}
ERROR_CODE = {grpc.StatusCode.NOT_FOUND: "model_not_found", grpc.StatusCode.UNAUTHENTICATED: "invalid_api_key",
              grpc.StatusCode.RESOURCE_EXHAUSTED: "rate_limit_exceeded"}


class HttpError(Exception):
    """An error the HTTP layer itself raises (a field OpenAI has and lmstack refuses, a bad form)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPE.get(status, "server_error"), "param": param,
                      "code": code}}


def _param_of(exc: BaseException) -> str | None:
    """The field a pydantic error is about (``temperature``), for OpenAI's ``param``."""
    try:
        import pydantic

        if isinstance(exc, pydantic.ValidationError) and exc.errors():
            loc = exc.errors()[0].get("loc", ())
            return ".".join(str(p) for p in loc) or None
    except ImportError:  # pragma: no cover
        pass
    return None


def from_exception(exc: BaseException) -> tuple[int, dict]:
    """``(HTTP status, OpenAI error body)`` for an exception raised by the handler or this layer."""
    if isinstance(exc, HttpError):
        return exc.status, body(exc.status, exc.message, exc.param, exc.code)
    code, message = status_for(exc, ERRORS)
    status = HTTP_STATUS.get(code, 500)
    if status == 500:
        log.error("HTTP request failed: %s", message, exc_info=exc)
    else:
        log.info("HTTP %d: %s", status, message)
    return status, body(status, message, _param_of(exc), ERROR_CODE.get(code))


def from_validation(errors: list[dict]) -> dict:
    """FastAPI's request validation errors (wrong types, missing or unknown fields, NaN) -> a 400 body."""
    parts, param = [], None
    for err in errors[:8]:
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        where = ".".join(loc) or "body"
        param = param or (where if loc else None)
        msg = err.get("msg", "invalid")
        got = err.get("input")
        shown = "" if got is None or isinstance(got, dict | list) else f" (got {clip(got)})"
        parts.append(f"{where}: {msg}{shown}")
    return body(400, "invalid request: " + "; ".join(parts), param)
