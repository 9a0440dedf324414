"""The transactional outbox: events are written with the change they describe, then relayed to Kafka.

- `write_event(conn, data)` inserts into `outbox` inside the caller's transaction.
- `AccessRecorder` buffers access events (one per counted read) and writes them in batches every few
  milliseconds with COPY, so a download costs no extra round trip; a graceful stop flushes the buffer.
- `OutboxRelay` publishes the rows in id order (acks=all, idempotent producer), then deletes them: the
  table holds only what is still to be published, and Kafka is the log of what was.
  Only one relay publishes at a time across api processes (advisory lock), so per-key order holds.
  Kafka being down never fails a request: rows wait in Postgres and flow once it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from datetime import UTC, datetime

import orjson
import psycopg
from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner
from psycopg_pool import AsyncConnectionPool

from registry_shared.background import BackgroundTask
from registry_shared.events import EventData, FileAccessed, encode_event, make_event

log = logging.getLogger(__name__)
SOURCE = "/registry/api"
_RELAY_LOCK_ID = 0x6F7574626F78  # "outbox"
#: How long a drained relay waits before looking again, unless this process's own writes wake it first (those
#: of other api processes do not). Short, so it publishes a steady trickle instead of seconds-long bursts.
_POLL_S = 0.1


def _row(data: EventData, subject: str | None) -> tuple[uuid.UUID, str, str | None, bytes]:
    event = make_event(data, source=SOURCE, subject=subject)
    return uuid.UUID(event.id), data.topic, event.subject, encode_event(event)


async def write_event(conn: psycopg.AsyncConnection, data: EventData, subject: str | None = None) -> None:
    """Record `data` as a CloudEvent in the outbox, in the caller's transaction."""
    await conn.execute(
        "insert into outbox (event_id, topic, key, payload) values (%s, %s, %s, %s)", _row(data, subject)
    )


class AccessRecorder(BackgroundTask):
    """Buffers FileAccessed events and writes them to the outbox in batches."""

    name = "access-recorder"

    def __init__(self, pool: AsyncConnectionPool, flush_ms: int, on_flush: asyncio.Event) -> None:
        self._pool = pool
        self._interval = flush_ms / 1000
        self._buffer: list[tuple[uuid.UUID, str, str | None, bytes]] = []
        self._on_flush = on_flush

    def record(self, event: FileAccessed) -> None:
        """Queue one access event (non-blocking)."""
        self._buffer.append(_row(event, event.repo_id or f"user:{event.user_id}"))

    def record_download(self, user_id: int, repo_id: str, version: str | None, rfilename: str, size: int) -> None:
        """Queue a download's access event: the same CloudEvent as `record`, built without pydantic
        because it runs on every download (test_outbox_access checks both produce the same event)."""
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
        """Write what is buffered; keeps it on failure to retry."""
        if not self._buffer:
            return 0
        batch, self._buffer = self._buffer, []
        try:
            async with self._pool.connection() as conn, conn.cursor() as cur:
                async with cur.copy("copy outbox (event_id, topic, key, payload) from stdin") as copy:
                    for row in batch:
                        await copy.write_row(row)
        except Exception:
            self._buffer[:0] = batch
            raise
        self._on_flush.set()
        return len(batch)

    async def run(self) -> None:
        """Flush every interval until cancelled."""
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.flush()
            except Exception as exc:  # database briefly down: keep the buffer, try again
                log.warning("access events not flushed yet: %s", exc)
                await asyncio.sleep(0.5)

    async def stop(self) -> None:
        """Stop the timer, then write what is still buffered."""
        await super().stop()
        with contextlib.suppress(Exception):
            await self.flush()


class OutboxRelay(BackgroundTask):
    """Publishes outbox rows to Kafka, at least once, in order."""

    name = "outbox-relay"

    def __init__(self, database_url: str, bootstrap: str, wakeup: asyncio.Event, batch: int = 1000) -> None:
        self._database_url = database_url
        self._bootstrap = bootstrap
        self._wakeup = wakeup
        self._batch = batch
        self._partitioner = DefaultPartitioner()
        self._placement: dict[tuple[str, str | None], tuple[str, int]] = {}  # (topic, key) → partition
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
        for i in range(0, len(rows), 250):  # give requests a turn between chunks
            futures += await self._send(producer, rows[i : i + 250])
            await asyncio.sleep(0)
        await asyncio.gather(*futures)
        await conn.execute("delete from outbox where id = any(%s)", [[r[0] for r in rows]])
        self.published += len(rows)
        return len(rows)

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
        """Relay until cancelled; survives Kafka and Postgres outages."""
        backoff = 0.2
        while True:
            producer: AIOKafkaProducer | None = None
            try:
                async with await psycopg.AsyncConnection.connect(self._database_url, autocommit=True) as conn:
                    while not (
                        await (await conn.execute("select pg_try_advisory_lock(%s)", [_RELAY_LOCK_ID])).fetchone()
                    )[0]:
                        await asyncio.sleep(1.0)  # another api process relays
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
                    backoff = 0.2
                    while True:
                        n = await self._publish_pending(conn, producer)
                        if n < self._batch:
                            self._wakeup.clear()
                            with contextlib.suppress(TimeoutError):
                                await asyncio.wait_for(self._wakeup.wait(), timeout=_POLL_S)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Kafka or Postgres away: back off and retry
                log.warning("outbox relay paused: %s", exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                if producer is not None:
                    with contextlib.suppress(Exception):
                        await producer.stop()
