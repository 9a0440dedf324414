"""Kafka → durable work, with FastStream: each batch of events becomes delivery and e-mail rows, then its
offsets are committed.

One `KafkaBroker` (consumer only) and one batch subscriber on the registry's topics, in consumer group
NOTIFIER_GROUP_ID. Acknowledgement is manual (`AckPolicy.MANUAL`): a batch is acked, i.e. its offsets
committed, only once its rows are stored, so a crash re-reads it and the unique (webhook, event) and
(deployment, dedupe key) constraints make that re-read a no-op. A batch that cannot be stored (Postgres
away) is nacked: the consumer seeks back to its first offsets and reads it again a moment later.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError
from faststream.kafka import KafkaBroker
from faststream.kafka.annotations import KafkaMessage
from faststream.message import StreamMessage
from faststream.middlewares import AckPolicy
from faststream.params import NoCast
from psycopg_pool import AsyncConnectionPool
from pydantic import ValidationError

from registry_notifier import repository
from registry_notifier.routing import Incoming, Router
from registry_notifier.settings import NotifierSettings
from registry_shared.events import Topics, decode_event
from registry_shared.webhooks import SUBSCRIPTION_NAME_OF

log = logging.getLogger(__name__)
TOPICS = (Topics.USERS, Topics.CATALOG, Topics.UPLOADS, Topics.VERDICTS)
#: Most events read, routed and stored together.
MAX_BATCH = 500
#: How long one poll waits for events. After an empty poll FastStream pauses as long again before the
#: next one, so this also bounds what an idle consumer adds to an event's latency.
POLL_MS = 50
#: On stop, how long a batch being stored may take to finish (its offsets are then committed).
GRACEFUL_S = 10.0
#: Pause before reading a batch that could not be stored again, or before starting again.
RETRY_S = 1.0


class Readiness(ConsumerRebalanceListener):
    """Whether the consumer has its partitions and knows where it starts in each (tests wait for it:
    with `auto_offset_reset=latest`, an event published after that is consumed)."""

    def __init__(self, consumer: Callable[[], AIOKafkaConsumer | None]) -> None:
        self._consumer = consumer
        self._task: asyncio.Task[None] | None = None
        self.ready = False

    def reset(self) -> None:
        """Not ready (stopped, or partitions being reassigned)."""
        self.ready = False
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        """A rebalance begins."""
        self.reset()

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        """Partitions assigned: ready once their positions are known (looked up outside the rebalance)."""
        self.reset()
        if assigned:
            self._task = asyncio.create_task(self._positions(assigned), name="notifier-positions")

    async def _positions(self, assigned: set[TopicPartition]) -> None:
        consumer = self._consumer()
        if consumer is None:
            return
        try:
            for tp in assigned:
                await consumer.position(tp)
        except KafkaError as exc:  # reassigned meanwhile: the next assignment decides
            log.debug("positions not known: %s", exc)
            return
        self.ready = True


def decode_records(records: Iterable[ConsumerRecord[Any, bytes]]) -> list[Incoming]:
    """The events of a batch that are for subscribers; unreadable ones are logged and skipped, and a
    payload that does not match its type is refused here, not half-routed."""
    items: list[Incoming] = []
    for msg in records:
        value = msg.value or b""
        try:
            event = decode_event(value)
            if event.type not in SUBSCRIPTION_NAME_OF:
                continue  # nobody subscribes to it
            event.payload()
            items.append(Incoming(event, value.decode()))
        except (ValidationError, ValueError, UnicodeDecodeError) as exc:
            log.error(
                "unreadable event skipped",
                extra={"fields": {"topic": msg.topic, "offset": msg.offset, "error": str(exc)[:200]}},
            )
    return items


async def decode_batch(message: StreamMessage[tuple[ConsumerRecord[Any, bytes], ...]]) -> list[Incoming]:
    """FastStream decoder of the subscriber: a batch's records → the events the handler stores."""
    return decode_records(message.raw_message)


class EventConsumer:
    """Consumes the registry's topics in group NOTIFIER_GROUP_ID and queues notifications."""

    def __init__(
        self, pool: AsyncConnectionPool, settings: NotifierSettings, router: Router, on_stored: Callable[[], None]
    ) -> None:
        self._pool = pool
        self._router = router
        self._on_stored = on_stored
        self._task: asyncio.Task[None] | None = None
        self.events_seen = 0
        self.deliveries_queued = 0
        self.broker = KafkaBroker(
            settings.kafka_bootstrap_servers,
            client_id=settings.kafka_client_id,
            consumer_only=True,  # it only reads: no producer, no admin client (the stack creates the topics)
            graceful_timeout=GRACEFUL_S,
            logger=logging.getLogger("registry_notifier.kafka"),
            log_level=logging.DEBUG,  # a line per batch only when debugging
        )
        self._readiness = Readiness(lambda: self._subscriber.consumer)
        self._subscriber = self.broker.subscriber(
            *TOPICS,
            group_id=settings.notifier_group_id,
            auto_offset_reset=settings.notifier_auto_offset_reset,
            batch=True,
            max_records=MAX_BATCH,
            batch_timeout_ms=POLL_MS,
            ack_policy=AckPolicy.MANUAL,
            listener=self._readiness,
            decoder=decode_batch,
        )
        self._subscriber(self._handle)

    @property
    def ready(self) -> bool:
        """True once partitions are assigned and their start positions known."""
        return self._readiness.ready

    async def _handle(self, items: NoCast[list[Incoming]], message: KafkaMessage) -> None:
        """Store a batch's rows, then commit its offsets; if it cannot be stored, read it again."""
        try:
            queued = await self.store(items) if items else 0
        except Exception as exc:  # Postgres away: nothing was committed, the batch is read again
            log.warning("events not stored, reading them again: %s", exc)
            await asyncio.sleep(RETRY_S)
            await message.nack()
            return
        self.events_seen += len(items)
        self.deliveries_queued += queued
        if queued:
            self._on_stored()
        try:
            await message.ack()
        except KafkaError as exc:  # e.g. a rebalance: the batch is read again, and storing it is a no-op
            log.warning("offsets not committed: %s", exc)

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
        """Start the broker; while Kafka cannot be reached, try again. Once started, FastStream's consume
        loop outlives Kafka outages (it reconnects) and failed batches (nacked, read again)."""
        while True:
            try:
                await self.broker.start()
            except Exception as exc:
                log.warning("event consumer cannot start, trying again: %s", exc)
                self._readiness.reset()
                with contextlib.suppress(Exception):
                    await self.broker.stop()
                await asyncio.sleep(RETRY_S)
            else:
                log.info("consuming", extra={"fields": {"group": self._subscriber.group_id}})
                return

    def start(self) -> None:
        """Start in the background (the HTTP face answers meanwhile)."""
        self._task = asyncio.create_task(self.run(), name="event-consumer")

    async def stop(self) -> None:
        """Stop consuming: a batch being stored may finish (up to GRACEFUL_S), the consumer leaves its
        group; anything not committed is consumed again next time."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        self._readiness.reset()
        with contextlib.suppress(Exception):
            await self.broker.stop()
