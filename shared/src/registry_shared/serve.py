"""Run a service's ASGI app with uvicorn, configured the same way for every service."""

from __future__ import annotations

import os

import uvicorn

from registry_shared.logging import configure_logging
from registry_shared.settings import ServiceSettings
from registry_shared.tracing import configure_tracing


def serve(service: str, app: str, port_env: str, default_port: int) -> None:
    """Serve `app` (an import string) on HOST:`$port_env`, logging JSON lines.

    One process, one event loop: asyncio sets TCP_NODELAY on every accepted connection, so small
    responses on kept-alive connections are not held back by Nagle's algorithm.
    """
    settings = ServiceSettings()
    configure_logging(service, settings.log_level)
    configure_tracing(service)  # OTLP export when OTEL_EXPORTER_OTLP_ENDPOINT is set; nothing otherwise
    port = int(os.environ.get(port_env, default_port))
    uvicorn.run(
        app,
        host=settings.host,
        port=port,
        log_config=None,
        access_log=False,
        proxy_headers=False,
        server_header=False,
    )
