"""The transactional outbox: events are written with the change they describe, then relayed to Kafka.

- `write_event(conn, data)` inserts into `outbox` inside the caller's transaction.
- `AccessRecorder` buffers access events (one per counted read) and writes them in batches every few
  milliseconds with COPY, so a download costs no extra round trip; a graceful stop flushes the buffer.
  While Postgres is away the buffer keeps the events (downloads answered from the caches go on being
  counted) and is written once the database monitor sees Postgres back. It is bounded: at
  `ACCESS_BUFFER_MAX` events, `record` refuses with `AccessBufferFull` (503 with Retry-After), so a read
  is never served uncounted and memory does not grow without end. A stop that cannot write what is left
  (Postgres still away after STOP_GRACE_S) logs how many events are lost, as an error.
- `OutboxRelay` publishes the rows in id order (acks=all, idempotent producer), then deletes them: the
  table holds only what is still to be published, and Kafka is the log of what was.
  Only one relay publishes at a time across api processes (advisory lock), so per-key order holds.
  Kafka being down never fails a request: rows wait in Postgres and flow once it is back. Postgres going
  away between Kafka's ack and the delete does not publish them twice: the relay deletes them first when
  it reconnects (a second api process taking the relay over meanwhile would).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import orjson
import psycopg
from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner
from psycopg.rows import tuple_row
from psycopg_pool import AsyncConnectionPool

from registry_api.errors import Unavailable
from registry_api.kit.db_monitor import DatabaseMonitor
from registry_shared import tracing
from registry_shared.background import BackgroundTask
from registry_shared.backoff import Backoff, sleep_or_stop
from registry_shared.consumer_policy import describe
from registry_shared.events import EventData, FileAccessed, encode_event, make_event
from registry_shared.metrics import DOWNLOADS, OUTBOX_DEPTH, OUTBOX_OLDEST_AGE, OUTBOX_PUBLISHED

log = logging.getLogger(__name__)
SOURCE = "/registry/api"
_RELAY_LOCK_ID = 0x6F7574626F78  # "outbox"
#: How long a drained relay waits before looking again, unless this process's own writes wake it first (those
#: of other api processes do not). Short, so it publishes a steady trickle instead of seconds-long bursts.
_POLL_S = 0.1
#: Rows written by one COPY: a buffer that grew during an outage is written in steps, each committed.
FLUSH_CHUNK = 10_000
#: How long a stop keeps trying to write what is buffered.
STOP_GRACE_S = 5.0
#: The relay is reported not ready when Kafka has not acknowledged a batch for this long.
STALLED_S = 5.0
#: What `Retry-After` says when the access-event buffer is full.
FULL_RETRY_AFTER_S = 2


class AccessBufferFull(Unavailable):
    """The access-event buffer is full (Postgres away for long): the read is refused, not served uncounted."""

    retry_after = FULL_RETRY_AFTER_S

    def __init__(self) -> None:
        super().__init__("access log unavailable")


def _row(data: EventData, subject: str | None) -> tuple[uuid.UUID, str, str | None, bytes]:
    event = make_event(data, source=SOURCE, subject=subject)
    return uuid.UUID(event.id), data.topic, event.subject, encode_event(event)


async def write_event(conn: psycopg.AsyncConnection, data: EventData, subject: str | None = None) -> None:
    """Record `data` as a CloudEvent in the outbox, in the caller's transaction."""
    await conn.execute(
        "insert into outbox (event_id, topic, key, payload) values (%s, %s, %s, %s)", _row(data, subject)
    )


