"""Sending webhooks: claim due deliveries from Postgres, POST them signed, record the outcome.

- Standard Webhooks: headers `webhook-id` (stable per subscription and event), `webhook-timestamp`,
  `webhook-signature` (signed with the `standardwebhooks` library); the body is the CloudEvent JSON.
- In order per (webhook, model): only the first undelivered delivery of a key is ever claimed; after a
  success the same task takes the next one of its key at once.
- Retries follow NOTIFIER_RETRY_SCHEDULE_S with jitter, then the delivery is given up. Every failed
  attempt lengthens the webhook's failure streak; at NOTIFIER_MAX_CONSECUTIVE_FAILURES it is disabled
  (its owner is e-mailed by the mail worker). All state is in Postgres: a restart loses nothing, and
  several notifiers share the work (row locks, leases).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import httpx
from opentelemetry.trace import SpanKind
from psycopg_pool import AsyncConnectionPool
from standardwebhooks import Webhook

from registry_notifier import repository
from registry_notifier.settings import NotifierSettings
from registry_shared import tracing
from registry_shared.background import BackgroundTask
from registry_shared.logging import correlation_id
from registry_shared.metrics import WEBHOOK_DELIVERIES, WEBHOOK_GAVE_UP, WEBHOOK_RETRIES, WEBHOOKS_DISABLED
from registry_shared.secretbox import SecretKeyError, is_sealed
from registry_shared.webhooks import TargetGuard, TargetRefused

log = logging.getLogger(__name__)
_MAX_RESPONSE_BYTES = 64 * 1024
#: Deliveries of one key claimed and recorded together (sent one after the other, in order).
_RUN = 20
VERSION_CREATED = "registry.version.created.v1"
#: Shortest pause between two claims of heads of line.
_MIN_CLAIM_GAP_S = 0.02


@dataclass(frozen=True, slots=True)
class Outcome:
    """The result of one attempt."""

    ok: bool
    status_code: int | None
    latency_ms: int | None
    error: str | None
    #: False when the delivery is withheld (not the receiver's fault): it is given up at once and does
    #: not count against the webhook.
    receiver_failed: bool = True


def retry_delay(delays: list[float], attempts: int, jitter: float) -> float | None:
    """Seconds before the next attempt after `attempts` failed ones; None once the schedule is used up."""
    if attempts - 1 >= len(delays):
        return None
    base = delays[attempts - 1]
    return base * (1 - jitter * random.random())


def sign(secret: str, message_id: str, timestamp: datetime, payload: str) -> str:
    """The `webhook-signature` header value for a payload."""
    return Webhook(secret).sign(message_id, timestamp, payload)


class DeliveryWorker(BackgroundTask):
    """Delivers due webhooks with bounded concurrency (supervised: restarted if its loop dies)."""

    name = "notifier-delivery"

    def __init__(
        self,
        pool: AsyncConnectionPool,
        settings: NotifierSettings,
        guard: TargetGuard,
        on_disabled: Callable[[], None],
    ) -> None:
        self._pool = pool
        self._s = settings
        self._guard = guard
        self._on_disabled = on_disabled
        self._client = httpx.AsyncClient(
            timeout=settings.notifier_delivery_timeout_s,
            follow_redirects=False,
            trust_env=False,
            limits=httpx.Limits(max_connections=settings.notifier_delivery_concurrency * 2),
        )
        self._signers: dict[str, Webhook] = {}
        self._box = settings.secret_box()
        self._tasks: set[asyncio.Task[None]] = set()
        #: Deliveries claimed by this process and not recorded yet (handed back on a graceful stop).
        self._claimed: set[int] = set()
        self.wakeup = asyncio.Event()
        self.sent = 0
        self.failed_attempts = 0

    def _signer(self, stored: str) -> Webhook:
        """The signer of a webhook's secret as stored (sealed with WEBHOOK_SECRET_KEY, or in clear by an
        older version); SecretKeyError when it does not open."""
        w = self._signers.get(stored)
        if w is None:
            if is_sealed(stored) and self._box is None:
                raise SecretKeyError("WEBHOOK_SECRET_KEY is not configured")
            secret = self._box.open(stored) if self._box is not None else stored
            if len(self._signers) > 10_000:
                self._signers.clear()
            w = self._signers[stored] = Webhook(secret)
        return w

    async def attempt(self, row: dict) -> Outcome:
        """POST one delivery to its (checked, pinned) target."""
        t0 = time.perf_counter()
        try:
            target = await self._guard.pin(row["url"])
        except TargetRefused as exc:
            return Outcome(False, None, None, f"refused: {exc}")
        now = datetime.now(UTC)
        try:
            signer = self._signer(row["secret"])
        except SecretKeyError as exc:  # the operator's key, not the receiver: not counted against the webhook
            log.error("webhook %s: signing secret unreadable: %s", row["webhook_id"], exc)
            return Outcome(False, None, None, f"signing secret unreadable: {exc}", False)
        headers = {
            "host": target.host_header,
            "content-type": "application/json",
            "user-agent": "model-registry-notifier/1",
            "webhook-id": row["message_id"],
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": signer.sign(row["message_id"], now, row["payload"]),
        }
        extensions = {"sni_hostname": target.sni_hostname} if target.sni_hostname else {}
        try:
            request = self._client.build_request(
                "POST", target.url, content=row["payload"].encode(), headers=headers, extensions=extensions
            )
            response = await self._client.send(request, stream=True)
            try:
                read = 0
                async for chunk in response.aiter_raw():
                    read += len(chunk)
                    if read > _MAX_RESPONSE_BYTES:
                        break
            finally:
                await response.aclose()
        except httpx.HTTPError as exc:
            ms = int((time.perf_counter() - t0) * 1000)
            return Outcome(False, None, ms, f"{type(exc).__name__}: {exc}"[:500] or type(exc).__name__)
        ms = int((time.perf_counter() - t0) * 1000)
        if 200 <= response.status_code < 300:
            return Outcome(True, response.status_code, ms, None)
        return Outcome(False, response.status_code, ms, f"HTTP {response.status_code}")

    async def _withheld(self, row: dict) -> Outcome | None:
        """A retried version.created goes out only while its model is still visible to the subscriber
        (a grant revoked meanwhile withholds it); first attempts were checked when routed."""
        if row["event_type"] != VERSION_CREATED or row["attempts"] == 0:
            return None
        async with self._pool.connection() as conn:
            repo_id = json.loads(row["payload"])["data"]["repo_id"]
            if await repository.still_visible(conn, row["webhook_id"], repo_id, int(time.time())):
                return None
        return Outcome(False, None, None, "withheld: the model is no longer visible to the subscriber", False)

    async def _record(self, run: list[dict], results: list[tuple[dict, Outcome]]) -> list[dict]:
        """Store the outcomes of a run; returns the next run of the same key, claimed, if it may go now."""
        s = self._s
        webhook_id, order_key = run[0]["webhook_id"], run[0]["order_key"]
        done = [(r["id"], r["attempts"] + 1, o.status_code, o.latency_ms) for r, o in results if o.ok]
        failed = results[-1] if results and not results[-1][1].ok else None
        rest = [r["id"] for r in run[len(results) :]]
        disabled, follow = False, True
        # Each statement commits on its own: a crash between them loses nothing (a delivered row is
        # final, a claimed row returns when its lease ends, a failure is logged with its attempt).
        async with self._pool.connection() as conn:
            if done and failed is None and not rest:  # the usual case: one round trip
                nxt = await repository.record_delivered_and_claim(
                    conn, s.notifier_deployment, webhook_id, order_key, done, s.notifier_lease_s, _RUN
                )
                self.sent += len(done)
                return nxt
            if done:
                await repository.record_delivered(conn, webhook_id, done)
            if failed is not None:
                row, out = failed
                delay = (
                    retry_delay(s.retry_delays, row["attempts"] + 1, s.notifier_retry_jitter)
                    if out.receiver_failed
                    else None
                )
                error = out.error or "failed"
                async with conn.transaction():
                    await repository.record_failure(
                        conn, row["id"], row["attempts"] + 1, out.status_code, out.latency_ms, error, delay
                    )
                    if out.receiver_failed:
                        disabled = await repository.count_failure(
                            conn, webhook_id, s.notifier_max_consecutive_failures, error
                        )
                follow = delay is None and not disabled
                if delay is None:
                    WEBHOOK_GAVE_UP.inc()
            if rest:
                await repository.release(conn, rest)
            nxt = (
                await repository.claim_run(conn, s.notifier_deployment, webhook_id, order_key, s.notifier_lease_s, _RUN)
                if follow
                else []
            )
        self.sent += len(done)
        self.failed_attempts += failed is not None
        if disabled:
            WEBHOOKS_DISABLED.inc()
            log.warning("webhook disabled after repeated failures", extra={"fields": {"webhook_id": webhook_id}})
            self._on_disabled()
        return nxt

    async def _pipeline(self, run: list[dict]) -> None:
        """Send a key's deliveries one after the other; record them a run at a time."""
        self._claimed.update(r["id"] for r in run)
        while run:
            started = time.monotonic()
            results: list[tuple[dict, Outcome]] = []
            for row in run:
                token = correlation_id.set(str(row["event_id"]))
                traceparent = tracing.traceparent_in(row["payload"]) if tracing.ENABLED else None
                try:
                    with tracing.consuming(
                        traceparent, "webhook deliver", SpanKind.CLIENT, **{"registry.delivery_id": row["id"]}
                    ) as span:
                        out = await self._withheld(row) or await self.attempt(row)
                        span.set_attribute("registry.delivered", out.ok)
                except Exception as exc:  # a URL httpx refuses, or a bug: a failed attempt, retried like any
                    log.exception("delivery attempt broke")
                    out = Outcome(False, None, None, f"{type(exc).__name__}: {exc}"[:500])
                finally:
                    correlation_id.reset(token)
                results.append((row, out))
                WEBHOOK_DELIVERIES.labels("delivered" if out.ok else "failed").inc()
                if row["attempts"]:
                    WEBHOOK_RETRIES.inc()
                if not out.ok:
                    log.info(
                        "delivery attempt failed",
                        extra={
                            "fields": {"delivery_id": row["id"], "attempt": row["attempts"] + 1, "error": out.error}
                        },
                    )
                    break
                if time.monotonic() - started > self._s.notifier_lease_s / 2:
                    break  # record before the lease runs out; the rest is claimed again
            try:
                recorded, run = run, await self._record(run, results)
            except Exception as exc:  # database away: the lease expires and the deliveries are claimed again
                log.warning("deliveries not recorded: %s", exc)
                recorded, run = run, []
            self._claimed.difference_update(r["id"] for r in recorded)
            self._claimed.update(r["id"] for r in run)
        # A delivery of this key queued while the last run was being recorded may not have been seen by
        # either that run or the last claim: look for heads again soon.
        self.wakeup.set()

    async def run(self) -> None:
        """Claim and send due deliveries until cancelled."""
        s = self._s
        while True:
            self.wakeup.clear()
            free = s.notifier_delivery_concurrency - len(self._tasks)
            rows: list[dict] = []
            if free > 0:
                try:
                    async with self._pool.connection() as conn:  # one statement: its own transaction
                        rows = await repository.claim_heads(
                            conn, s.notifier_deployment, free, s.notifier_lease_s, s.notifier_adopt_after_s
                        )
                    self.report_ok()
                except Exception as exc:  # the database away: looked for again at the next poll
                    self.report_retrying(exc)
                    log.warning("cannot claim deliveries: %s", exc)
                for row in rows:
                    task = asyncio.create_task(self._pipeline([row]))
                    self._tasks.add(task)
                    task.add_done_callback(self._done)
            if rows and len(rows) == free:
                await asyncio.sleep(0)  # more may be due: look again once a slot frees
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wakeup.wait(), timeout=s.notifier_poll_interval_s)
            await asyncio.sleep(_MIN_CLAIM_GAP_S)  # wake-ups that come together are served by one claim

    def _done(self, task: asyncio.Task[None]) -> None:
        full = len(self._tasks) >= self._s.notifier_delivery_concurrency
        self._tasks.discard(task)
        if full:  # a slot is free again: look for more at once (otherwise new work wakes us up)
            self.wakeup.set()

    async def stop(self) -> None:
        """Stop claiming, let in-flight attempts finish briefly, hand back what was claimed but not sent."""
        await super().stop()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
            for t in self._tasks:
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._claimed:
            try:
                async with self._pool.connection(timeout=5) as conn:
                    await repository.release(conn, sorted(self._claimed))
            except Exception as exc:  # their leases run out instead
                log.warning("claimed deliveries not handed back: %s", exc)
        await self._client.aclose()
