"""Kafka plumbing: consume both topics in one group, one task per partition, commit after each message's effect.

Each message is handled to completion before its offset is committed (enable_auto_commit is off): a
message that leads to a verdict is committed once Kafka acknowledged the verdict (acks=all); one that
only adds a fact (the other half of the upload is not there yet) is committed once the fact is in
Postgres, from where any process's sweeper finishes the work. Partitions are processed concurrently and
each in order: a partition being worked on is paused, so a long verification holds up only its own
partition. Undecodable messages go to the dead-letter topic with the error and the worker moves on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import psycopg
import psycopg_pool
import urllib3.exceptions
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from aiokafka.structs import ConsumerRecord, OffsetAndMetadata
from minio.error import S3Error
from pydantic import ValidationError

from registry_ingest.notifications import BadNotification, message_key_outside, parse_notification
from registry_ingest.publisher import Publisher
from registry_ingest.service import IngestService, PoisonMessage
from registry_ingest.settings import IngestSettings
from registry_shared.events import decode_event
from registry_shared.logging import correlation_id

log = logging.getLogger(__name__)

#: Failures of the infrastructure: retried for as long as it takes, never dead-lettered.
TRANSIENT = (
    psycopg.OperationalError,
    psycopg_pool.PoolTimeout,
    KafkaError,
    S3Error,
    urllib3.exceptions.HTTPError,
    OSError,
    TimeoutError,
)


class IngestConsumer:
    """The consumer group member of one ingest process."""

    def __init__(
        self,
        settings: IngestSettings,
        bootstrap_servers: str,
        service: IngestService,
        publisher: Publisher,
        client_id: str,
    ) -> None:
        self.settings = settings
        self.service = service
        self.publisher = publisher
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap_servers,
            client_id=client_id,
            group_id=settings.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=15000,
            heartbeat_interval_ms=3000,
            max_poll_interval_ms=600000,
        )
        self._inflight: dict[TopicPartition, asyncio.Task[None]] = {}
        self._stopping = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self.handled = 0

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Join the group and start consuming."""
        self._consumer.subscribe([self.settings.uploads_topic, self.settings.minio_topic], listener=_Rebalance(self))
        await self._consumer.start()
        self._loop_task = asyncio.create_task(self._run(), name="ingest-consumer")

    async def stop(self, wait_seconds: float) -> None:
        """Stop fetching, let in-flight messages finish for up to `wait_seconds` s, cancel the rest, leave the group."""
        self._stopping.set()
        if self._loop_task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        tasks = list(self._inflight.values())
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=wait_seconds)
            for t in pending:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        await self._consumer.stop()

    def assignment(self) -> list[str]:
        """The partitions this member owns, as topic:partition."""
        return sorted(f"{tp.topic}:{tp.partition}" for tp in self._consumer.assignment())

    # ------------------------------------------------------------ the loop
    async def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                batch = await self._consumer.getmany(timeout_ms=200, max_records=500)
            except KafkaError:
                log.exception("fetch failed")
                await asyncio.sleep(1)
                continue
            for tp, records in batch.items():
                if not records:
                    continue
                self._consumer.pause(tp)
                previous = self._inflight.get(tp)
                self._inflight[tp] = asyncio.create_task(self._drain(tp, records, previous))

    async def _drain(
        self, tp: TopicPartition, records: list[ConsumerRecord], previous: asyncio.Task[None] | None
    ) -> None:
        me = asyncio.current_task()
        try:
            if previous is not None:
                await asyncio.gather(previous, return_exceptions=True)
            for record in records:
                await self._handle_with_retries(record)
                self.handled += 1
                try:
                    await self._consumer.commit({tp: OffsetAndMetadata(record.offset + 1, "")})
                except (CommitFailedError, IllegalStateError):
                    # The partition moved to another member, which resumes from the last commit (idempotently).
                    log.warning("commit refused after rebalance", extra={"fields": {"tp": str(tp)}})
                    return
        finally:
            if self._inflight.get(tp) is me:
                del self._inflight[tp]
                if tp in self._consumer.assignment() and not self._stopping.is_set():
                    self._consumer.resume(tp)

    async def _handle_with_retries(self, record: ConsumerRecord) -> None:
        failures = 0
        while True:
            try:
                await self._handle(record)
                return
            except PoisonMessage as exc:
                await self._dead_letter(record, str(exc))
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                if not isinstance(exc, TRANSIENT) and failures >= self.settings.max_attempts:
                    log.exception("giving up on message", extra={"fields": _where(record)})
                    await self._dead_letter(record, f"failed {failures} times: {type(exc).__name__}: {exc}")
                    return
                log.exception("message failed; retrying", extra={"fields": {**_where(record), "failures": failures}})
                await asyncio.sleep(min(30.0, 0.25 * 2**failures))
            finally:
                correlation_id.set(None)

    async def _handle(self, record: ConsumerRecord) -> None:
        if record.topic == self.settings.uploads_topic:
            if record.value is None:
                raise PoisonMessage("empty message")
            try:
                event = decode_event(record.value)
                payload = event.payload()
            except (ValidationError, ValueError) as exc:
                raise PoisonMessage(f"undecodable upload event: {exc}") from None
            correlation_id.set(event.id)
            await self.service.on_upload_event(event, payload)
        elif record.topic == self.settings.minio_topic:
            if message_key_outside(record.key, self.service.bucket.name, self.settings.upload_prefix):
                return
            if record.value is None:
                raise PoisonMessage("empty message")
            try:
                notifications = parse_notification(record.value)
            except BadNotification as exc:
                raise PoisonMessage(f"undecodable MinIO notification: {exc}") from None
            for n in notifications:
                correlation_id.set(n.correlation_id)
                await self.service.on_notification(n)

    async def _dead_letter(self, record: ConsumerRecord, error: str) -> None:
        log.error("dead-lettering message: %s", error, extra={"fields": _where(record)})
        failures = 0
        while True:
            try:
                await self.publisher.dead_letter(self.settings.dead_letter_topic, record, error, self.settings.group_id)
                return
            except KafkaError:
                failures += 1
                log.exception("dead-letter publish failed; retrying")
                await asyncio.sleep(min(30.0, 0.25 * 2**failures))


def _where(record: ConsumerRecord) -> dict[str, object]:
    return {"topic": record.topic, "partition": record.partition, "offset": record.offset}


class _Rebalance(ConsumerRebalanceListener):
    """Stops work on partitions taken away: the new owner redoes it from the last commit (idempotently)."""

    def __init__(self, owner: IngestConsumer) -> None:
        self.owner = owner

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        tasks = [self.owner._inflight.pop(tp) for tp in revoked if tp in self.owner._inflight]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if revoked:
            log.info("partitions revoked", extra={"fields": {"partitions": sorted(map(str, revoked))}})

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        log.info("partitions assigned", extra={"fields": {"partitions": sorted(map(str, assigned))}})
