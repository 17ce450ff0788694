"""The shared ``grpc.aio`` server stack every lmstack service runs on.

``GrpcServer(settings, component)`` builds a server with, in order of a request's path:

1. ``ErrorBoundary`` (``services.errors``): exceptions become status codes, logged once, counted in
   ``lmstack_<component>_rpc_*`` metrics.
2. ``ApiKeyAuth``: when keys are configured (``--api-keys-file``, ``--api-keys``), every RPC but
   health and reflection needs ``authorization: Bearer <key>`` metadata, else ``UNAUTHENTICATED``;
   the RPC then runs as the key's tenant (``services.tenants.current()``).
3. Your servicers, plus the ``grpc.health.v1`` health service and server reflection.

TLS (``--tls-cert``/``--tls-key``, mTLS with ``--tls-client-ca``) and the exposure rule (a
non-loopback address needs keys and TLS, or ``--insecure``) are ``services.tls``'s.

Messages up to ``settings.max_message_bytes`` (64 MiB by default) are accepted and sent both ways.
Server limits come from the settings too: ``max_concurrent_rpcs`` (past it, grpc answers
``RESOURCE_EXHAUSTED``), keepalive pings and the maximum connection age (``keepalive_*``,
``max_connection_age_*``). A request that is not valid protobuf is ``INVALID_ARGUMENT`` (the error
boundary's tolerant deserializers), never grpcio's ``UNKNOWN``.
Each service registers the exceptions only it knows about with ``server.map_errors({...})`` (the
inference service: ``EngineOverloaded``; the fine-tuning service: Redis and dataset errors).

Ports are never shared: grpcio turns ``SO_REUSEPORT`` on by default, which lets a second server
bind a port already served and take a random half of its requests. Every server here binds with
``grpc.so_reuseport`` off, checks its gRPC and metrics ports before binding either, and raises
``PortInUse`` naming ``host:port`` (and the process holding it, when /proc or psutil can tell);
``run_service`` prints that as one line and exits with status 2.

Health reports ``NOT_SERVING`` from ``start()`` until you call ``set_serving()`` (after models
load), and again from the moment shutdown begins. ``stop()`` is graceful: it stops accepting new
RPCs and lets in-flight ones finish within ``settings.grace_period_s``.

Reuse (the fine-tuning service's ``__main__`` is this shape)::

    from services.server import GrpcServer, run_service

    async def setup(server: GrpcServer):
        handler = FineTuneHandler(...)                      # plain class: protobuf in, protobuf out
        server.add_service(finetune_pb2_grpc.add_FineTuningServiceServicer_to_server,
                           FineTuningServicer(handler), "lmstack.v1.FineTuningService")
        server.map_errors({redis.RedisError: (grpc.StatusCode.UNAVAILABLE, "job store down: {e}")})
        async def ready():                                  # after start(): load what takes time
            await handler.connect()
        async def cleanup():                                # after the graceful stop
            await handler.close()
        return ready, cleanup

    def main(argv=None):
        run_service(FineTuneSettings.from_args(sys.argv[1:] if argv is None else argv), "finetune", setup)

``run_service`` configures logging and torch threads, starts the server, awaits ``ready``, marks
health ``SERVING`` and waits for SIGTERM/SIGINT, then drains and calls ``cleanup``.
"""

from __future__ import annotations

import asyncio
import errno
import inspect
import logging
import signal
import types
from collections.abc import Awaitable, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server

from . import tenants
from .config import ServiceSettings
from .errors import ErrorBoundary, ErrorMap, Unauthenticated
from .metrics import RpcMetrics
from .ports import PortInUse, check_port_free
from .tenants import KeyRing, Tenant
from .tls import check_exposure, server_credentials

log = logging.getLogger("lmstack.server")

