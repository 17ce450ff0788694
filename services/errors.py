"""One error boundary per service: exceptions become a gRPC status with a message a user can act on.

Handlers raise plain exceptions; ``ErrorBoundary`` (a ``grpc.aio`` server interceptor installed by
``services.server.GrpcServer``) turns each into a status code, logs it once and records it in the
RPC metrics, for every RPC kind lmstack serves: unary, server-streaming (``CompleteStream``,
``WatchJob``) and client-streaming (``UploadDataset``). So a servicer is one line per RPC and no
RPC kind needs its own copy of the mapping. The mapping, most specific first:

* ``ServiceError`` subclasses carry their own code: ``InvalidArgument``, ``NotFound``,
  ``ResourceExhausted``, ``Unauthenticated``, ``FailedPrecondition``, ``Unavailable``.
* ``pydantic.ValidationError`` (e.g. ``lmcore.SamplingParams``): ``INVALID_ARGUMENT``, listing each
  bad field and why.
* The service's own mappings, registered where the service is added to its server
  (``GrpcServer.map_errors({...})``) rather than in a process-wide table, because only that
  service knows what its dependencies raise: the inference service maps
  ``lmcore.EngineOverloaded`` to ``RESOURCE_EXHAUSTED`` ("server overloaded, retry later: ..."),
  the fine-tuning service ``redis.RedisError`` to ``UNAVAILABLE`` and ``DatasetError`` to
  ``INVALID_ARGUMENT``. A rule is a code (the message is ``str(exc)``) or ``(code, template)``
  with ``{e}`` standing for the exception; the most specific class of the exception wins.
* ``ValueError``: ``INVALID_ARGUMENT``. lmcore's contract is that bad input raises ``ValueError``
  with a clear message (unknown token ids, prompts past the context, unknown prompt styles).
* Anything else is a server bug: ``INTERNAL`` with a short message, the traceback in the log.

Cancellation and deadlines are left to gRPC (``CANCELLED``, ``DEADLINE_EXCEEDED``); a handler that
already called ``context.abort`` keeps its status. The server keeps serving after every error.
``status_for(exc, error_map)`` is the same table for transports that are not a ``grpc.aio`` server
(the Ray Serve deployment sets it on Ray's context).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Mapping

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


# An extra mapping: exception type -> status code (message: ``str(exc)``), or -> (code, template)
# where the template's ``{e}`` is the exception (``"server overloaded, retry later: {e}"``).
ErrorRule = grpc.StatusCode | tuple[grpc.StatusCode, str]
ErrorMap = Mapping[type[BaseException], ErrorRule]


MAX_ECHO_CHARS = 80  # of one client value quoted in a message
MAX_MESSAGE_CHARS = 1024  # of a whole status message (a status travels in HTTP/2 trailers)


def clip(value, limit: int = MAX_ECHO_CHARS) -> str:
    """``repr(value)`` cut to ``limit`` characters, saying how much was left out: error messages and
    log lines quote client input, and a client may send megabytes of it."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


