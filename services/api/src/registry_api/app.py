"""The api service's ASGI app: routers, error mapping, and the background tasks of the process."""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import psycopg
from fastapi import FastAPI
from fastapi_offline import FastAPIOffline
from psycopg_pool import PoolTimeout
from pydantic import BaseModel, Field
from starlette.requests import Request
from starlette.responses import JSONResponse

from registry_api import auth
from registry_api.admin.endpoints import router as admin_router
from registry_api.audit.endpoints import router as audit_router
from registry_api.audit.service import AuditContext
from registry_api.catalog.endpoints import router as catalog_router
from registry_api.catalog.fast_download import FastDownload
from registry_api.consumers import DownloadCounter, VerdictConsumer
from registry_api.db.migrate import apply_migrations
from registry_api.db.pool import make_pool
from registry_api.dev.endpoints import router as dev_router
from registry_api.errors import install_error_handlers
from registry_api.hf.endpoints import HfResolve
from registry_api.hf.endpoints import router as hf_router
from registry_api.kit.db_monitor import DatabaseMonitor, DatabaseUnavailable
from registry_api.kit.outbox import AccessBufferFull, AccessRecorder, OutboxRelay, outbox_gauges
from registry_api.kit.presign import Presigner
from registry_api.kit.ratelimit import Limit, RateLimiter, document_429
from registry_api.kit.request_id import RequestIdMiddleware
from registry_api.platform.endpoints import router as platform_router
from registry_api.settings import ApiSettings, get_settings
from registry_api.uploads.endpoints import router as uploads_router
from registry_api.usage.endpoints import router as usage_router
from registry_api.users.endpoints import router as users_router
from registry_api.webhooks.endpoints import router as webhooks_router
from registry_api.webhooks.repository import seal_clear_secrets
from registry_shared import metrics
from registry_shared.health import HEALTH

DESCRIPTION = """
The Model Registry's HTTP API: both spec documents (0.3.0 and 1.0.0) on one server.

* **Auth**: `x-api-key: sk_live_...` on every endpoint but `/healthz` and `/v1/users/register`;
  admin endpoints take `x-admin-token: <REGISTRY_ADMIN_TOKEN>`.
* **Roles**: developers publish models, versions and files; platform users see what they are granted
  from `permitted_from_ts`; admins manage users and grants. What a caller may not see answers 404.
* **Files** are uploaded and downloaded with presigned URLs straight to MinIO; an uploaded file is
  served only after the ingest service has verified its size and sha256.
* **Errors** are always `{"detail": "message"}`. Times are Unix epoch seconds.
* **Database away**: requests that need Postgres answer 503 `database unavailable` with `Retry-After` at
  once; downloads this process answered recently are still served (and counted once it is back).
  `/readyz` says which dependency is not ready and why; `/healthz` is liveness only.
"""

