"""The OpenAI-compatible HTTP API over the inference handler (FastAPI + uvicorn).

``app`` (the routes, ``create_app``), ``openai`` (OpenAI's completion shapes over
``InferenceHandler.complete`` / ``complete_stream``), ``schemas`` (request bodies), ``errors``
(OpenAI's error shape from the shared typed errors), ``server`` (``HttpServer``: uvicorn in the
service's loop). Run beside gRPC with ``python -m services.inference --http-port 8000`` (what
``lmstack serve`` does) or alone with ``python -m services.http``.
"""

from __future__ import annotations


def http_server(handler, settings):
    """An ``HttpServer`` for ``handler`` on ``settings.host:settings.http_port`` with its API keys."""
    from .app import create_app
    from .server import HttpServer

    return HttpServer(create_app(handler, settings.api_keys), settings.host, settings.http_port,
                      log_level="warning" if settings.log_level.upper() == "INFO" else settings.log_level)
