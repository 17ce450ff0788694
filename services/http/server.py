"""``HttpServer``: uvicorn running the OpenAI-compatible app inside the service's own event loop.

The HTTP API shares the process, the event loop, the handler and the engines of the inference
service (``python -m services.inference --http-port 8000``; ``lmstack serve`` does this), so a
request costs no extra hop and both protocols batch together. It follows the gRPC server's
lifecycle as its *companion* (``GrpcServer.add_companion``): its port is checked before anything
binds, it starts listening with the gRPC server (``/health`` 503 until the models are loaded),
turns healthy with it, and on shutdown answers 503 to new work while in-flight requests finish
within the grace period, then closes. ``python -m services.http`` runs it without gRPC.

Signals stay with the service (``services.server``): uvicorn's own signal capture is off.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket

import uvicorn

from services.ports import PortInUse, check_port_free

log = logging.getLogger("lmstack.http")


class _Uvicorn(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):  # the service's loop owns SIGTERM/SIGINT
        yield


class HttpServer:
    """The app on ``host:port``; ``start`` / ``set_serving`` / ``stop`` as ``GrpcServer``'s."""

    def __init__(self, app, host: str, port: int, log_level: str = "warning", tls_cert: str = "", tls_key: str = "",
                 tls_client_ca: str = "", has_keys: bool = False, insecure: bool = False):
        import ssl

        from services.tls import server_credentials

        server_credentials(tls_cert, tls_key, tls_client_ca)  # the same checks of the TLS options as gRPC's
        self.app = app
        self.host, self.port = host, port
        self.tls = bool(tls_cert)
        self.exposure = (has_keys, insecure)
        tls = dict(ssl_certfile=tls_cert, ssl_keyfile=tls_key) if tls_cert else {}
        if tls_client_ca:
            tls |= dict(ssl_ca_certs=tls_client_ca, ssl_cert_reqs=ssl.CERT_REQUIRED)
        self.config = uvicorn.Config(app, host=host, port=port, lifespan="off", access_log=False,
                                     log_level=log_level.lower(), timeout_keep_alive=30, **tls)
        self.server = _Uvicorn(self.config)
        self._task: asyncio.Task | None = None
        self._sock: socket.socket | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}/v1"

    def check_port(self) -> None:
        """PortInUse (naming the holder) before anything of the service binds."""
        check_port_free("HTTP", self.host, self.port, hint="stop that process or choose another --http-port")

    async def start(self) -> int:
        from services.tls import check_exposure

        check_exposure(self.host, self.exposure[0], self.tls, self.exposure[1], "HTTP API")
        self.check_port()
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.bind((self.host, self.port))
        except OSError as e:
            sock.close()
            if e.errno == errno.EADDRINUSE:
                raise PortInUse("HTTP", self.host, self.port) from None
            raise
        sock.listen(2048)
        sock.setblocking(False)
        self._sock = sock
        self.port = sock.getsockname()[1]
        self._task = asyncio.ensure_future(self.server.serve(sockets=[sock]))
        while not self.server.started:
            if self._task.done():  # failed to start: surface its error
                self._task.result()
                raise RuntimeError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)
        log.info("lmstack OpenAI-compatible API on %s", self.url)
        return self.port

    async def set_serving(self, serving: bool = True) -> None:
        st = self.app.state.lmstack
        st.serving = serving

    async def stop(self, grace: float = 10.0) -> None:
        """503 for new work, let in-flight requests finish within ``grace``, then close."""
        st = self.app.state.lmstack
        st.serving, st.draining = False, True
        if self._task is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self.server.server_state.tasks and loop.time() < deadline:  # in flight: let them finish
            await asyncio.sleep(0.05)
        self.config.timeout_graceful_shutdown = max(0.1, deadline - loop.time())
        self.server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), grace + 5.0)
        except Exception:  # noqa: BLE001 - shutting down regardless (a timeout included)
            self.server.force_exit = True
            self._task.cancel()
        self._task = None
        log.info("lmstack OpenAI-compatible API stopped")
