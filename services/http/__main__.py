"""``python -m services.http [--http-port 8000] [--models name=path,...] [--api-keys k] ...``: the
OpenAI-compatible API alone, without a gRPC port (its own engines; every ``InferenceSettings``
flag and ``LMSTACK_*`` variable applies). To serve gRPC and HTTP from one set of engines, run
``python -m services.inference --http-port 8000`` instead (``lmstack serve`` does).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from pydantic import Field

from services.config import InferenceSettings
from services.ports import PortInUse
from services.server import configure_process

log = logging.getLogger("lmstack.http")


class HttpSettings(InferenceSettings):
    http_port: int = Field(8000, ge=0, le=65535, description="OpenAI-compatible HTTP API port")


async def serve(settings: HttpSettings, signals=(signal.SIGTERM, signal.SIGINT)) -> None:
    from prometheus_client import CollectorRegistry, start_http_server

    from services.inference.handler import InferenceHandler, inference_registry
    from services.metrics import InferenceMetrics

    from . import http_server

    loop = asyncio.get_running_loop()
    got_signal = asyncio.Event()
    for sig in signals:
        loop.add_signal_handler(sig, got_signal.set)
    metrics_registry = CollectorRegistry()
    metrics = InferenceMetrics(metrics_registry)
    registry = inference_registry(settings, metrics)  # the engines report steps and requests too
    metrics.watch(registry)
    handler = InferenceHandler(registry, metrics, settings)
    server = http_server(handler, settings)
    try:
        await server.start()
        if settings.metrics_port:
            start_http_server(settings.metrics_port, settings.host, registry=metrics_registry)
        loading = asyncio.ensure_future(registry.load_all())
        signalled = asyncio.ensure_future(got_signal.wait())
        await asyncio.wait([loading, signalled], return_when=asyncio.FIRST_COMPLETED)
        if not loading.done():
            loading.cancel()
            return
        signalled.cancel()
        loading.result()
        await server.set_serving(True)
        log.info("lmstack http ready on %s", server.url)
        await got_signal.wait()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        await server.stop(settings.grace_period_s)
        await registry.close()
        handler.close()


def main(argv: list[str] | None = None) -> None:
    settings = HttpSettings.from_args(sys.argv[1:] if argv is None else argv)
    configure_process(settings)
    import torch

    torch.set_num_threads(settings.torch_threads)
    try:
        asyncio.run(serve(settings))
    except (ValueError, PortInUse) as e:
        log.error("lmstack http: cannot start: %s", e)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
