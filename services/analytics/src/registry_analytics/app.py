"""The analytics service's process: the usage query API over ClickHouse, and the Kafka loader beside it."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from clickhouse_connect.driver.exceptions import ClickHouseError
from fastapi import FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from registry_analytics import queries
from registry_analytics.loader import AccessLoader
from registry_analytics.schemas import AdminUsage, DownloadCounts, UserUsage
from registry_analytics.settings import analytics_settings
from registry_analytics.store import Store
from registry_shared.health import HEALTH
from registry_shared.metrics import HttpMetrics
from registry_shared.settings import ClickHouseSettings

log = logging.getLogger(__name__)

DEFAULT_WINDOW = 30 * 86_400
MAX_TS = 4_102_444_800  # 2100-01-01: beyond, DateTime arithmetic of the rollups would overflow


class InvalidQuery(ValueError):
    """A query parameter combination the usage API refuses (HTTP 422)."""


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Open the store (creating the schema), then start the loader; stop both on shutdown."""
    ch = ClickHouseSettings()
    loader_store = await asyncio.to_thread(Store, ch)
    await asyncio.to_thread(loader_store.migrate)
    query_store = await asyncio.to_thread(Store, ch)
    app.state.store = query_store
    settings = analytics_settings()
    # The in-process engine's files belong to this process alone, so its loader is the only writer and the
    # overview's closed periods can be kept between requests; a ClickHouse server may have other writers.
    closed = queries.ClosedPeriods() if ch.clickhouse_mode == "chdb" else None
    app.state.closed_periods = closed
    loader = AccessLoader(loader_store, settings, closed_periods=closed) if settings.consumer_enabled else None
    app.state.loader = loader
    if loader:
        await loader.start()
    log.info("analytics ready", extra={"fields": {"mode": ch.clickhouse_mode, "group": settings.group_id}})
    try:
        yield
    finally:
        if loader:
            await loader.stop()
        query_store.close()
        loader_store.close()


app = FastAPI(title="Model Registry analytics", version="0.1.0", lifespan=lifespan)
app.add_middleware(HttpMetrics)  # times every request by route, serves /metrics


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    """422 with the spec's `{"detail": "..."}`: one readable sentence per bad parameter."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err.get("loc", ()) if x not in ("query", "path", "body"))
        parts.append(f"{loc}: {err.get('msg', 'invalid')}" if loc else str(err.get("msg", "invalid")))
    return JSONResponse(status_code=422, content={"detail": "; ".join(parts) or "invalid request"})


@app.exception_handler(InvalidQuery)
async def _invalid_query(_: Request, exc: InvalidQuery) -> JSONResponse:
    return JSONResponse(status_code=422, content={"detail": str(exc)})


@app.exception_handler(ClickHouseError)
async def _store_unavailable(_: Request, exc: ClickHouseError) -> JSONResponse:
    log.error("analytics store error: %s", exc)
    return JSONResponse(status_code=503, content={"detail": "the analytics store is unavailable"})


@app.get("/healthz", summary="Liveness", responses={503: {"description": "A consumer or background task is dead."}})
async def healthz() -> JSONResponse:
    """Liveness probe: the consumers' health (registry_shared.health; 503 when one is dead) and the loader's
    counters."""
    loader: AccessLoader | None = getattr(app.state, "loader", None)
    status, consumers = HEALTH.report()
    body: dict[str, object] = {"ok": status == 200, "service": "analytics", "time": int(time.time()), **consumers}
    if loader is not None:
        body["loader"] = {"ready": loader.ready.is_set(), **loader.stats}
    return JSONResponse(body, status_code=status)


Since = Annotated[int | None, Query(ge=0, le=MAX_TS, description="Window start, epoch seconds (included).")]
Until = Annotated[int | None, Query(ge=0, le=MAX_TS, description="Window end, epoch seconds (included).")]


def window_of(since: int | None, until: int | None) -> queries.Window:
    """The window of a request: until defaults to now, since to 30 days before until."""
    if until is None:
        until = int(time.time())
    if since is None:
        since = max(0, until - DEFAULT_WINDOW)
    if since > until:
        raise InvalidQuery(f"since ({since}) must not be after until ({until})")
    return queries.Window(since, until)


@app.get("/v1/usage/users/{user_id}", response_model=UserUsage, summary="One user's usage")
async def user_usage(
    user_id: Annotated[int, Path(ge=0, le=2**63 - 1)],
    since: Since = None,
    until: Until = None,
    top_models_limit: Annotated[int, Query(ge=1, le=200)] = 20,
) -> dict[str, object]:
    """What `GET /v1/users/me/usage` answers, for `user_id`."""
    window = window_of(since, until)
    return await asyncio.to_thread(queries.user_usage, app.state.store, user_id, window, top_models_limit)


@app.get("/v1/usage/admin", response_model=AdminUsage, summary="Admin overview")
async def admin_usage(
    since: Since = None,
    until: Until = None,
    top_users_limit: Annotated[int, Query(ge=1, le=500)] = 50,
    top_models_limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    filter_user_id: Annotated[int | None, Query(ge=0)] = None,
    filter_email: Annotated[str | None, Query(min_length=1, max_length=320)] = None,
) -> dict[str, object]:
    """What `GET /v1/admin/usage` answers."""
    window = window_of(since, until)
    return await asyncio.to_thread(
        queries.admin_usage,
        app.state.store,
        window,
        top_users_limit,
        top_models_limit,
        filter_user_id,
        filter_email,
        app.state.closed_periods,
    )


@app.get("/v1/usage/downloads", response_model=DownloadCounts, summary="Downloads per model")
async def downloads(since_ts: Annotated[int, Query(ge=0, le=MAX_TS)] = 0) -> dict[str, object]:
    """Total downloads per model since `since_ts` (default: all time)."""
    return {"items": await asyncio.to_thread(queries.model_downloads, app.state.store, since_ts)}
