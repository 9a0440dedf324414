"""Kafka → durable work, with FastStream: each batch of events becomes delivery and e-mail rows, then its
offsets are committed.

One `KafkaBroker` (consumer only) and one batch subscriber on the registry's topics, in consumer group
NOTIFIER_GROUP_ID. FastStream commits nothing itself (`AckPolicy.MANUAL`): a batch's offsets are
committed only once its rows are stored, so a crash re-reads it and the unique (webhook, event) and
(deployment, dedupe key) constraints make that re-read a no-op. Once a batch is stored, the handler notes
where the consumer stands in each partition (past the records handed over, all stored now: the consume
loop fetches the next batch only after the handler returns); `OffsetCommitter` commits those positions
beside the consume loop, at most every COMMIT_INTERVAL_S, so reading and storing never wait for Kafka.
Failures follow the shared consumer policy (`registry_shared.consumer_policy`): a record that is not a
registry event (not JSON, a wrong schema, an id that is not a UUID) or refers to a row that does not exist
goes to the dead-letter topic with the error, and the rest of its batch is stored; a batch that cannot be
stored because Postgres is away is tried again, with the shared backoff, until it is (the consume loop waits
meanwhile, so nothing past it is committed) and `/healthz` says `retrying` meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError
from faststream.kafka import KafkaBroker
from faststream.message import StreamMessage
from faststream.middlewares import AckPolicy
from psycopg_pool import AsyncConnectionPool

from registry_notifier import repository
from registry_notifier.routing import Incoming, Router
from registry_notifier.settings import NotifierSettings
from registry_shared.background import BackgroundTask
from registry_shared.backoff import Backoff
from registry_shared.consumer_policy import (
    ConsumerPolicy,
    Outcome,
    PermanentError,
    decode_cloud_event,
    describe,
    faststream_sink,
)
from registry_shared.events import Topics
from registry_shared.kafka import raw_batch
from registry_shared.webhooks import SUBSCRIPTION_NAME_OF

log = logging.getLogger(__name__)
TOPICS = (Topics.USERS, Topics.CATALOG, Topics.UPLOADS, Topics.VERDICTS)
#: Most events read, routed and stored together.
MAX_BATCH = 500
#: How long one poll waits for events. After an empty poll FastStream pauses as long again before the
#: next one, so this also bounds what an idle consumer adds to an event's latency.
POLL_MS = 20
#: Shortest time between two commits in the background (each is work for the Kafka broker); a crash
#: replays at most about this much, harmlessly. A stop or a rebalance commits at once.
COMMIT_INTERVAL_S = 0.5
#: On stop, how long a batch being stored may take to finish (its offsets are then committed).
GRACEFUL_S = 5.0
#: Delays before starting the broker again while Kafka cannot be reached.
START_BACKOFF = Backoff(initial=0.5, cap=10.0)

ConsumerOf = Callable[[], AIOKafkaConsumer | None]


async def stored_positions(consumer: AIOKafkaConsumer) -> dict[TopicPartition, int]:
    """Where the consumer stands in each of its partitions: past every record it has handed over. Called
    by the handler once its batch is stored (the next batch is fetched only after the handler returns),
    every one of those records is stored."""
    return {tp: await consumer.position(tp) for tp in consumer.assignment()}


class OffsetCommitter(BackgroundTask):
    """Commits positions noted as stored, in the background: one commit at a time and at most one every
    COMMIT_INTERVAL_S, the positions noted meanwhile going together in the next. The offsets are
    explicit, never "whatever has been fetched", so a batch fetched meanwhile is not committed before it
    is stored."""

    name = "notifier-offsets"

    def __init__(self, consumer: ConsumerOf) -> None:
        self._consumer = consumer
        self._pending: dict[TopicPartition, int] = {}
        self._lock = asyncio.Lock()
        self._wakeup = asyncio.Event()

    def stored(self, positions: dict[TopicPartition, int]) -> None:
        """Everything before these positions is stored: they may be committed."""
        for tp, offset in positions.items():
            self._pending[tp] = max(self._pending.get(tp, 0), offset)
        self._wakeup.set()

    async def flush(self) -> None:
        """Commit the offsets stored and not committed yet, of the partitions still assigned. A commit
        that fails is harmless: those events are read again, and storing them again is a no-op."""
        async with self._lock:
            consumer = self._consumer()
            if consumer is None or not self._pending:
                return
            assigned = consumer.assignment()
            offsets = {tp: offset for tp, offset in self._pending.items() if tp in assigned}
            self._pending = {}
            if not offsets:
                return
            try:
                await consumer.commit(offsets)
            except KafkaError as exc:
                log.warning("offsets not committed (those events will be read again): %s", exc)

    async def run(self) -> None:
        """Commit in the background as records are stored."""
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            await self.flush()
            await asyncio.sleep(COMMIT_INTERVAL_S)  # what is noted meanwhile goes in the next commit

    async def stop(self) -> None:
        """Stop committing in the background (after committing what is stored)."""
        await super().stop()
        await self.flush()


class Partitions(ConsumerRebalanceListener):
    """Follows the consumer's partitions: commits what is stored before partitions go, and knows whether
    the consumer has its partitions and where it starts in each (`ready`; tests wait for it: with
    `auto_offset_reset=latest`, an event published after that is consumed)."""

    def __init__(self, consumer: ConsumerOf, committer: OffsetCommitter) -> None:
        self._consumer = consumer
        self._committer = committer
        self._task: asyncio.Task[None] | None = None
        self.ready = False

    def reset(self) -> None:
        """Not ready (stopped, or partitions being reassigned)."""
        self.ready = False
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        """A rebalance begins: commit what is stored while the partitions are still ours."""
        self.reset()
        await self._committer.flush()

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


@dataclass
class Decoded:
    """A batch as decoded: the events for subscribers, and the records that are not registry events (with
    why). Events nobody subscribes to are in neither: they are simply consumed."""

    items: list[Incoming] = field(default_factory=list)
    poison: list[tuple[ConsumerRecord[Any, bytes], str]] = field(default_factory=list)


def decode_records(records: Iterable[ConsumerRecord[Any, bytes]]) -> Decoded:
    """Split a batch: routable events, and records refused by the shared decoding (not JSON, a wrong schema,
    an id that is not a UUID, a payload that does not match its type), which are dead-lettered."""
    out = Decoded()
    for msg in records:
        try:
            event, _ = decode_cloud_event(msg.value)
            if event.type in SUBSCRIPTION_NAME_OF:
                out.items.append(Incoming(event, (msg.value or b"").decode(), msg))
        except (PermanentError, UnicodeDecodeError) as exc:
            out.poison.append((msg, describe(exc)))
    return out


async def decode_batch(message: StreamMessage[tuple[ConsumerRecord[Any, bytes], ...]]) -> Decoded:
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
        self._stopping = asyncio.Event()
        self.events_seen = 0
        self.deliveries_queued = 0
        self.broker = KafkaBroker(
            settings.kafka_bootstrap_servers,
            client_id=settings.kafka_client_id,
            # Its producer publishes dead letters only (the stack creates the topics).
            acks="all",
            enable_idempotence=True,
            graceful_timeout=GRACEFUL_S,
            logger=logging.getLogger("registry_notifier.kafka"),
            log_level=logging.DEBUG,  # a line per batch only when debugging
            # The handler takes the decoder's events as they are: no dependency injection, no validation
            # again (FastDepends would hand a batch through a worker thread for nothing).
            apply_types=False,
        )
        self._committer = OffsetCommitter(lambda: self._subscriber.consumer)
        self._partitions = Partitions(lambda: self._subscriber.consumer, self._committer)
        self._subscriber = self.broker.subscriber(
            *TOPICS,
            group_id=settings.notifier_group_id,
            auto_offset_reset=settings.notifier_auto_offset_reset,
            batch=True,
            max_records=MAX_BATCH,
            batch_timeout_ms=POLL_MS,
            ack_policy=AckPolicy.MANUAL,
            listener=self._partitions,
            parser=raw_batch,  # headers are never decoded: a binary one cannot fail a batch
            decoder=decode_batch,
        )
        self._subscriber(self._handle)
        self.policy = ConsumerPolicy(
            "notifier-events",
            group=settings.notifier_group_id,
            sink=faststream_sink(self.broker),
            stop=self._stopping,
        )
        self.policy.watch(lambda: [getattr(self._subscriber, "consumer", None)])

    @property
    def ready(self) -> bool:
        """True once partitions are assigned and their start positions known."""
        return self._partitions.ready

    async def _handle(self, batch: Decoded) -> None:
        """Dead-letter a batch's poison, store its rows (a batch that fails for good is stored an event at a
        time, so only the events referring to missing rows are dead-lettered; Postgres away is retried with
        the shared backoff), then let its offsets be committed. Stopped meanwhile: nothing is committed, and
        the next run reads the batch again."""
        for record, error in batch.poison:
            if await self.policy.dead_letter(record, error) is Outcome.STOPPED:
                return
        queued = 0

        async def store(items: Sequence[Incoming]) -> None:
            nonlocal queued
            queued += await self.store(items)

        if await self.policy.handle_batch(batch.items, store, lambda i: i.record) is Outcome.STOPPED:
            return
        self.events_seen += len(batch.items)
        self.deliveries_queued += queued
        if queued:
            self._on_stored()
        consumer = self._subscriber.consumer
        if consumer is not None:
            try:
                self._committer.stored(await stored_positions(consumer))
            except KafkaError as exc:  # partitions revoked meanwhile: their new owner reads them again
                log.info("positions not noted: %s", exc)
        if self._stopping.is_set():  # the last batch before the consumer stops: commit it now
            await self._committer.flush()

    async def store(self, items: Sequence[Incoming]) -> int:
        """Queue the deliveries and e-mails of `items`; returns the deliveries planned. MissingReference if
        an event refers to a row that does not exist (nothing of the batch is stored then).

        No transaction is needed: every insert is idempotent, and offsets are committed only after this
        returns, so a failure half-way is repaired by storing the batch again."""
        async with self._pool.connection() as conn:
            plan = await self._router.plan(conn, list(items))
            await repository.insert_deliveries(conn, plan.deliveries)
            await repository.insert_emails(conn, plan.emails)
        return len(plan.deliveries)

    async def run(self) -> None:
        """Start the broker; while Kafka cannot be reached, try again (the shared backoff; `/healthz` says
        `retrying`). Once started, FastStream's consume loop outlives Kafka outages (it reconnects)."""
        attempt = 0
        while True:
            try:
                await self.broker.start()
            except Exception as exc:
                attempt += 1
                self.policy.health.retrying(f"cannot start: {describe(exc)}")
                log.warning("event consumer cannot start, trying again: %s", exc)
                self._partitions.reset()
                with contextlib.suppress(Exception):
                    await self.broker.stop()
                await START_BACKOFF.sleep(attempt, self._stopping)
            else:
                self.policy.health.ok()
                log.info("consuming", extra={"fields": {"group": self._subscriber.group_id}})
                return

    def start(self) -> None:
        """Start in the background (the HTTP face answers meanwhile)."""
        self._committer.start()
        self._task = asyncio.create_task(self.run(), name="event-consumer")

    async def stop(self) -> None:
        """Stop consuming: what is stored is committed, a batch being stored may finish (up to GRACEFUL_S)
        and is then committed, the consumer leaves its group; anything not committed is consumed again
        next time."""
        self._stopping.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        await self._committer.stop()
        self._partitions.reset()
        with contextlib.suppress(Exception):
            await self.broker.stop()