# RPCs that never need an API key: load balancers probe health, tools discover services.
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """gRPC options for servers and clients: message size limits both ways."""
    return [("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes)]


def server_options(max_message_bytes: int, settings: ServiceSettings | None = None) -> list[tuple[str, int]]:
    """``channel_options`` plus ``grpc.so_reuseport`` off (a port in use is an error, never shared)
    and, from ``settings``, keepalive and connection-age limits."""
    options = [*channel_options(max_message_bytes), ("grpc.so_reuseport", 0)]
    if settings is not None:
        options += [("grpc.keepalive_time_ms", int(settings.keepalive_time_s * 1000)),
                    ("grpc.keepalive_timeout_ms", int(settings.keepalive_timeout_s * 1000)),
                    ("grpc.max_connection_age_ms", int(settings.max_connection_age_s * 1000)),
                    ("grpc.max_connection_age_grace_ms", int(settings.max_connection_age_grace_s * 1000))]
    return options


class ApiKeyAuth(grpc.aio.ServerInterceptor):
    """Resolves ``authorization: Bearer <key>`` to a tenant (``services.tenants.KeyRing``: sha256,
    constant-time compare) and runs the RPC as that tenant (``tenants.current()`` in handlers).

    With no keys configured every RPC runs as ``tenants.ANONYMOUS``. An admin may send
    ``lmstack-tenant: <name>`` metadata to act for that tenant. A missing or wrong key, or an
    unknown tenant to act for, is ``UNAUTHENTICATED`` before the handler (or the first chunk of a
    client stream) runs.
    """

    def __init__(self, keys: KeyRing | list[str]):
        self.keys = keys if isinstance(keys, KeyRing) else KeyRing.from_settings(list(keys))

    async def intercept_service(self, continuation, details):
        if details.method.startswith(OPEN_METHOD_PREFIXES):
            return await continuation(details)
        tenant, message = self.keys.resolve(details.invocation_metadata)
        handler = await continuation(details)
        if handler is None:
            return None
        kw = dict(request_deserializer=handler.request_deserializer,
                  response_serializer=handler.response_serializer)
        if tenant is None:
            async def deny(request, context):  # the error boundary turns this into UNAUTHENTICATED
                raise Unauthenticated(message)

            async def deny_stream(request, context):
                raise Unauthenticated(message)
                yield  # unreachable: makes this an async generator

            if handler.stream_unary:  # client-streaming (UploadDataset): refused before reading a chunk
                return grpc.stream_unary_rpc_method_handler(deny, **kw)
            if handler.unary_stream:
                return grpc.unary_stream_rpc_method_handler(deny_stream, **kw)
            if handler.unary_unary:
                return grpc.unary_unary_rpc_method_handler(deny, **kw)
            return None  # bidirectional streams: none in lmstack.v1 (reflection is open)
        return _as_tenant(handler, tenant, kw)


def _as_tenant(handler, tenant: Tenant, kw: dict):
    """The same handler, run with ``tenants.current()`` = ``tenant`` (each RPC is its own task)."""
    def unary(behavior):
        async def run(request, context):
            tenants.set_current(tenant)
            return await behavior(request, context)
        return run

    def stream(behavior):
        async def run(request, context):
            tenants.set_current(tenant)
            gen = behavior(request, context)
            try:
                async for item in gen:
                    yield item
            finally:
                await gen.aclose()
        return run

    if handler.unary_unary and inspect.iscoroutinefunction(handler.unary_unary):
        return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary), **kw)
    if handler.stream_unary and inspect.iscoroutinefunction(handler.stream_unary):
        return grpc.stream_unary_rpc_method_handler(unary(handler.stream_unary), **kw)
    if handler.unary_stream and inspect.isasyncgenfunction(handler.unary_stream):
        return grpc.unary_stream_rpc_method_handler(stream(handler.unary_stream), **kw)
    return handler


class HealthServicer(health.aio.HealthServicer):
    """grpcio's asyncio health servicer plus ``List`` (the newest ``grpc.health.v1`` RPC, which it
    leaves unimplemented: a client calling it would get UNKNOWN)."""

    def __init__(self):
        super().__init__()
        self.statuses: dict[str, int] = {}

    async def set(self, service: str, status) -> None:
        self.statuses[service] = status
        await super().set(service, status)

    async def enter_graceful_shutdown(self) -> None:
        self.statuses = dict.fromkeys(self.statuses, health_pb2.HealthCheckResponse.NOT_SERVING)
        await super().enter_graceful_shutdown()

    async def List(self, request, context):
        return health_pb2.HealthListResponse(statuses={
            name: health_pb2.HealthCheckResponse(status=status) for name, status in self.statuses.items()})


