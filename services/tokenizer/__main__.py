"""``python -m services.tokenizer [--port 50052] [--models name=path,...] [--model-store DIR] ...``

Every flag is also an ``LMSTACK_*`` environment variable (``services.config.TokenizerSettings``).
"""

from __future__ import annotations

import sys

from services.config import TokenizerSettings
from services.metrics import TokenizerMetrics
from services.server import GrpcServer, run_service

from .handler import TokenizerHandler, tokenizer_registry
from .servicer import add_to_server


async def setup(server: GrpcServer):
    metrics = TokenizerMetrics(server.metrics_registry)
    registry = tokenizer_registry(server.settings, metrics)
    server.state.registry = registry
    server.state.handler = TokenizerHandler(registry, server.settings, metrics)
    add_to_server(server, server.state.handler)
    return registry.load_all, registry.close


def main(argv: list[str] | None = None) -> None:
    settings = TokenizerSettings.from_args(sys.argv[1:] if argv is None else argv)
    run_service(settings, "tokenizer", setup)


if __name__ == "__main__":
    main()