TAGS = [
    {"name": "Health", "description": "Liveness (`/healthz`) and readiness (`/readyz`)."},
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
        monitor = DatabaseMonitor(settings.database_url)
        pool = make_pool(settings, monitor)
        await pool.open(wait=True)
        monitor.on_recover(pool.check)  # drop the connections that died with the server, before answering
        monitor.on_down(lambda: auth.set_outage(True))
        monitor.on_up(lambda: auth.set_outage(False))
        auth.set_outage(False)
        outbox_wakeup = asyncio.Event()
        app.state.settings = settings
        app.state.db_monitor = monitor
        app.state.pool = pool
        app.state.presigner = Presigner(settings)
        app.state.rate_limiter = rate_limiter(settings, pool)
        app.state.secret_box = settings.secret_box()
        if app.state.secret_box is not None:
            await seal_clear_secrets(pool, app.state.secret_box)
        app.state.access = AccessRecorder(
            pool, settings.access_flush_ms, outbox_wakeup, settings.access_buffer_max, monitor
        )
        app.state.listener = auth.invalidation_listener(settings.database_url, monitor)
        app.state.analytics = httpx.AsyncClient(base_url=settings.analytics_url, timeout=10.0)
        background: list = [app.state.listener, app.state.access]
        if settings.outbox_relay:
            background.append(OutboxRelay(settings.database_url, settings.kafka_bootstrap_servers, outbox_wakeup))
        if settings.api_consume_events:
            background.append(VerdictConsumer(pool, settings.kafka_bootstrap_servers))
            background.append(DownloadCounter(pool, settings.kafka_bootstrap_servers))
        app.state.background = background
        for b in background:
            b.start()
        gauges = metrics.refresher(outbox_gauges(pool))
        # Everything loaded so far lives as long as the process: keep it out of the collector's full
        # passes, which otherwise walk every module object and stall the event loop for tens of ms.
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            metrics.remove_refresher(gauges)
            for b in reversed(background):  # the listener stops last
                await b.stop()
            await monitor.stop()
            await app.state.analytics.aclose()
            await pool.close()

    # /docs and /redoc load Swagger UI and ReDoc from the api itself (the assets of the fastapi-offline package,
    # under /static-offline-docs), not from a CDN: they render where the registry has no internet.
    app = FastAPIOffline(
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
    app.add_middleware(AuditContext)  # the client IP of audit rows
    app.add_middleware(RequestIdMiddleware)
    app.add_middleware(metrics.HttpMetrics)  # outermost: times every request, serves /metrics

    def _database_unavailable(request: Request, exc: Exception) -> JSONResponse:
        monitor: DatabaseMonitor = request.app.state.db_monitor
        if not isinstance(exc, DatabaseUnavailable):  # seen failing: probe, and mark it down if it is away
            monitor.suspect(exc)
        return JSONResponse(
            {"detail": "database unavailable"},
            status_code=503,
            headers={"retry-after": str(monitor.retry_after)},
        )

    @app.exception_handler(PoolTimeout)
    async def _pool_timeout(request: Request, exc: PoolTimeout) -> JSONResponse:
        return _database_unavailable(request, exc)

    @app.exception_handler(psycopg.OperationalError)
    async def _db_error(request: Request, exc: psycopg.OperationalError) -> JSONResponse:
        return _database_unavailable(request, exc)

    @app.exception_handler(AccessBufferFull)
    async def _access_full(_: Request, exc: AccessBufferFull) -> JSONResponse:
        return JSONResponse(
            {"detail": exc.detail}, status_code=503, headers={"retry-after": str(AccessBufferFull.retry_after)}
        )

    @app.get(
        "/healthz",
        tags=["Health"],
        summary="Liveness",
        responses={
            200: {
                "content": {
                    "application/json": {
                        "example": {
                            "ok": True,
                            "time": 1699999999,
                            "consumers": {"verdict-consumer": {"status": "ok", "retries": 0, "dead_lettered": 0}},
                        }
                    }
                }
            },
            503: {"description": "A consumer or background task is dead (keeps dying): `ok` is false."},
        },
    )
    async def healthz() -> JSONResponse:
        """Liveness (no auth), with the health of the process's consumers and background tasks
        (`retrying: <reason> since <time>` while they retry a transient failure); 503 when one is dead."""
        status, consumers = HEALTH.report()
        return JSONResponse({"ok": status == 200, "time": int(time.time()), **consumers}, status_code=status)

    @app.get(
        "/readyz",
        tags=["Health"],
        summary="Readiness",
        response_model=Readiness,
        description="200 when the database, the cache invalidation listener, the access-event buffer, the outbox "
        "relay (Kafka) and the event consumers all work; otherwise 503 naming each component that does not "
        "and why (`not_ready`). Probes the database once (under a second) when it is believed up. No auth.",
        responses={
            200: {"content": {"application/json": {"example": READY_EXAMPLE}}},
            503: {
                "model": Readiness,
                "description": "A component is not ready",
                "content": {"application/json": {"example": NOT_READY_EXAMPLE}},
            },
        },
    )
    async def readyz(request: Request) -> JSONResponse:
        """Which components are ready, and why not."""
        status, body = await readiness(request.app)
        return JSONResponse(body, status_code=status)

    for router in (
        users_router,
        usage_router,
        catalog_router,
        dev_router,
        uploads_router,
        admin_router,
        audit_router,
        platform_router,
        webhooks_router,
        hf_router,
    ):
        app.include_router(router)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document_429(FastAPI.openapi(app))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def rate_limiter(settings: ApiSettings, pool: Any) -> RateLimiter | None:
    """The process's rate limiter (None when RATE_LIMITS_ENABLED is false)."""
    if not settings.rate_limits_enabled:
        return None
    roles = {
        "developer": Limit(settings.rate_limit_developer_per_minute),
        "platform": Limit(settings.rate_limit_platform_per_minute),
        "admin": Limit(settings.rate_limit_admin_per_minute),
    }
    return RateLimiter(pool, roles, Limit(settings.rate_limit_register_per_minute), settings.rate_limit_lease_max)


class Readiness(BaseModel):
    """/readyz: whether every component works, each component's state, and why those that do not."""

    ready: bool
    time: int
    detail: str | None = Field(None, description="Only when not ready: which components, and why.")
    components: dict[str, dict[str, Any]] = Field(
        description="By name: `ok`, `status`, and what the component reports (`reason`, `since`, counters)."
    )
    not_ready: dict[str, str] = Field(description="Component → why it is not ready (empty when ready).")


READY_EXAMPLE = {
    "ready": True,
    "time": 1699999999,
    "components": {
        "database": {"ok": True, "status": "up", "reason": None, "since": 1699990000, "outages": 0},
        "invalidation-listener": {
            "ok": True,
            "status": "listening",
            "reason": None,
            "since": 1699990000,
            "health": "ok",
        },
        "access-recorder": {"ok": True, "buffered": 0, "max_buffered": 100000, "health": "ok"},
        "outbox-relay": {"ok": True, "status": "ok", "health": "ok"},
    },
    "not_ready": {},
}
NOT_READY_EXAMPLE = {
    "ready": False,
    "detail": "not ready: database (down: OperationalError: connection refused)",
    "time": 1699999999,
    "components": {
        "database": {
            "ok": False,
            "status": "down",
            "reason": "OperationalError: connection refused",
            "since": 1699999990,
            "outages": 1,
        },
    },
    "not_ready": {"database": "down: OperationalError: connection refused"},
}


def _why(component: dict[str, object]) -> str:
    status = str(component.get("status") or "not ready")
    reason = component.get("reason") or component.get("last_error")
    return f"{status}: {reason}" if reason and str(reason) not in status else status


async def readiness(app: FastAPI) -> tuple[int, dict[str, object]]:
    """(status, body) of /readyz: each component's state; 503 when one is not ready."""
    state = app.state
    await state.db_monitor.check()
    components: dict[str, dict[str, object]] = {"database": state.db_monitor.as_dict()}
    for task in state.background:
        own = task.as_dict() if hasattr(task, "as_dict") else {}
        components[task.name] = own
    for name, health in HEALTH.components().items():  # the consumers and background tasks of this process
        entry = components.setdefault(name, {})
        entry["ok"] = bool(entry.get("ok", True)) and health.state in ("ok", "starting")
        entry.setdefault("status", health.status)
        entry["health"] = health.status
    for entry in components.values():
        entry.setdefault("ok", True)
    not_ready = {name: _why(c) for name, c in components.items() if not c["ok"]}
    body: dict[str, object] = {"ready": not not_ready, "time": int(time.time())}
    if not_ready:
        body["detail"] = "not ready: " + ", ".join(f"{n} ({why})" for n, why in not_ready.items())
    body["components"] = components
    body["not_ready"] = not_ready
    return (200 if not not_ready else 503), body


app = create_app()