def format_validation_error(exc) -> str:
    """``pydantic.ValidationError`` as one line: ``temperature: Input should be >= 0 (got -1.0); ...``."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ())) or "value"
        msg = err.get("msg", "invalid").removeprefix("Value error, ")
        got = err.get("input")
        parts.append(f"{where}: {msg}" + ("" if isinstance(got, dict) or got is None else f" (got {clip(got)})"))
    return "invalid parameters: " + "; ".join(parts) if parts else str(exc)


def _lookup(exc: BaseException, error_map: ErrorMap) -> tuple[grpc.StatusCode, str] | None:
    """The rule for the most specific class of ``exc`` in ``error_map`` (walks the MRO, so a
    mapping for ``redis.RedisError`` covers ``redis.ConnectionError`` and a subclass listed on
    its own wins over its base, whatever the order the service registered them in)."""
    for cls in type(exc).__mro__:
        rule = error_map.get(cls)
        if rule is not None:
            code, template = rule if isinstance(rule, tuple) else (rule, "{e}")
            return code, template.format(e=exc)
    return None


def status_for(exc: BaseException, error_map: ErrorMap | None = None) -> tuple[grpc.StatusCode, str]:
    """The status code and client-facing message for an exception raised by a handler.

    ``error_map`` holds the service's own mappings (see the module docstring); they are checked
    after ``ServiceError`` and pydantic, before the ``ValueError`` fallback. Messages are cut to
    ``MAX_MESSAGE_CHARS`` (client values quoted in them to ``MAX_ECHO_CHARS`` each, see :func:`clip`).
    """
    code, message = _status_for(exc, error_map)
    if len(message) > MAX_MESSAGE_CHARS:  # whatever a handler quoted, the status (and log line) stays small
        message = f"{message[:MAX_MESSAGE_CHARS]}... ({len(message) - MAX_MESSAGE_CHARS} more characters)"
    return code, message


def _status_for(exc: BaseException, error_map: ErrorMap | None) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, ServiceError):
        return exc.code, str(exc)
    try:
        import pydantic

        if isinstance(exc, pydantic.ValidationError):
            return grpc.StatusCode.INVALID_ARGUMENT, format_validation_error(exc)
    except ImportError:  # pragma: no cover
        pass
    found = _lookup(exc, error_map) if error_map else None
    if found is not None:
        return found
    if isinstance(exc, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); the server logged the details"


class ErrorBoundary(grpc.aio.ServerInterceptor):
    """Wraps every async RPC with a unary response or a unary request (all of lmstack's): maps
    exceptions to statuses, logs once, records metrics.

    ``metrics`` is a ``services.metrics.RpcMetrics`` (or None): a request counter by method and
    code, and a latency histogram by method. ``error_map`` is the server's extra mappings;
    :meth:`map_errors` adds more (each service registers its own when it is added).
    """

    def __init__(self, metrics=None, error_map: ErrorMap | None = None):
        self.metrics = metrics
        self.error_map: dict[type[BaseException], ErrorRule] = dict(error_map or {})

    def map_errors(self, error_map: ErrorMap) -> None:
        """Add mappings (exception type -> code or ``(code, template)``); a type given twice is an
        error, so two services on one server cannot silently override each other's rule."""
        for exc_type, rule in error_map.items():
            if exc_type in self.error_map and self.error_map[exc_type] != rule:
                raise ValueError(f"{exc_type.__name__} is already mapped to {self.error_map[exc_type]!r}")
            self.error_map[exc_type] = rule

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:
            return None
        method = details.method
        kw = dict(request_deserializer=_tolerant(handler.request_deserializer),
                  response_serializer=handler.response_serializer)
        if handler.unary_unary and inspect.iscoroutinefunction(handler.unary_unary):
            return grpc.unary_unary_rpc_method_handler(self._wrap_unary(method, _checked(handler.unary_unary)), **kw)
        if handler.stream_unary and inspect.iscoroutinefunction(handler.stream_unary):
            # Client-streaming: the first argument is the request iterator; same wrapper.
            behavior = _checked_stream_in(handler.stream_unary)
            return grpc.stream_unary_rpc_method_handler(self._wrap_unary(method, behavior), **kw)
        if handler.unary_stream and inspect.isasyncgenfunction(handler.unary_stream):
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(method, _checked_gen(handler.unary_stream)), **kw)
        # Not ours (health's Watch writes with context.write, reflection is bidirectional): only a
        # malformed request is answered here, INVALID_ARGUMENT like everywhere else.
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(_aborting(handler.unary_stream), **kw)
        if handler.stream_stream and inspect.isasyncgenfunction(handler.stream_stream):
            return grpc.stream_stream_rpc_method_handler(_aborting_bidi(handler.stream_stream), **kw)
        return handler

    # Metrics are recorded before ``context.abort`` sends the status, so a client that has seen
    # its error finds it counted (abort raises, and code after it runs after the client knows).
    def _wrap_unary(self, method, behavior):
        async def unary(request, context):
            start = time.perf_counter()
            try:
                response = await behavior(request, context)
            except asyncio.CancelledError:
                self._record(method, grpc.StatusCode.CANCELLED, start)
                raise
            except grpc.aio.AbortError:
                self._record(method, context.code() or grpc.StatusCode.UNKNOWN, start)
                raise
            except Exception as exc:  # the boundary: every exception becomes a status
                code, message = self._handle(method, exc)
                self._record(method, code, start)
                await context.abort(code, message)
            self._record(method, grpc.StatusCode.OK, start)
            return response

        return unary

    def _wrap_stream(self, method, behavior):
        async def stream(request, context):
            start = time.perf_counter()
            gen = behavior(request, context)
            try:
                async for item in gen:
                    yield item
            except asyncio.CancelledError:
                self._record(method, grpc.StatusCode.CANCELLED, start)
                raise
            except grpc.aio.AbortError:
                self._record(method, context.code() or grpc.StatusCode.UNKNOWN, start)
                raise
            except Exception as exc:
                code, message = self._handle(method, exc)
                await gen.aclose()
                self._record(method, code, start)
                await context.abort(code, message)
            except GeneratorExit:  # the transport closed the stream (client gone): no status of ours
                self._record(method, grpc.StatusCode.CANCELLED, start)
                raise
            else:
                self._record(method, grpc.StatusCode.OK, start)
            finally:
                await gen.aclose()  # runs the handler's cleanup now (aborts its engine request)

        return stream

    def _handle(self, method: str, exc: BaseException) -> tuple[grpc.StatusCode, str]:
        code, message = status_for(exc, self.error_map)
        if code == grpc.StatusCode.INTERNAL:
            log.error("%s failed: %s", method, message, exc_info=exc)
        else:
            log.info("%s -> %s: %s", method, code.name, message)
        return code, message

    def _record(self, method: str, code, start: float) -> None:
        if self.metrics is not None:
            self.metrics.observe(method, code.name if hasattr(code, "name") else str(code),
                                 time.perf_counter() - start)


