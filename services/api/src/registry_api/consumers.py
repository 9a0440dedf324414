"""What the api consumes from Kafka: the loops only; the rules are in catalog.service.

- Ingest's verdicts (`registry.verdicts.v1`): a verified upload becomes an available file; a rejected
  one keeps its reason for the developer. Each event applies once (consumed_events); offsets are
  committed to Kafka after each partition's messages are handled.
- Access events (`registry.access.v1`): the catalog's `downloads` counter, eventually consistent.
  Offsets live in Postgres next to the counters, so a restart neither loses nor double-counts; several api
  processes split the partitions (one consumer group) and never count a record twice (DownloadCounter).

Both follow the project's consumer policy (registry_shared.consumer_policy): a message that can never be
applied (not JSON, a wrong schema, an event id that is not a UUID, an upload or model that does not exist)
goes to `registry.dead-letter.v1` with the error and the consumer moves on; Postgres or Kafka away is
retried with the shared bounded backoff, logged, and shown in `/healthz` until it works again. Both are
supervised background tasks (registry_shared.background): one that dies is restarted, and `/healthz`
fails if it keeps dying.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Sequence

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from psycopg_pool import AsyncConnectionPool

from registry_api.catalog import repository, service
from registry_shared import tracing
from registry_shared.background import BackgroundTask
from registry_shared.consumer_policy import (
    ConsumerPolicy,
    MissingReference,
    Stopped,
    aiokafka_sink,
    decode_cloud_event,
    describe,
)
from registry_shared.events import Topics
from registry_shared.logging import correlation_id

log = logging.getLogger(__name__)
VERDICTS_GROUP = "registry-api-verdicts"
DOWNLOADS_GROUP = "registry-api-downloads"


class _KafkaLoop(BackgroundTask):
    """A consumer and the producer of its dead letters, and its policy (created once per task)."""

    group = ""

    def __init__(self, pool: AsyncConnectionPool, bootstrap: str, topic: str, dead_letter_topic: str) -> None:
        self._pool = pool
        self._bootstrap = bootstrap
        self._topic = topic
        self._dead_letter_topic = dead_letter_topic
        self._producer: AIOKafkaProducer | None = None
        self.policy = ConsumerPolicy(
            self.name, group=self.group, sink=self._send_dead_letter, dead_letter_topic=dead_letter_topic
        )
        self._consumer: AIOKafkaConsumer | None = None  # the running one, for the metrics' lag
        self.policy.watch(lambda: [self._consumer])

    async def _send_dead_letter(self, topic: str, value: bytes, key: bytes | None, headers: dict[str, str]) -> None:
        if self._producer is None:
            raise ConnectionError("the dead-letter producer is not started")
        await aiokafka_sink(self._producer)(topic, value, key, headers)

    @contextlib.asynccontextmanager
    async def _producer_started(self) -> AsyncIterator[AIOKafkaProducer]:
        producer = AIOKafkaProducer(bootstrap_servers=self._bootstrap, acks="all", enable_idempotence=True)
        await producer.start()
        self._producer = producer
        try:
            yield producer
        finally:
            self._producer = None
            with contextlib.suppress(Exception):
                await producer.stop()


class VerdictConsumer(_KafkaLoop):
    """Applies ingest's verdicts to the catalog."""

    name = "verdict-consumer"
    group = VERDICTS_GROUP

    def __init__(
        self,
        pool: AsyncConnectionPool,
        bootstrap: str,
        topic: str = Topics.VERDICTS,
        dead_letter_topic: str = Topics.DEAD_LETTER,
    ) -> None:
        super().__init__(pool, bootstrap, topic, dead_letter_topic)

    async def run(self) -> None:
        consumer = AIOKafkaConsumer(
            self._topic,
            bootstrap_servers=self._bootstrap,
            group_id=VERDICTS_GROUP,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
        )
        await consumer.start()
        self._consumer = consumer
        try:
            async with self._producer_started():
                while True:
                    batch = await consumer.getmany(timeout_ms=500, max_records=200)
                    for tp, records in batch.items():
                        for record in records:
                            if not (await self.policy.handle(record, self._apply)).committable:
                                return  # stopping: not committed, read again next time
                        await consumer.commit({tp: records[-1].offset + 1})
                    self.policy.health.ok()
        finally:
            with contextlib.suppress(Exception):
                await consumer.stop()

    async def _apply(self, record: ConsumerRecord) -> None:
        """One verdict, in one transaction (PermanentError: dead-lettered; Postgres away: retried)."""
        event, payload = decode_cloud_event(record.value)
        token = correlation_id.set(event.id)
        try:
            with tracing.consuming(event.traceparent, f"apply {event.type}", **{"messaging.message.id": event.id}):
                async with self._pool.connection() as conn, conn.transaction():
                    await service.apply_verdict(conn, event, payload)
        finally:
            correlation_id.reset(token)


class _Fenced(Exception):
    """Another consumer stored past where this one stands in a partition: the batch is dropped."""


