"""The notifier service's process: an HTTP face (health) around its Kafka consumer and its workers.

Kafka events → (consumer) delivery and e-mail rows in Postgres → (delivery worker) signed webhooks,
(mail worker) e-mails over SMTP. The notifier's tables (deliveries, attempts, e-mails) are its own
migrations (`registry_notifier/migrations`), applied at start-up by the shared runner once the api's schema
(the `webhooks` table they refer to) is there.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources

import psycopg
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from registry_notifier.consumer import EventConsumer
from registry_notifier.delivery import DeliveryWorker
from registry_notifier.mailer import MailWorker
from registry_notifier.retention import RetentionWorker
from registry_notifier.routing import Router
from registry_notifier.settings import NotifierSettings, get_settings
from registry_shared.backoff import Backoff
from registry_shared.consumer_policy import describe
from registry_shared.health import HEALTH
from registry_shared.metrics import HttpMetrics
from registry_shared.migrations import apply_migrations
from registry_shared.webhooks import TargetGuard, parse_networks

log = logging.getLogger(__name__)


#: Waits between attempts to migrate while Postgres, or the api's schema, is not there yet.
_MIGRATE_BACKOFF = Backoff(initial=0.5, cap=10.0)


async def migrate(database_url: str) -> list[str]:
    """Apply the notifier's migrations (shared runner, `notifier_schema_migrations`), waiting with the shared
    backoff while Postgres is unreachable or the api has not created `webhooks` yet (start order)."""
    folder = resources.files("registry_notifier") / "migrations"
    attempt = 0
    while True:
        try:
            applied = await asyncio.to_thread(
                apply_migrations, database_url, folder, table="notifier_schema_migrations"
            )
        except (psycopg.OperationalError, psycopg.errors.UndefinedTable) as exc:
            attempt += 1
            log.warning("notifier migrations wait: %s", describe(exc), extra={"fields": {"attempt": attempt}})
            await _MIGRATE_BACKOFF.sleep(attempt)
            continue
        if applied:
            log.info("notifier migrations applied", extra={"fields": {"applied": applied}})
        return applied


def create_app(settings: NotifierSettings | None = None) -> FastAPI:
    """Build the notifier; its workers start with the app."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pool = AsyncConnectionPool(
            settings.database_url,
            min_size=min(settings.db_pool_min, 4),
            max_size=settings.db_pool_max,
            kwargs={"row_factory": dict_row, "autocommit": True},
            open=False,
            timeout=30,
        )
        await pool.open(wait=False)
        await migrate(settings.database_url)
        allowed = parse_networks(settings.webhook_allow_private_targets)
        guard = TargetGuard(allowed, dns_timeout=settings.notifier_dns_timeout_s, cache_s=settings.notifier_dns_cache_s)
        mailer = MailWorker(pool, settings) if settings.email_enabled else None
        delivery = DeliveryWorker(pool, settings, guard, on_disabled=lambda: mailer and mailer.wakeup.set())

        def stored() -> None:
            delivery.wakeup.set()
            if mailer:
                mailer.wakeup.set()

        router = Router(allowed, settings.notifier_deployment, settings.email_enabled)
        consumer = EventConsumer(pool, settings, router, stored)
        app.state.consumer, app.state.delivery, app.state.mailer = consumer, delivery, mailer
        retention = (
            RetentionWorker(pool, settings.notifier_deployment, settings.notifier_retention_days)
            if settings.notifier_retention_days
            else None
        )
        workers = [w for w in (delivery, mailer, consumer, retention) if w is not None]
        for w in workers:
            w.start()
        try:
            yield
        finally:
            for w in reversed(workers):
                await w.stop()
            await pool.close()

    app = FastAPI(title="Model Registry notifier", version="0.1.0", lifespan=lifespan)
    app.add_middleware(HttpMetrics)  # serves /metrics

    @app.get("/healthz", summary="Liveness and progress")
    async def healthz(request: Request) -> JSONResponse:
        """Liveness, whether the consumer has its partitions, counters, and the state of the consumer and each
        background worker (`consumers`); 503 while one of them is dead."""
        st = request.app.state
        status, consumers = HEALTH.report()
        body = {
            "ok": status == 200,
            "service": "notifier",
            "time": int(time.time()),
            "consumer_ready": st.consumer.ready,
            "events_seen": st.consumer.events_seen,
            "deliveries_queued": st.consumer.deliveries_queued,
            "deliveries_sent": st.delivery.sent,
            "failed_attempts": st.delivery.failed_attempts,
            "emails_sent": st.mailer.sent if st.mailer else 0,
            "email_enabled": st.mailer is not None,
            "dead_lettered": st.consumer.policy.health.dead_lettered,
            **consumers,
        }
        return JSONResponse(body, status)

    return app


app = create_app()
