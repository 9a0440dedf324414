"""Retention: finished deliveries and e-mails are deleted once older than NOTIFIER_RETENTION_DAYS.

Delivered and failed deliveries (their attempts go with them) and sent and failed e-mails of this
deployment, in batches of `BATCH` rows, at start-up and then every `interval` seconds. Pending and
in-flight ones are never touched. The unique keys of these rows are what makes a replayed event a no-op,
so the retention must stay above how long Kafka keeps the topics (7 days by default).
"""

from __future__ import annotations

import asyncio
import logging

from psycopg_pool import AsyncConnectionPool

from registry_shared.background import BackgroundTask

log = logging.getLogger(__name__)
BATCH = 5000

_DELIVERIES = """
delete from webhook_deliveries where id in (
    select id from webhook_deliveries
    where deployment = %s and status in ('delivered', 'failed') and created_at < now() - make_interval(days => %s)
    limit %s)"""
_EMAILS = """
delete from notifier_emails where id in (
    select id from notifier_emails
    where deployment = %s and status in ('sent', 'failed') and created_at < now() - make_interval(days => %s)
    limit %s)"""


class RetentionWorker(BackgroundTask):
    """Deletes this deployment's finished deliveries and e-mails past the retention."""

    name = "notifier-retention"

    def __init__(self, pool: AsyncConnectionPool, deployment: str, days: int, interval: float = 3600.0) -> None:
        self._pool = pool
        self._deployment = deployment
        self._days = days
        self._interval = interval

    async def prune(self) -> dict[str, int]:
        """Delete what is past the retention now; returns how many deliveries and e-mails went."""
        gone = {"deliveries": 0, "emails": 0}
        for what, sql in (("deliveries", _DELIVERIES), ("emails", _EMAILS)):
            while True:
                async with self._pool.connection() as conn:
                    cur = await conn.execute(sql, [self._deployment, self._days, BATCH])
                gone[what] += cur.rowcount
                if cur.rowcount < BATCH:
                    break
        return gone

    async def run(self) -> None:
        """Prune at start and then every interval until cancelled."""
        while True:
            try:
                gone = await self.prune()
                self.report_ok()
                if any(gone.values()):
                    log.info("finished deliveries and e-mails pruned", extra={"fields": gone})
            except Exception as exc:  # the database briefly away: next time
                self.report_retrying(exc)
                log.warning("retention not applied: %s", exc)
            await asyncio.sleep(self._interval)
