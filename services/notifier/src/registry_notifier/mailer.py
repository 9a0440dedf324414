"""The e-mail queue's worker: sends what this deployment queued, retries, and tells owners of disabled webhooks."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from psycopg_pool import AsyncConnectionPool

from registry_notifier import mail, repository
from registry_notifier.delivery import retry_delay
from registry_notifier.settings import NotifierSettings
from registry_shared.background import BackgroundTask
from registry_shared.metrics import EMAILS

log = logging.getLogger(__name__)
_BATCH = 20


class MailWorker(BackgroundTask):
    """Sends queued e-mails over SMTP (one thread per message), durable and retried (supervised)."""

    name = "notifier-mail"

    def __init__(self, pool: AsyncConnectionPool, settings: NotifierSettings) -> None:
        self._pool = pool
        self._s = settings
        self._mailer = mail.SmtpMailer(settings)
        self.wakeup = asyncio.Event()
        self.sent = 0

    async def queue_disabled_notices(self) -> int:
        """Queue an e-mail to the owner of every recently disabled webhook not yet told by this deployment."""
        async with self._pool.connection() as conn:
            rows = await repository.disabled_without_email(conn, self._s.notifier_deployment)
            emails = [
                (
                    self._s.notifier_deployment,
                    f"webhook_disabled:{r['id']}:{r['disabled_ts']}",
                    "webhook_disabled",
                    r["email"],
                    *mail.webhook_disabled(r["id"], r["url"], r["disabled_reason"]),
                )
                for r in rows
            ]
            await repository.insert_emails(conn, emails)
        return len(emails)

    async def send_due(self) -> int:
        """Send the due e-mails of this deployment; returns how many were claimed."""
        s = self._s
        async with self._pool.connection() as conn, conn.transaction():
            claimed = await repository.claim_emails(conn, s.notifier_deployment, _BATCH, s.notifier_lease_s)
        for e in claimed:
            try:
                await asyncio.to_thread(self._mailer.send, e["to_addr"], e["subject"], e["body"])
            except Exception as exc:  # relay down or refusing: retry on the schedule
                delay = retry_delay(s.retry_delays, e["attempts"], s.notifier_retry_jitter)
                EMAILS.labels("failed").inc()
                log.warning("e-mail not sent: %s", exc, extra={"fields": {"email_id": e["id"], "kind": e["kind"]}})
                async with self._pool.connection() as conn:
                    await repository.email_failed(conn, e["id"], f"{type(exc).__name__}: {exc}", delay)
                continue
            async with self._pool.connection() as conn:
                await repository.email_sent(conn, e["id"])
            self.sent += 1
            EMAILS.labels("sent").inc()
        return len(claimed)

    async def run(self) -> None:
        """Work the queue until cancelled."""
        while True:
            self.wakeup.clear()
            claimed = 0
            try:
                await self.queue_disabled_notices()
                claimed = await self.send_due()
                self.report_ok()
            except Exception as exc:  # the database away: tried again at the next poll
                self.report_retrying(exc)
                log.warning("mail worker paused: %s", exc)
            if claimed == _BATCH:
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wakeup.wait(), timeout=max(self._s.notifier_poll_interval_s, 1.0))
