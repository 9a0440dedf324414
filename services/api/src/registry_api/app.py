"""The api service's ASGI app: routers, error mapping, and the background tasks of the process."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI
from psycopg_pool import PoolTimeout
from starlette.requests import Request
from starlette.responses import JSONResponse

from registry_api import auth
from registry_api.admin.endpoints import router as admin_router
from registry_api.catalog.endpoints import router as catalog_router
from registry_api.catalog.fast_download import FastDownload
from registry_api.consumers import DownloadCounter, VerdictConsumer
from registry_api.db.migrate import apply_migrations
from registry_api.db.pool import make_pool
from registry_api.dev.endpoints import router as dev_router
from registry_api.errors import install_error_handlers
from registry_api.hf.endpoints import HfResolve
from registry_api.hf.endpoints import router as hf_router
from registry_api.kit.presign import Presigner
from registry_api.kit.request_id import RequestIdMiddleware
from registry_api.outbox import AccessRecorder, OutboxRelay
from registry_api.platform.endpoints import router as platform_router
from registry_api.settings import ApiSettings, get_settings
from registry_api.uploads.endpoints import router as uploads_router
from registry_api.usage.endpoints import router as usage_router
from registry_api.users.endpoints import router as users_router
from registry_api.webhooks.endpoints import router as webhooks_router
from registry_api.webhooks.repository import seal_clear_secrets

DESCRIPTION = """
The Model Registry's HTTP API: both spec documents (0.3.0 and 1.0.0) on one server.

* **Auth**: `x-api-key: sk_live_...` on every endpoint but `/healthz` and `/v1/users/register`;
  admin endpoints take `x-admin-token: <REGISTRY_ADMIN_TOKEN>`.
* **Roles**: developers publish models, versions and files; platform users see what they are granted
  from `permitted_from_ts`; admins manage users and grants. What a caller may not see answers 404.
* **Files** are uploaded and downloaded with presigned URLs straight to MinIO; an uploaded file is
  served only after the ingest service has verified its size and sha256.
* **Errors** are always `{"detail": "message"}`. Times are Unix epoch seconds.
"""

TAGS = [
    {"name": "Health", "description": "Liveness."},
    {"name": "Users", "description": "Register, rotate your key, who am I."},
    {"name": "Catalog", "description": "Role-aware catalog: models, files, downloads, manifests, change feed."},
    {"name": "Developer", "description": "Create models and versions; upload files through presigned PUT."},
    {"name": "Admin", "description": "Users with roles and grants (x-admin-token)."},
    {"name": "Platform", "description": "Bulk manifest of everything granted to a platform user."},
    {"name": "Usage & Analytics", "description": "Usage over a window, served by the analytics service."},
    {"name": "Webhooks", "description": "Signed webhooks (Standard Webhooks) for events you may see; delivery log."},
    {
        "name": "Hugging Face Hub",
        "description": "The Hub's HTTP contract under /hf: HF_ENDPOINT=<api>/hf and the key as HF_TOKEN make "
        "huggingface_hub, hf and transformers work (HF_HUB_DISABLE_XET=1 to upload).",
    },
]


def create_app(settings: ApiSettings | None = None, fast_download: bool = True) -> FastAPI:
    """Build the api. Background tasks (relay, consumers) follow the settings.

    `fast_download=False` leaves downloads to the documented route alone (the tests compare the two).
    """
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.api_run_migrations:
            await asyncio.to_thread(apply_migrations, settings.database_url)
        pool = make_pool(settings)
        await pool.open(wait=True)
        outbox_wakeup = asyncio.Event()
        app.state.settings = settings
        app.state.pool = pool
        app.state.presigner = Presigner(settings)
        app.state.secret_box = settings.secret_box()
        if app.state.secret_box is not None:
            await seal_clear_secrets(pool, app.state.secret_box)
        app.state.access = AccessRecorder(pool, settings.access_flush_ms, outbox_wakeup)
        app.state.analytics = httpx.AsyncClient(base_url=settings.analytics_url, timeout=10.0)
        stop = asyncio.Event()
        tasks = [asyncio.create_task(auth.listen_for_invalidations(settings.database_url, stop))]
        background: list = [app.state.access]
        if settings.outbox_relay:
            background.append(OutboxRelay(settings.database_url, settings.kafka_bootstrap_servers, outbox_wakeup))
        if settings.api_consume_events:
            background.append(VerdictConsumer(pool, settings.kafka_bootstrap_servers))
            background.append(DownloadCounter(pool, settings.kafka_bootstrap_servers))
        app.state.background = background
        for b in background:
            b.start()
        # Everything loaded so far lives as long as the process: keep it out of the collector's full
        # passes, which otherwise walk every module object and stall the event loop for tens of ms.
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            stop.set()
            for b in reversed(background):  # the access buffer flushes before the relay stops
                await b.stop()
            for t in tasks:
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
            await app.state.analytics.aclose()
            await pool.close()

    app = FastAPI(
        title="Model Registry API",
        version="1.0.0",
        description=DESCRIPTION,
        openapi_tags=TAGS,
        lifespan=lifespan,
    )
    install_error_handlers(app)
    # The download endpoint is the hot path: GETs are answered ahead of routing (same rule, same checks);
    # the documented route in the catalog router describes it in OpenAPI. The request id wraps both.
    if fast_download:
        app.add_middleware(FastDownload)
        app.add_middleware(HfResolve)
    app.add_middleware(RequestIdMiddleware)

    @app.exception_handler(PoolTimeout)
    async def _pool_timeout(_: Request, exc: PoolTimeout) -> JSONResponse:
        return JSONResponse({"detail": "database unavailable"}, status_code=503)

    @app.get(
        "/healthz",
        tags=["Health"],
        summary="Liveness",
        responses={200: {"content": {"application/json": {"example": {"ok": True, "time": 1699999999}}}}},
    )
    async def healthz() -> dict[str, object]:
        """Minimal liveness payload (no auth)."""
        return {"ok": True, "time": int(time.time())}

    for router in (
        users_router,
        usage_router,
        catalog_router,
        dev_router,
        uploads_router,
        admin_router,
        platform_router,
        webhooks_router,
        hf_router,
    ):
        app.include_router(router)
    return app


app = create_app()