# --- malformed requests ----------------------------------------------------------------------------
# grpcio answers a request it cannot deserialize with UNKNOWN (or INTERNAL) before any handler
# runs. The boundary installs a tolerant deserializer instead: bytes that do not parse become a
# ``Malformed`` marker, and the wrapped handler raises ``InvalidArgument`` for it, so a malformed
# message is INVALID_ARGUMENT with a clear message, counted and logged like any other bad input.
class Malformed:
    """Stands for a request message that did not parse."""

    __slots__ = ("error", "size")

    def __init__(self, error: Exception, size: int):
        self.error, self.size = error, size

    def exception(self) -> InvalidArgument:
        return InvalidArgument(f"malformed request: {self.size} bytes that are not a valid message of this "
                               f"RPC's request type ({type(self.error).__name__}: {str(self.error)[:200]})")


def _tolerant(deserializer):
    if deserializer is None:
        return None

    def deserialize(data: bytes):
        try:
            return deserializer(data)
        except Exception as e:  # DecodeError, invalid UTF-8 in a string field, ...
            return Malformed(e, len(data))

    return deserialize


async def _checked_requests(requests):
    async for item in requests:
        if isinstance(item, Malformed):
            raise item.exception()
        yield item


def _checked(behavior):
    async def unary(request, context):
        if isinstance(request, Malformed):
            raise request.exception()
        return await behavior(request, context)

    return unary


def _checked_stream_in(behavior):
    async def stream_in(requests, context):
        return await behavior(_checked_requests(requests), context)

    return stream_in


def _checked_gen(behavior):
    async def stream(request, context):
        if isinstance(request, Malformed):
            raise request.exception()
        async for item in behavior(request, context):
            yield item

    return stream


def _aborting(behavior):
    async def stream(request, context):
        if isinstance(request, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(request.exception()))
        return await behavior(request, context)

    return stream


def _aborting_bidi(behavior):
    async def bidi(requests, context):
        try:
            async for item in behavior(_checked_requests(requests), context):
                yield item
        except InvalidArgument as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

    return bidi
