"""The OpenAI-compatible HTTP API over the inference handler (FastAPI + uvicorn).

``app`` (the routes, ``create_app``), ``openai`` (OpenAI's completion shapes over
``InferenceHandler.complete`` / ``complete_stream``), ``schemas`` (request bodies), ``errors``
(OpenAI's error shape from the shared typed errors), ``server`` (``HttpServer``: uvicorn in the
service's loop). Run beside gRPC with ``python -m services.inference --http-port 8000`` (what
``lmstack serve`` does) or alone with ``python -m services.http``.
"""

from __future__ import annotations


def http_server(handler, settings):
    """An ``HttpServer`` for ``handler`` on ``settings.host:settings.http_port`` with the settings'
    tenants (``--api-keys-file``, ``--api-keys``), TLS (``--tls-cert``/``--tls-key``, mTLS with
    ``--tls-client-ca``) and exposure rule (``services.tls.check_exposure``), as the gRPC server's."""
    from services.tenants import KeyRing

    from .app import create_app
    from .server import HttpServer

    keys = KeyRing.from_settings(settings.api_keys, settings.api_keys_file)
    return HttpServer(create_app(handler, keys), settings.host, settings.http_port,
                      log_level="warning" if settings.log_level.upper() == "INFO" else settings.log_level,
                      tls_cert=settings.tls_cert, tls_key=settings.tls_key, tls_client_ca=settings.tls_client_ca,
                      has_keys=bool(keys), insecure=settings.insecure)
