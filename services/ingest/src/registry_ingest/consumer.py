"""Kafka plumbing: consume both topics in one group, one task per partition, commit after each message's effect.

Each message is handled to completion before its offset is committed (enable_auto_commit is off): a
message that leads to a verdict is committed once Kafka acknowledged the verdict (acks=all); one that
only adds a fact (the other half of the upload is not there yet) is committed once the fact is in
Postgres, from where any process's sweeper finishes the work. Partitions are processed concurrently, each
in order by its own lane (a queue and a task), so a long verification holds up only its own partition.
Undecodable messages go to the dead-letter topic with the error and the worker moves on.
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

#: A partition whose lane holds this many records is paused until it is back down to the low mark.
_BACKLOG_HIGH = 2000
_BACKLOG_LOW = 200
#: While records keep coming, a lane commits at least every this many records.
_COMMIT_EVERY = 200

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
            fetch_max_wait_ms=settings.fetch_max_wait_ms,
        )
        self._lanes: dict[TopicPartition, _Lane] = {}
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
        """Stop fetching, let messages in hand finish for up to `wait_seconds` s, cancel the rest, leave the group."""
        self._stopping.set()
        if self._loop_task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        for lane in self._lanes.values():
            lane.queue.put_nowait(None)  # wakes idle lanes; busy ones stop after the message in hand
        tasks = [lane.task for lane in self._lanes.values()]
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
        """Fetch continuously and hand records to their partition's lane.

        Fetching never waits for processing (a paused partition is only fetched again after the fetch in
        flight returns, which would add latency), except that a lane holding too many records pauses its
        partition until it has worked its backlog down.
        """
        while not self._stopping.is_set():
            try:
                batch = await self._consumer.getmany(timeout_ms=200, max_records=500)
            except KafkaError:
                log.exception("fetch failed")
                await asyncio.sleep(1)
                continue
            for tp, records in batch.items():
                lane = self._lanes.get(tp)
                if lane is None:
                    lane = self._lanes[tp] = _Lane(tp)
                    lane.task = asyncio.create_task(self._work_lane(lane), name=f"ingest-{tp.topic}-{tp.partition}")
                for record in records:
                    lane.queue.put_nowait(record)
                if lane.queue.qsize() >= _BACKLOG_HIGH and not lane.paused:
                    self._consumer.pause(tp)
                    lane.paused = True

    async def _work_lane(self, lane: _Lane) -> None:
        """Handle one partition's records in order; commit offsets only of records whose effect is durable.

        Commits are batched while records keep coming (a replay of MinIO's topic is mostly other keys),
        and always made as soon as the lane is idle, so a verdict's offset is committed right after it.
        """
        tp = lane.tp
        while not self._stopping.is_set():
            if lane.uncommitted is not None and (lane.queue.empty() or lane.since_commit >= _COMMIT_EVERY):
                if not await self._commit(lane):
                    return
            record = await lane.queue.get()
            if record is None:
                break
            await self._handle_with_retries(record)
            self.handled += 1
            lane.uncommitted = record.offset + 1
            lane.since_commit += 1
            if lane.paused and lane.queue.qsize() <= _BACKLOG_LOW and tp in self._consumer.assignment():
                self._consumer.resume(tp)
                lane.paused = False
        await self._commit(lane)

    async def _commit(self, lane: _Lane) -> bool:
        """Commit what the lane has handled; False if the partition is no longer ours."""
        if lane.uncommitted is None:
            return True
        try:
            await self._consumer.commit({lane.tp: OffsetAndMetadata(lane.uncommitted, "")})
        except (CommitFailedError, IllegalStateError):
            # The partition moved to another member, which resumes from the last commit (idempotently).
            log.warning("commit refused after rebalance", extra={"fields": {"tp": str(lane.tp)}})
            return False
        lane.uncommitted, lane.since_commit = None, 0
        return True

    async def drop_lanes(self, partitions: list[TopicPartition]) -> None:
        """Stop work on partitions taken away: commit what was handled, leave the rest to the new owner."""
        lanes = [self._lanes.pop(tp) for tp in partitions if tp in self._lanes]
        for lane in lanes:
            lane.task.cancel()
        await asyncio.gather(*(lane.task for lane in lanes), return_exceptions=True)
        for lane in lanes:
            with contextlib.suppress(KafkaError):
                await self._commit(lane)

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


class _Lane:
    """The records of one partition waiting to be handled, and the task handling them."""

    def __init__(self, tp: TopicPartition) -> None:
        self.tp = tp
        self.queue: asyncio.Queue[ConsumerRecord | None] = asyncio.Queue()
        self.paused = False
        self.uncommitted: int | None = None  # the offset to commit: one past the last record handled
        self.since_commit = 0
        self.task: asyncio.Task[None]


def _where(record: ConsumerRecord) -> dict[str, object]:
    return {"topic": record.topic, "partition": record.partition, "offset": record.offset}


class _Rebalance(ConsumerRebalanceListener):
    """Stops work on partitions taken away: the new owner redoes it from the last commit (idempotently)."""

    def __init__(self, owner: IngestConsumer) -> None:
        self.owner = owner

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self.owner.drop_lanes(list(revoked))
        if revoked:
            log.info("partitions revoked", extra={"fields": {"partitions": sorted(map(str, revoked))}})

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        log.info("partitions assigned", extra={"fields": {"partitions": sorted(map(str, assigned))}})
