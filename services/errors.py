"""One error boundary per service: exceptions become a gRPC status with a message a user can act on.

Handlers raise plain exceptions; ``ErrorBoundary`` (a ``grpc.aio`` server interceptor installed by
``services.server.GrpcServer``) turns each into a status code, logs it once and records it in the
RPC metrics. The mapping, most specific first:

* ``ServiceError`` subclasses carry their own code: ``InvalidArgument``, ``NotFound``,
  ``ResourceExhausted``, ``Unauthenticated``, ``FailedPrecondition``, ``Unavailable``.
* ``pydantic.ValidationError`` (e.g. ``lmcore.SamplingParams``): ``INVALID_ARGUMENT``, listing each
  bad field and why.
* ``lmcore.engine.EngineOverloaded``: ``RESOURCE_EXHAUSTED`` (the waiting queue is full; retry later).
* ``ValueError``: ``INVALID_ARGUMENT``. lmcore's contract is that bad input raises ``ValueError``
  with a clear message (unknown token ids, prompts past the context, unknown prompt styles).
* Types added with ``register(exc_type, code)`` (the fine-tuning service maps Redis outages to
  ``UNAVAILABLE`` this way).
* Anything else is a server bug: ``INTERNAL`` with a short message, the traceback in the log.

Cancellation and deadlines are left to gRPC (``CANCELLED``, ``DEADLINE_EXCEEDED``); a handler that
already called ``context.abort`` keeps its status. The server keeps serving after every error.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import sys
import time

import grpc

log = logging.getLogger("lmstack.errors")


class ServiceError(Exception):
    """A user-facing error with its gRPC status code; the message is sent to the client as is."""

    code = grpc.StatusCode.INTERNAL


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class ResourceExhausted(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unauthenticated(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


_REGISTERED: list[tuple[type[BaseException], grpc.StatusCode]] = []


def register(exc_type: type[BaseException], code: grpc.StatusCode) -> None:
    """Map another exception type to a status code (checked before the ``ValueError`` fallback)."""
    _REGISTERED.insert(0, (exc_type, code))


def format_validation_error(exc) -> str:
    """``pydantic.ValidationError`` as one line: ``temperature: Input should be >= 0 (got -1.0); ...``."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ())) or "value"
        msg = err.get("msg", "invalid").removeprefix("Value error, ")
        got = err.get("input")
        parts.append(f"{where}: {msg}" + ("" if isinstance(got, dict) or got is None else f" (got {got!r})"))
    return "invalid parameters: " + "; ".join(parts) if parts else str(exc)


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and client-facing message for an exception raised by a handler."""
    if isinstance(exc, ServiceError):
        return exc.code, str(exc)
    try:
        import pydantic

        if isinstance(exc, pydantic.ValidationError):
            return grpc.StatusCode.INVALID_ARGUMENT, format_validation_error(exc)
    except ImportError:  # pragma: no cover
        pass
    engine = sys.modules.get("lmcore.engine")  # only loaded where an engine runs
    overloaded = getattr(engine, "EngineOverloaded", None)
    if overloaded is not None and isinstance(exc, overloaded):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, f"server overloaded, retry later: {exc}"
    for exc_type, code in _REGISTERED:
        if isinstance(exc, exc_type):
            return code, str(exc)
    if isinstance(exc, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); the server logged the details"


class ErrorBoundary(grpc.aio.ServerInterceptor):
    """Wraps every async unary-request RPC: maps exceptions to statuses, logs once, records metrics.

    ``metrics`` is a ``services.metrics.RpcMetrics`` (or None): a request counter by method and
    code, and a latency histogram by method.
    """

    def __init__(self, metrics=None):
        self.metrics = metrics

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or handler.request_streaming:
            return handler  # reflection's bidi stream: not ours, left alone
        method = details.method
        if handler.unary_unary and inspect.iscoroutinefunction(handler.unary_unary):
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(method, handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream and inspect.isasyncgenfunction(handler.unary_stream):
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(method, handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    def _wrap_unary(self, method, behavior):
        async def unary(request, context):
            start, code = time.perf_counter(), grpc.StatusCode.OK
            try:
                return await behavior(request, context)
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except grpc.aio.AbortError:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            except Exception as exc:  # the boundary: every exception becomes a status
                code, message = self._handle(method, exc)
                await context.abort(code, message)
            finally:
                self._record(method, code, start)

        return unary

    def _wrap_stream(self, method, behavior):
        async def stream(request, context):
            start, code = time.perf_counter(), grpc.StatusCode.OK
            gen = behavior(request, context)
            try:
                async for item in gen:
                    yield item
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except grpc.aio.AbortError:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            except Exception as exc:
                code, message = self._handle(method, exc)
                await context.abort(code, message)
            finally:
                await gen.aclose()  # runs the handler's cleanup now (aborts its engine request)
                self._record(method, code, start)

        return stream

    def _handle(self, method: str, exc: Exception) -> tuple[grpc.StatusCode, str]:
        code, message = status_for(exc)
        if code == grpc.StatusCode.INTERNAL:
            log.error("%s failed: %s", method, message, exc_info=exc)
        else:
            log.info("%s -> %s: %s", method, code.name, message)
        return code, message

    def _record(self, method: str, code, start: float) -> None:
        if self.metrics is not None:
            self.metrics.observe(method, code.name if hasattr(code, "name") else str(code),
                                 time.perf_counter() - start)
