"""Kafka → durable work: each batch of events becomes delivery and e-mail rows, then offsets are committed.

Offsets are committed only after the rows are stored, so a crash re-reads the batch; the unique
(webhook, event) and (deployment, dedupe key) constraints make that re-read a no-op.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from aiokafka import AIOKafkaConsumer
from psycopg_pool import AsyncConnectionPool
from pydantic import ValidationError

from registry_notifier import repository
from registry_notifier.routing import SUBSCRIBABLE, Incoming, Router
from registry_notifier.settings import NotifierSettings
from registry_shared.events import Topics, decode_event

log = logging.getLogger(__name__)
TOPICS = (Topics.USERS, Topics.CATALOG, Topics.UPLOADS, Topics.VERDICTS)
COMMIT_INTERVAL_S = 0.5


class EventConsumer:
    """Consumes the registry's topics in group NOTIFIER_GROUP_ID and queues notifications."""

    def __init__(
        self, pool: AsyncConnectionPool, settings: NotifierSettings, router: Router, on_stored: Callable[[], None]
    ) -> None:
        self._pool = pool
        self._s = settings
        self._router = router
        self._on_stored = on_stored
        self._task: asyncio.Task[None] | None = None
        #: True once partitions are assigned and their start positions known (tests wait for it).
        self.ready = False
        self.events_seen = 0
        self.deliveries_queued = 0

    async def _wait_assignment(self, consumer: AIOKafkaConsumer) -> None:
        while not consumer.assignment():
            await asyncio.sleep(0.05)
        for tp in consumer.assignment():
            await consumer.position(tp)

    def _decode(self, batch: dict) -> list[Incoming]:
        items: list[Incoming] = []
        for records in batch.values():
            for msg in records:
                try:
                    event = decode_event(msg.value)
                    if event.type not in SUBSCRIBABLE:
                        continue  # nobody subscribes to it
                    event.payload()  # a payload that does not match its type is refused here, not half-routed
                    items.append(Incoming(event, msg.value.decode()))
                except (ValidationError, ValueError, UnicodeDecodeError) as exc:
                    log.error(
                        "unreadable event skipped",
                        extra={"fields": {"topic": msg.topic, "offset": msg.offset, "error": str(exc)[:200]}},
                    )
        return items

    async def store(self, items: list[Incoming]) -> int:
        """Queue the deliveries and e-mails of `items`; returns the deliveries planned.

        No transaction is needed: every insert is idempotent, and offsets are committed only after this
        returns, so a failure half-way is repaired by reading the batch again."""
        async with self._pool.connection() as conn:
            plan = await self._router.plan(conn, items)
            await repository.insert_deliveries(conn, plan.deliveries)
            await repository.insert_emails(conn, plan.emails)
        return len(plan.deliveries)

    async def run(self) -> None:
        """Consume until cancelled; on any failure start over from the committed offsets."""
        while True:
            consumer = AIOKafkaConsumer(
                *TOPICS,
                bootstrap_servers=self._s.kafka_bootstrap_servers,
                client_id=self._s.kafka_client_id,
                group_id=self._s.notifier_group_id,
                enable_auto_commit=False,
                auto_offset_reset=self._s.notifier_auto_offset_reset,
            )
            try:
                await consumer.start()
                await self._wait_assignment(consumer)
                self.ready = True
                log.info("consuming", extra={"fields": {"group": self._s.notifier_group_id}})
                uncommitted, last_commit = False, time.monotonic()
                while True:
                    batch = await consumer.getmany(timeout_ms=200, max_records=500)
                    if batch:
                        items = self._decode(batch)
                        queued = await self.store(items) if items else 0
                        uncommitted = True
                        self.events_seen += len(items)
                        self.deliveries_queued += queued
                        if queued:
                            self._on_stored()
                    # Offsets of stored batches, at most every COMMIT_INTERVAL_S (a replay is harmless).
                    if uncommitted and (not batch or time.monotonic() - last_commit >= COMMIT_INTERVAL_S):
                        await consumer.commit()
                        uncommitted, last_commit = False, time.monotonic()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Kafka or Postgres away: re-read from the committed offsets
                log.warning("event consumer restarting: %s", exc)
                await asyncio.sleep(1.0)
            finally:
                self.ready = False
                with contextlib.suppress(Exception):
                    await consumer.stop()

    def start(self) -> None:
        """Run in the background."""
        self._task = asyncio.create_task(self.run(), name="event-consumer")

    async def stop(self) -> None:
        """Stop consuming (uncommitted events are consumed again next time)."""
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