class GrpcServer:
    """A ``grpc.aio`` server with lmstack's interceptors, health, reflection and metrics."""

    def __init__(self, settings: ServiceSettings, component: str, registry: CollectorRegistry | None = None,
                 error_map: ErrorMap | None = None):
        self.settings = settings
        self.component = component
        self.metrics_registry = registry or CollectorRegistry()
        self.rpc_metrics = RpcMetrics(component, self.metrics_registry)
        self.errors = ErrorBoundary(self.rpc_metrics, error_map)
        self.keys = KeyRing.from_settings(settings.api_keys, settings.api_keys_file)  # ValueError: bad file
        self.credentials = server_credentials(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
        self.server = grpc.aio.server(
            interceptors=[self.errors, ApiKeyAuth(self.keys)],
            options=server_options(settings.max_message_bytes, settings),
            maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
        )
        self.health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.service_names: list[str] = []
        self.port: int | None = None
        self._metrics_http = None
        self._stopped = asyncio.Event()
        self.state = types.SimpleNamespace()  # the service's objects (registry, handler), for tests and tools
        self.companions: list = []  # other front ends sharing this lifecycle (add_companion)

    def add_service(self, add_to_server: Callable, servicer, service_name: str) -> None:
        """Register a servicer (``add_XServicer_to_server``) under its full name (``lmstack.v1.X``)."""
        add_to_server(servicer, self.server)
        self.service_names.append(service_name)

    def add_companion(self, companion) -> None:
        """Another front end over the same handler (the OpenAI HTTP API, ``services.http.server``)
        that follows this server: ``check_port()`` before anything binds, ``start()`` after the
        gRPC server, ``set_serving(bool)`` with health, ``stop(grace)`` beside the gRPC drain."""
        self.companions.append(companion)

    def map_errors(self, error_map: ErrorMap) -> None:
        """Map exceptions a service's handler raises to status codes (``services.errors``), e.g.
        ``{redis.RedisError: (grpc.StatusCode.UNAVAILABLE, "the job store is unavailable: {e}")}``."""
        self.errors.map_errors(error_map)

    def add_generic_handlers(self, handlers) -> None:
        """Register ``grpc.GenericRpcHandler``s (e.g. the benchmark's echo service); same interceptors."""
        self.server.add_generic_rpc_handlers(tuple(handlers))

    @property
    def address(self) -> str:
        return f"{self.settings.host}:{self.port}"

    async def start(self) -> int:
        """Bind and start serving (health ``NOT_SERVING`` until ``set_serving``); returns the port.

        Raises ``PortInUse`` (nothing left bound) when the gRPC or the metrics port is taken; the
        metrics server is up before the gRPC server starts, so "listening" means both are.
        """
        cfg = self.settings
        host = cfg.host
        check_exposure(host, bool(self.keys), self.credentials is not None, cfg.insecure, f"{self.component} service")
        check_port_free("gRPC", host, cfg.port)
        for companion in self.companions:
            companion.check_port()
        if cfg.metrics_port:
            check_port_free("metrics", host, cfg.metrics_port)
            try:
                self._metrics_http, _ = start_http_server(cfg.metrics_port, host, registry=self.metrics_registry)
            except OSError as e:  # taken between the check and the bind
                if e.errno == errno.EADDRINUSE:
                    raise PortInUse("metrics", host, cfg.metrics_port) from None
                raise
        try:
            try:
                if self.credentials is not None:
                    self.port = self.server.add_secure_port(f"{host}:{cfg.port}", self.credentials)
                else:
                    self.port = self.server.add_insecure_port(f"{host}:{cfg.port}")
            except RuntimeError:  # grpc's "Failed to bind"
                self.port = 0
            if self.port == 0:
                check_port_free("gRPC", host, cfg.port)  # PortInUse when taken since the first check
                raise ValueError(f"cannot bind gRPC address {host}:{cfg.port}")
        except BaseException:
            self._stop_metrics()
            raise
        reflection.enable_server_reflection(
            [*self.service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME], self.server)
        self.rpc_metrics.expect(self._method_names())
        await self.set_serving(False)
        await self.server.start()
        try:
            for companion in self.companions:
                await companion.start()
        except BaseException:
            await self.server.stop(0)
            self._stop_metrics()
            raise
        log.info("lmstack %s listening on %s (%s, %s; metrics: %s)", self.component, self.address,
                 "mTLS" if cfg.tls_client_ca else "TLS" if self.credentials else "plaintext",
                 f"{len(self.keys.tenants)} tenant(s)" if self.keys else "no API keys", cfg.metrics_port or "off")
        return self.port

    def _method_names(self) -> list[str]:
        """``/package.Service/Method`` of every RPC of the services added (from their descriptors)."""
        from google.protobuf import descriptor_pool

        pool = descriptor_pool.Default()
        names = []
        for service in self.service_names:
            try:
                methods = pool.FindServiceByName(service).methods
            except KeyError:  # a service registered without a descriptor (generic handlers)
                continue
            names += [f"/{service}/{m.name}" for m in methods]
        return names

    def _stop_metrics(self) -> None:
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
            self._metrics_http = None

    async def set_serving(self, serving: bool = True) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in ("", *self.service_names):
            await self.health.set(name, status)
        for companion in self.companions:
            await companion.set_serving(serving)

    async def stop(self, grace: float | None = None) -> None:
        """Graceful stop: health NOT_SERVING, refuse new RPCs, let in-flight ones finish within ``grace``."""
        grace = self.settings.grace_period_s if grace is None else grace
        await self.health.enter_graceful_shutdown()
        await asyncio.gather(self.server.stop(grace), *(c.stop(grace) for c in self.companions))
        self._stop_metrics()
        self._stopped.set()
        log.info("lmstack %s stopped", self.component)

    async def wait_for_signal(self, signals=(signal.SIGTERM, signal.SIGINT)) -> None:
        """Block until one of ``signals`` arrives (or ``stop()`` is called elsewhere), then ``stop()``."""
        loop = asyncio.get_running_loop()
        got = asyncio.Event()
        for sig in signals:
            loop.add_signal_handler(sig, got.set)
        waiters = [asyncio.ensure_future(got.wait()), asyncio.ensure_future(self._stopped.wait())]
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for w in waiters:
            w.cancel()
        for sig in signals:
            loop.remove_signal_handler(sig)
        if not self._stopped.is_set():
            log.info("lmstack %s: signal received, draining for up to %.0fs", self.component,
                     self.settings.grace_period_s)
            await self.stop()


Setup = Callable[[GrpcServer], Awaitable[tuple[Callable[[], Awaitable] | None, Callable[[], Awaitable] | None]]]


def configure_process(settings: ServiceSettings) -> None:
    """Logging format and level, and torch's intra-op threads when torch is in use."""
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import sys

    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(settings.torch_threads)


async def serve(settings: ServiceSettings, component: str, setup: Setup,
                signals=(signal.SIGTERM, signal.SIGINT)) -> None:
    """Start, load (``ready``), serve until a signal, drain, clean up. A signal that arrives while
    models are still loading stops the server at once (nothing is in flight yet)."""
    loop = asyncio.get_running_loop()
    got_signal = asyncio.Event()
    for sig in signals:
        loop.add_signal_handler(sig, got_signal.set)
    server = GrpcServer(settings, component)
    ready, cleanup = await setup(server)
    try:
        await server.start()  # PortInUse: nothing was bound; cleanup below still runs
        if ready is not None:
            loading = asyncio.ensure_future(ready())
            signalled = asyncio.ensure_future(got_signal.wait())
            await asyncio.wait([loading, signalled], return_when=asyncio.FIRST_COMPLETED)
            signalled.cancel()
            if not loading.done():
                log.info("lmstack %s: signal received while loading; stopping", component)
                loading.cancel()
                return
            loading.result()  # a loading error ends the process
        await server.set_serving(True)
        log.info("lmstack %s ready", component)
        if not got_signal.is_set():
            await got_signal.wait()
        log.info("lmstack %s: signal received, draining for up to %.0fs", component, settings.grace_period_s)
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        if not server._stopped.is_set():
            await server.stop()
        if cleanup is not None:
            await cleanup()


def run_service(settings: ServiceSettings, component: str, setup: Setup) -> None:
    """The body of a service's ``__main__``: configure, serve until SIGTERM, drain, clean up.

    A configuration error (``ValueError`` from setup or loading: a missing model directory, a bad
    model spec) or a port already in use (``PortInUse``) ends the process with status 2 and one
    clear line, not a traceback.
    """
    configure_process(settings)
    try:
        asyncio.run(serve(settings, component, setup))
    except (ValueError, PortInUse) as e:
        log.error("lmstack %s: cannot start: %s", component, e)
        raise SystemExit(2) from None
