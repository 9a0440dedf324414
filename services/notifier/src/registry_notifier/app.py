"""The notifier service's process: an HTTP face (health) around its Kafka consumer and its workers.

Kafka events → (consumer) delivery and e-mail rows in Postgres → (delivery worker) signed webhooks,
(mail worker) e-mails over SMTP. The tables belong to the api's schema (migration 0002); the
notifier needs them to exist (the api applies its migrations at start-up).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from registry_notifier.consumer import EventConsumer
from registry_notifier.delivery import DeliveryWorker
from registry_notifier.mailer import MailWorker
from registry_notifier.retention import RetentionWorker
from registry_notifier.routing import Router
from registry_notifier.settings import NotifierSettings, get_settings
from registry_shared.webhooks import TargetGuard, parse_networks


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

    @app.get("/healthz", summary="Liveness and progress")
    async def healthz(request: Request) -> dict[str, object]:
        """Liveness, whether the consumer has its partitions, and counters."""
        st = request.app.state
        return {
            "ok": True,
            "service": "notifier",
            "time": int(time.time()),
            "consumer_ready": st.consumer.ready,
            "events_seen": st.consumer.events_seen,
            "deliveries_queued": st.consumer.deliveries_queued,
            "deliveries_sent": st.delivery.sent,
            "failed_attempts": st.delivery.failed_attempts,
            "emails_sent": st.mailer.sent if st.mailer else 0,
            "email_enabled": st.mailer is not None,
        }

    return app


app = create_app()
