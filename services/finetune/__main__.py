"""``python -m services.finetune [--port 50053] [--redis-url ...] [--models name=path,...] [--model-store DIR]``

The fine-tuning API (jobs go to Redis; ``python -m services.finetune.worker`` trains them). Every
flag is also an ``LMSTACK_*`` environment variable (``services.finetune.settings.FineTuneSettings``).
"""

from __future__ import annotations

import sys

from services.server import GrpcServer, run_service

from .handler import FineTuneHandler
from .metrics import register_job_store_metrics
from .servicer import add_to_server
from .settings import FineTuneSettings
from .store import Keys


async def setup(server: GrpcServer):
    settings = server.settings
    handler = FineTuneHandler(settings)
    server.state.handler = handler
    register_job_store_metrics(server.metrics_registry, settings.redis_url, Keys(settings.redis_prefix),
                               settings.reclaim_idle_s, password=settings.redis_password())
    add_to_server(server, handler)
    return handler.connect, handler.close


def main(argv: list[str] | None = None) -> None:
    settings = FineTuneSettings.from_args(sys.argv[1:] if argv is None else argv)
    run_service(settings, "finetune", setup)


if __name__ == "__main__":
    main()
