"""Real servers for the service tests, on free ports.

``ServerThread`` runs a service's real ``setup`` (the one its ``__main__`` uses) on a real
``grpc.aio`` server in a private event loop thread, so tests talk to it over real channels and can
still look at its engines (``server.state.registry``). One test per service also runs the real
``python -m services.<name>`` process.
"""

from __future__ import annotations

import asyncio
import threading

from services import protogen

protogen.generate()  # no-op when the stubs are fresh (make install builds them)

from services.server import GrpcServer  # noqa: E402
from tests.helpers import free_port  # noqa: E402


class ServerThread:
    """A service on 127.0.0.1:<free port> in a background event loop; ``stop()`` drains it."""

    def __init__(self, settings, component: str, setup):
        self.settings = settings.model_copy(update={"host": "127.0.0.1", "port": settings.port or free_port()})
        self.component = component
        self.setup = setup
        self.server: GrpcServer | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._listening = threading.Event()
        self._error: BaseException | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"{component}-server")

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.settings.port}"

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as e:  # surfaced by start()
            self._error = e
            self._listening.set()
            self._ready.set()

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self.server = GrpcServer(self.settings, self.component)
        ready, cleanup = await self.setup(self.server)
        await self.server.start()
        self._listening.set()
        if ready is not None:
            await ready()
        await self.server.set_serving(True)
        self._ready.set()
        await self._stop.wait()
        await self.server.stop(grace=2.0)
        if cleanup is not None:
            await cleanup()

    def start(self, timeout: float = 120.0, wait_ready: bool = True) -> ServerThread:
        """Start; return once models are loaded (or, with ``wait_ready=False``, once it listens)."""
        self._thread.start()
        if not (self._ready if wait_ready else self._listening).wait(timeout):
            raise RuntimeError(f"{self.component} server did not become ready in {timeout}s")
        if self._error is not None:
            raise self._error
        return self

    def call(self, fn, timeout: float = 30.0):
        """Run ``fn()`` (a coroutine factory or plain function) on the server's loop; return its result."""

        async def run():
            result = fn()
            return await result if asyncio.iscoroutine(result) else result

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout)

    def stop(self) -> None:
        if self.loop is not None and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(30)