class DownloadCounter(_KafkaLoop, ConsumerRebalanceListener):
    """Adds real downloads to models.downloads, exactly once, with offsets stored beside the counts.

    Every api process runs one, in consumer group DOWNLOADS_GROUP: Kafka splits the partitions of the access
    topic between the processes. The offsets of record are the ones in Postgres: a partition assigned to this
    process is read from there. Storing them is a compare-and-set on the offset this process last read or
    stored: during a rebalance two processes can hold the same records for a moment; only the first to store
    counts them, the other finds the offset moved, drops its batch and reads on from the stored offset. Records
    before the stored offset (read again after a seek) are never counted twice.
    """

    name = "download-counter"
    group = DOWNLOADS_GROUP

    def __init__(
        self,
        pool: AsyncConnectionPool,
        bootstrap: str,
        topic: str = Topics.ACCESS,
        dead_letter_topic: str = Topics.DEAD_LETTER,
    ) -> None:
        super().__init__(pool, bootstrap, topic, dead_letter_topic)
        #: partition → the offset stored in Postgres as this process last saw it (None: nothing stored yet),
        #: for each partition assigned and positioned; the others' records are not counted.
        self._stored: dict[int, int | None] = {}
        self._to_seek: set[int] = set()

    # ConsumerRebalanceListener: called by aiokafka around a rebalance (between two getmany of the loop, or
    # while one waits); the seeks themselves are made by the loop, before its next fetch.
    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        for tp in revoked:
            self._stored.pop(tp.partition, None)
            self._to_seek.discard(tp.partition)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        for tp in assigned:
            self._stored.pop(tp.partition, None)
            self._to_seek.add(tp.partition)

    async def _seek_stored(self, consumer: AIOKafkaConsumer) -> None:
        """Position the partitions assigned since the last fetch at their stored offsets."""

        async def read() -> dict[int, int]:
            async with self._pool.connection() as conn:
                return await repository.stored_offsets(conn, DOWNLOADS_GROUP, self._topic)

        stored = await self.policy.retry(read)
        owned = {tp.partition for tp in consumer.assignment()}
        for partition in sorted(self._to_seek & owned):
            tp = TopicPartition(self._topic, partition)
            if partition in stored:
                consumer.seek(tp, stored[partition])
            else:
                await consumer.seek_to_beginning(tp)
            self._stored[partition] = stored.get(partition)
        self._to_seek.clear()

    async def run(self) -> None:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self._bootstrap, group_id=DOWNLOADS_GROUP, enable_auto_commit=False
        )
        self._stored.clear()
        self._to_seek.clear()
        await consumer.start()
        self._consumer = consumer
        try:
            consumer.subscribe([self._topic], listener=self)
            async with self._producer_started():
                while True:
                    if self._to_seek:
                        await self._seek_stored(consumer)
                    batch = await consumer.getmany(timeout_ms=1000, max_records=5000)
                    # Only partitions positioned at their stored offsets, and only records past them.
                    records = [
                        r
                        for recs in batch.values()
                        for r in recs
                        if r.partition in self._stored
                        and r.partition not in self._to_seek
                        and r.offset >= (self._stored[r.partition] or 0)
                    ]
                    if records:
                        await self._handle(records)
                    self.policy.health.ok()
        finally:
            with contextlib.suppress(Exception):
                await consumer.stop()

    async def _handle(self, records: list[ConsumerRecord]) -> None:
        """Count a fetched batch: invalid messages and downloads of unknown models dead-lettered first, then
        the counts and the offsets in one transaction."""
        values = [r.value for r in records]
        tally = service.tally_downloads(values)
        dead = dict(tally.invalid)

        async def unknown() -> set[str]:
            async with self._pool.connection() as conn:
                return await service.unknown_models(conn, list(tally.counts))

        missing = await self.policy.retry(unknown)
        if missing:
            for i, repo in service.downloads_of(values, missing).items():
                dead[i] = f"{MissingReference.__name__}: no model {repo!r}"
        for i in sorted(dead):
            if not (await self.policy.dead_letter(records[i], dead[i])).committable:
                raise Stopped
        await self._store([r for i, r in enumerate(records) if i not in dead], records)

    async def _store(self, counted: Sequence[ConsumerRecord], read: Sequence[ConsumerRecord]) -> None:
        """Add the downloads of `counted` and store the offsets past `read` (every record of the batch) in one
        transaction, retried while Postgres is away. If it fails for good, the batch is stored in halves, down
        to the one message that cannot be, which is dead-lettered."""
        counts = service.count_downloads([r.value for r in counted])
        offsets: dict[int, int] = {}
        for r in read:
            offsets[r.partition] = max(offsets.get(r.partition, 0), r.offset + 1)

        fenced: list[int] = []

        async def store() -> None:
            fenced.clear()
            try:
                async with self._pool.connection() as conn, conn.transaction():
                    await service.add_downloads(conn, counts)
                    for partition, next_offset in sorted(offsets.items()):
                        if partition not in self._stored or not await repository.advance_offset(
                            conn, DOWNLOADS_GROUP, self._topic, partition, self._stored[partition], next_offset
                        ):
                            raise _Fenced(partition)
            except _Fenced as exc:  # rolled back: nothing counted, nothing stored
                fenced.append(exc.args[0])

        try:
            await self.policy.retry(store)
        except Stopped:
            raise
        except Exception as exc:
            if not counted:
                raise  # only offsets: nothing to isolate (the supervisor restarts the loop)
            if len(counted) == 1:
                if not (await self.policy.dead_letter(counted[0], describe(exc))).committable:
                    raise Stopped from exc
                await self._store([], read)
                return
            log.warning("counting %s downloads failed for good (%s): counting halves apart", len(counted), exc)
            half = len(counted) // 2
            # Records of one partition are in offset order: each half stores the offsets it read past.
            first, second = counted[:half], counted[half:]
            await self._store(first, first)
            await self._store(second, read)
            return
        if fenced:
            # Another process counted these (a rebalance moved the partition): read on from where it stored.
            log.info("downloads of partition %s were stored by another consumer: reading from there", fenced[0])
            self._to_seek.update(p for p in offsets if p in self._stored)
        else:
            self._stored.update({p: o for p, o in offsets.items() if p in self._stored})
