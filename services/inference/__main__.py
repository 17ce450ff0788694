"""``python -m services.inference [--port 50051] [--models name=path,...] [--model-store DIR] ...``

Every flag is also an ``LMSTACK_*`` environment variable (``services.config.InferenceSettings``):
``--max-batch-size``, ``--max-waiting``, ``--api-keys``, ``--metrics-port``, ``--torch-threads``...
"""

from __future__ import annotations

import sys

from services.config import InferenceSettings
from services.metrics import InferenceMetrics
from services.quotas import RequestQuotas, TenantMetrics
from services.server import GrpcServer, run_service

from .handler import InferenceHandler, inference_registry
from .servicer import add_to_server


async def setup(server: GrpcServer):
    import torch

    torch.set_num_threads(server.settings.torch_threads)
    metrics = InferenceMetrics(server.metrics_registry)
    registry = inference_registry(server.settings, metrics)
    metrics.watch(registry)
    server.state.registry = registry
    quotas = RequestQuotas(TenantMetrics(server.metrics_registry))
    handler = server.state.handler = InferenceHandler(registry, metrics, server.settings, quotas)
    add_to_server(server, handler)
    if server.settings.http_port:  # the OpenAI-compatible API beside gRPC, on the same handler
        from services.http import http_server

        server.state.http = http_server(handler, server.settings)
        server.add_companion(server.state.http)

    async def cleanup():
        await registry.close()
        handler.close()

    return registry.load_all, cleanup


def main(argv: list[str] | None = None) -> None:
    settings = InferenceSettings.from_args(sys.argv[1:] if argv is None else argv)
    run_service(settings, "inference", setup)


if __name__ == "__main__":
    main()
