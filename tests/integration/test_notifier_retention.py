"""The notifier's retention: finished deliveries and e-mails past NOTIFIER_RETENTION_DAYS go, nothing else."""

from __future__ import annotations

import asyncio
import uuid

import psycopg
from psycopg_pool import AsyncConnectionPool

from registry_notifier.retention import RetentionWorker


def test_finished_rows_past_the_retention_are_deleted_and_nothing_else(registry, pg_settings):
    owner = registry.register("RetentionOwner")
    deployment = f"retention-{uuid.uuid4().hex[:8]}"
    ids: dict[str, int] = {}
    with psycopg.connect(pg_settings.database_url, autocommit=True) as conn:
        hook = conn.execute(
            "insert into webhooks (owner_id, url, event_types, secret) values (%s, 'https://example.com/h',"
            " array['upload.verified'], 'whsec_test') returning id",
            [owner.user_id],
        ).fetchone()[0]
        rows = {  # name: (status, age in days, deployment)
            "old_delivered": ("delivered", 40, deployment),
            "old_failed": ("failed", 40, deployment),
            "old_pending": ("pending", 40, deployment),
            "recent_delivered": ("delivered", 5, deployment),
            "old_other_deployment": ("delivered", 40, "elsewhere"),
        }
        for name, (status, age, dep) in rows.items():
            ids[name] = conn.execute(
                "insert into webhook_deliveries (webhook_id, deployment, event_id, event_type, order_key, message_id,"
                " payload, event_time, status, created_at) values (%s, %s, %s, 'upload.verified', 'k', %s, '{}',"
                " now(), %s, now() - make_interval(days => %s)) returning id",
                [hook, dep, uuid.uuid4(), f"msg_{uuid.uuid4().hex}", status, age],
            ).fetchone()[0]
        conn.execute(
            "insert into webhook_attempts (delivery_id, attempt, status_code) values (%s, 1, 204)",
            [ids["old_delivered"]],
        )
        emails = {}
        for name, (status, age) in {
            "old_sent": ("sent", 40),
            "old_queued": ("pending", 40),
            "new_sent": ("sent", 1),
        }.items():
            emails[name] = conn.execute(
                "insert into notifier_emails (deployment, dedupe_key, kind, to_addr, subject, body, status, created_at)"
                " values (%s, %s, 'test', 'a@example.com', 's', 'b', %s, now() - make_interval(days => %s)) returning id",
                [deployment, uuid.uuid4().hex, status, age],
            ).fetchone()[0]

    async def prune() -> dict[str, int]:
        async with AsyncConnectionPool(pg_settings.database_url, kwargs={"autocommit": True}) as pool:
            return await RetentionWorker(pool, deployment, days=30).prune()

    assert asyncio.run(prune()) == {"deliveries": 2, "emails": 1}
    with psycopg.connect(pg_settings.database_url, autocommit=True) as conn:
        left = {r[0] for r in conn.execute("select id from webhook_deliveries where webhook_id = %s", [hook])}
        assert left == {ids["old_pending"], ids["recent_delivered"], ids["old_other_deployment"]}
        attempts = conn.execute("select count(*) from webhook_attempts where delivery_id = %s", [ids["old_delivered"]])
        assert attempts.fetchone()[0] == 0  # the attempts went with their delivery
        left = {r[0] for r in conn.execute("select id from notifier_emails where deployment = %s", [deployment])}
        assert left == {emails["old_queued"], emails["new_sent"]}
        conn.execute("delete from webhooks where id = %s", [hook])
        conn.execute("delete from notifier_emails where deployment = %s", [deployment])