class AccessRecorder(BackgroundTask):
    """Buffers FileAccessed events and writes them to the outbox in batches (bounded; see the module doc)."""

    name = "access-recorder"
    retry_backoff = Backoff(initial=0.1, factor=2.0, cap=2.0)

    def __init__(
        self,
        pool: AsyncConnectionPool,
        flush_ms: int,
        on_flush: asyncio.Event,
        max_buffered: int = 100_000,
        monitor: DatabaseMonitor | None = None,
    ) -> None:
        self._pool = pool
        self._interval = flush_ms / 1000
        self._buffer: list[tuple[uuid.UUID, str, str | None, bytes]] = []
        self._on_flush = on_flush
        self.max_buffered = max_buffered
        self._monitor = monitor
        self._wake = asyncio.Event()
        if monitor is not None:
            monitor.on_up(self._wake.set)
        self.written = 0
        self.refused = 0
        self.last_error: str | None = None

    @property
    def buffered(self) -> int:
        """Events waiting to be written."""
        return len(self._buffer)

    def _full(self) -> AccessBufferFull:
        self.refused += 1
        return AccessBufferFull()

    def record(self, event: FileAccessed) -> None:
        """Queue one access event (non-blocking); AccessBufferFull when the buffer is full."""
        if len(self._buffer) >= self.max_buffered:
            raise self._full()
        self._buffer.append(_row(event, event.repo_id or f"user:{event.user_id}"))

    def record_download(self, user_id: int, repo_id: str, version: str | None, rfilename: str, size: int) -> None:
        """Queue a download's access event: the same CloudEvent as `record`, built without pydantic
        because it runs on every download (test_outbox_access checks both produce the same event).
        AccessBufferFull when the buffer is full."""
        if len(self._buffer) >= self.max_buffered:
            raise self._full()
        DOWNLOADS.inc()
        event_id = uuid.uuid4()
        now = time.time()
        doc = {
            "specversion": "1.0",
            "id": str(event_id),
            "source": SOURCE,
            "type": FileAccessed.event_type,
            "time": datetime.fromtimestamp(now, UTC).isoformat().replace("+00:00", "Z"),
            "subject": repo_id,
            "datacontenttype": "application/json",
            "data": {
                "user_id": user_id,
                "kind": "download",
                "repo_id": repo_id,
                "version": version,
                "rfilename": rfilename,
                "bytes": size,
                "ts": now,
            },
        }
        self._buffer.append((event_id, FileAccessed.topic, repo_id, orjson.dumps(doc)))

    async def flush(self) -> int:
        """Write what is buffered, FLUSH_CHUNK rows per COPY; what could not be written stays buffered
        (in order, ahead of newer events) and the error is raised."""
        written = 0
        try:
            while self._buffer:
                batch, self._buffer = self._buffer[:FLUSH_CHUNK], self._buffer[FLUSH_CHUNK:]
                try:
                    async with self._pool.connection() as conn, conn.cursor() as cur:
                        async with cur.copy("copy outbox (event_id, topic, key, payload) from stdin") as copy:
                            for row in batch:
                                await copy.write_row(row)
                except BaseException:
                    self._buffer[:0] = batch
                    raise
                written += len(batch)
                self.written += len(batch)
        finally:
            if written:
                self._on_flush.set()
        return written

    async def run(self) -> None:
        """Flush every interval until cancelled. While the database is known to be away, wait for it
        (the monitor wakes this loop when it is back); on a failed flush, back off and retry."""
        failures = 0
        while True:
            if failures:
                await self.retry_backoff.sleep(failures, self._wake)
            else:
                await asyncio.sleep(self._interval)
            if not self._buffer:
                continue
            if self._monitor is not None and self._monitor.down:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=1.0)
                continue
            try:
                await self.flush()
            except Exception as exc:  # Postgres away: the events stay buffered and are written once it is back
                failures += 1
                self.last_error = describe(exc)
                self._wake.clear()
                if self.health is not None:
                    self.health.retrying(f"{len(self._buffer)} events waiting: {self.last_error}")
                if failures == 1 or failures % 20 == 0:
                    log.warning("access events not written yet (%d buffered): %s", len(self._buffer), exc)
                if self._monitor is not None and isinstance(exc, psycopg.OperationalError):
                    self._monitor.suspect(exc)
            else:
                if failures:
                    log.info("access events written again after %d failed attempts", failures)
                failures = 0
                self.last_error = None
                if self.health is not None:
                    self.health.ok()

    def as_dict(self) -> dict[str, object]:
        """The buffer as /readyz shows it."""
        return {
            "ok": len(self._buffer) < self.max_buffered,
            "buffered": len(self._buffer),
            "max_buffered": self.max_buffered,
            "written": self.written,
            "refused": self.refused,
            "last_error": self.last_error,
        }

    async def stop(self) -> None:
        """Stop the timer, then write what is still buffered (trying for STOP_GRACE_S); what cannot be
        written is logged as lost."""
        await super().stop()
        deadline = time.monotonic() + STOP_GRACE_S
        attempt = 0
        while self._buffer:
            try:
                await self.flush()
            except Exception as exc:
                attempt += 1
                if time.monotonic() + self.retry_backoff.base(attempt) > deadline:
                    log.error(
                        "%d access events lost at shutdown: not written within %.0f s: %s",
                        len(self._buffer),
                        STOP_GRACE_S,
                        describe(exc),
                    )
                    return
                await sleep_or_stop(self.retry_backoff.delay(attempt))


class OutboxRelay(BackgroundTask):
    """Publishes outbox rows to Kafka, at least once, in order."""

    name = "outbox-relay"
    retry_backoff = Backoff(initial=0.2, factor=2.0, cap=5.0)

    def __init__(self, database_url: str, bootstrap: str, wakeup: asyncio.Event, batch: int = 1000) -> None:
        self._database_url = database_url
        self._bootstrap = bootstrap
        self._wakeup = wakeup
        self._batch = batch
        self._partitioner = DefaultPartitioner()
        self._placement: dict[tuple[str, str | None], tuple[str, int]] = {}  # (topic, key) → partition
        self._published_ids: list[int] = []  # acknowledged by Kafka, not yet deleted from the outbox
        self._waiting_since: float | None = None  # a batch sent, Kafka's acknowledgement awaited since
        self.published = 0

    async def _publish_pending(self, conn: psycopg.AsyncConnection, producer: AIOKafkaProducer) -> int:
        cur = await conn.execute(
            "select id, topic, key, payload from outbox order by id limit %s",
            [self._batch],
        )
        rows = await cur.fetchall()
        if not rows:
            return 0
        futures = []
        with tracing.producing("outbox publish", **{"messaging.batch.message_count": len(rows)}):
            for i in range(0, len(rows), 250):  # give requests a turn between chunks
                futures += await self._send(producer, rows[i : i + 250])
                await asyncio.sleep(0)
            self._waiting_since = time.monotonic()
            try:
                await asyncio.gather(*futures)
            finally:
                self._waiting_since = None
        self._published_ids = [r[0] for r in rows]
        await self._forget_published(conn)
        self.published += len(rows)
        OUTBOX_PUBLISHED.inc(len(rows))
        return len(rows)

    def as_dict(self) -> dict[str, object]:
        """The relay as /readyz shows it: not ok while Kafka has not acknowledged a batch for STALLED_S (the
        producer keeps retrying it: nothing is lost, but nothing new reaches Kafka either)."""
        waiting = self._waiting_since
        if waiting is not None and (stalled := time.monotonic() - waiting) >= STALLED_S:
            return {
                "ok": False,
                "status": "stalled",
                "reason": f"Kafka has not acknowledged a batch for {stalled:.0f} s",
                "published": self.published,
            }
        return {"published": self.published}

    async def _forget_published(self, conn: psycopg.AsyncConnection) -> None:
        """Delete the rows Kafka has acknowledged. Kept in memory until the delete succeeds: when Postgres
        went away between Kafka's ack and the delete, the next connection deletes them before publishing
        anything, instead of publishing them twice."""
        if self._published_ids:
            await conn.execute("delete from outbox where id = any(%s)", [self._published_ids])
            self._published_ids = []

    async def _send(self, producer: AIOKafkaProducer, rows: list[tuple]) -> list[asyncio.Future]:
        """Queue `rows` as record batches, one per partition (the key picks it, as `send` would);
        each partition's rows keep their outbox order. Returns the batches' delivery futures."""
        batches: dict[tuple[str, int], object] = {}
        futures = []
        for _, topic, key, payload in rows:
            key_bytes = key.encode() if key else None
            tp = self._placement.get((topic, key))
            if tp is None:
                partitions = sorted(await producer.partitions_for(topic))
                tp = (topic, self._partitioner(key_bytes, partitions, partitions))
                if key_bytes is not None and len(self._placement) < 100_000:
                    self._placement[(topic, key)] = tp
            batch = batches.get(tp)
            if batch is None:
                batch = batches[tp] = producer.create_batch()
            if batch.append(key=key_bytes, value=bytes(payload), timestamp=None) is None:  # full: ship it
                futures.append(await producer.send_batch(batches.pop(tp), tp[0], partition=tp[1]))
                batch = batches[tp] = producer.create_batch()
                batch.append(key=key_bytes, value=bytes(payload), timestamp=None)
        for (topic, partition), batch in batches.items():
            futures.append(await producer.send_batch(batch, topic, partition=partition))
        return futures

    async def run(self) -> None:
        """Relay until cancelled; survives Kafka and Postgres outages (retrying with bounded backoff, and
        saying so in its health: /readyz reports the relay as not ready meanwhile)."""
        failures = 0
        while True:
            producer: AIOKafkaProducer | None = None
            try:
                async with await psycopg.AsyncConnection.connect(
                    self._database_url, autocommit=True, connect_timeout=2
                ) as conn:
                    while not (
                        await (await conn.execute("select pg_try_advisory_lock(%s)", [_RELAY_LOCK_ID])).fetchone()
                    )[0]:
                        if self.health is not None:
                            self.health.ok()  # another api process relays: nothing wrong here
                        await asyncio.sleep(1.0)
                    await self._forget_published(conn)
                    producer = AIOKafkaProducer(
                        bootstrap_servers=self._bootstrap,
                        acks="all",
                        enable_idempotence=True,
                        linger_ms=2,
                        max_batch_size=512 * 1024,
                        request_timeout_ms=10_000,
                    )
                    await producer.start()
                    self._placement.clear()
                    while True:
                        n = await self._publish_pending(conn, producer)
                        if failures or (self.health is not None and self.health.state != "ok"):
                            failures = 0
                            if self.health is not None:
                                self.health.ok()
                        if n < self._batch:
                            self._wakeup.clear()
                            with contextlib.suppress(TimeoutError):
                                await asyncio.wait_for(self._wakeup.wait(), timeout=_POLL_S)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Kafka or Postgres away: back off and retry
                failures += 1
                if self.health is not None:
                    self.health.retrying(describe(exc))
                log.warning("outbox relay paused: %s", exc)
                await asyncio.sleep(self.retry_backoff.delay(failures))
            finally:
                if producer is not None:
                    with contextlib.suppress(Exception):
                        await producer.stop()


def outbox_gauges(pool: AsyncConnectionPool) -> Callable[[], Awaitable[None]]:
    """A metrics refresher (registry_shared.metrics): the outbox's depth and the age of its oldest row."""

    async def refresh() -> None:
        async with pool.connection() as conn, conn.cursor(row_factory=tuple_row) as cur:
            await cur.execute(
                "select count(*), coalesce(extract(epoch from clock_timestamp() - min(created_at)), 0) from outbox"
            )
            depth, age = await cur.fetchone()  # type: ignore[misc]
        OUTBOX_DEPTH.set(depth)
        OUTBOX_OLDEST_AGE.set(max(0.0, float(age)))

    return refresh
