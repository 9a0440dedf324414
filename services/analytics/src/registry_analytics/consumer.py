"""The batch loader: access and user events from Kafka into the analytics store, each exactly once.

A FastStream app: a `KafkaBroker` with one batch subscriber on the access and users topics, whose offsets
FastStream never commits (`AckPolicy.MANUAL`); the loader commits them once a batch is stored.

No message is parsed by Python on the way: the raw values go to the ClickHouse engine, which parses, checks
and deduplicates them (store.STAGE_SELECT); Python decodes only what the engine refuses.

How a batch becomes exactly-once:

1. Records are collected per partition (up to `batch_max_events`, or `flush_interval_ms` after the first).
2. Their values are staged in (topic, partition, offset) order, row n = the n-th message, in the group's
   Memory table; the engine parses each as a CloudEvent. The rows it refuses are decoded here (user events,
   unusual encodings of valid events, which are staged as rows, and invalid messages: dead-lettered).
3. The engine finds the staged rows whose event id the store already holds (in the hours of the batch's ts:
   a duplicate carries the ts of the event it repeats).
4. A manifest (offset ranges, the offsets of those rows, the row count and a new insert token) is written to
   `ingest_batches` before the rows.
5. The staged rows go into access_events as one INSERT ... SELECT block with that
   `insert_deduplication_token`: the first copy of each event id, without the rows of step 3; the rollups'
   materialized views follow with deduplication too.
6. Only then are the Kafka offsets committed.

After a crash (even SIGKILL half-way through an insert), the last manifest is replayed before the broker
starts: the same messages staged again minus the manifest's offsets give the same block under the same
token, so ClickHouse drops every part the interrupted attempt had committed and writes only the missing
ones. A batch whose offsets were committed is not replayed; redelivered messages of any other batch are
found by the store look-up (step 3).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, get_args

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from faststream import AckPolicy
from faststream.kafka import KafkaBroker
from faststream.kafka.message import KafkaMessage
from orjson import loads as _json_loads

from registry_analytics.queries import ClosedPeriods
from registry_analytics.settings import AnalyticsSettings
from registry_analytics.store import Manifest, Store, stage_name
from registry_shared.events import AccessKind, FileAccessed, UserRegistered, decode_event
from registry_shared.kafka import raw_batch
from registry_shared.logging import correlation_id
from registry_shared.settings import KafkaSettings

log = logging.getLogger(__name__)

ACCESS_TYPE = FileAccessed.event_type
USER_TYPE = UserRegistered.event_type
_KINDS = frozenset(get_args(AccessKind))
_ACCESS_KEYS = frozenset(FileAccessed.model_fields)
_OPT_STR = (str, type(None))


class InvalidEvent(ValueError):
    """A message that is not a valid CloudEvent of a type the loader reads."""


# ---------------------------------------------------------------- decoding (the messages the engine refuses)
#: An access event as a row: (event_id, ts in ms, user_id, kind, repo_id, version, rfilename, bytes).
AccessRow = tuple[str, int, int, str, str, str, str, int]
UserRow = tuple[int, str, str, str, int]  # user_id, email, name, role, updated_at_ms
_MAX_INT = 2**63


def decode_message(value: bytes | None) -> tuple[str, AccessRow | UserRow | None]:
    """Decode one Kafka message value: ("access", row), ("user", row) or ("other", None).

    The loader calls this only for the messages the engine's own parse (store.STAGE_SELECT) refused. A
    well-formed registry.file.accessed.v1 event takes a fast path of plain type checks (the same checks the
    engine makes); anything else goes through the shared pydantic models, which have the last word. Raises
    InvalidEvent for anything that is not a valid CloudEvent.
    """
    try:
        doc = _json_loads(value)  # type: ignore[arg-type]
    except Exception as exc:
        raise InvalidEvent(f"not JSON: {exc}") from exc
    if type(doc) is dict and doc.get("type") == ACCESS_TYPE and doc.get("specversion") == "1.0":
        data, eid = doc.get("data"), doc.get("id")
        if (
            type(data) is dict
            and type(eid) is str
            and eid
            and type(doc.get("source")) is str
            and doc.get("datacontenttype", "application/json") == "application/json"
            and data.keys() <= _ACCESS_KEYS
        ):
            uid, kind, ts, nbytes = data.get("user_id"), data.get("kind"), data.get("ts"), data.get("bytes", 0)
            repo, version, rfilename = data.get("repo_id"), data.get("version"), data.get("rfilename")
            if (
                type(uid) is int
                and 0 <= uid < _MAX_INT
                and kind in _KINDS
                and type(ts) in (float, int)
                and 0 <= ts < 1e11
                and type(nbytes) is int
                and 0 <= nbytes < _MAX_INT
                and type(repo) in _OPT_STR
                and type(version) in _OPT_STR
                and type(rfilename) in _OPT_STR
            ):
                row = (eid, math.floor(ts * 1000), uid, kind, repo or "", version or "", rfilename or "", nbytes)
                return "access", row
    return _decode_slow(value)


def _decode_slow(value: bytes | None) -> tuple[str, AccessRow | UserRow | None]:
    try:
        event = decode_event(value)  # type: ignore[arg-type]
        if event.type not in (ACCESS_TYPE, USER_TYPE):
            return "other", None
        payload = event.payload()
    except (ValueError, TypeError) as exc:  # pydantic.ValidationError is a ValueError
        raise InvalidEvent(str(exc).splitlines()[0]) from exc
    if isinstance(payload, FileAccessed):
        if not (0 <= payload.user_id < _MAX_INT and 0 <= payload.bytes < _MAX_INT and 0 <= payload.ts < 1e11):
            raise InvalidEvent("user_id, bytes and ts must be non-negative and in range")
        p = payload
        row = (
            event.id,
            math.floor(p.ts * 1000),
            p.user_id,
            p.kind,
            p.repo_id or "",
            p.version or "",
            p.rfilename or "",
        )
        return "access", (*row, p.bytes)
    if isinstance(payload, UserRegistered):
        if not 0 <= payload.user_id < _MAX_INT:
            raise InvalidEvent("user_id out of range")
        updated = math.floor(event.time.timestamp() * 1000)
        return "user", (payload.user_id, payload.email, payload.name, payload.role, updated)
    return "other", None


# ---------------------------------------------------------------- batches
def _partition_of(record: ConsumerRecord) -> tuple[str, int]:
    return record.topic, record.partition


@dataclass
class RawBatch:
    """The records collected for one flush, per partition (each partition's in offset order)."""

    parts: dict[tuple[str, int], list[ConsumerRecord]] = field(default_factory=dict)
    count: int = 0
    started: float = 0.0

    def add(self, records: Sequence[ConsumerRecord]) -> None:
        """Append fetched records (of any partitions; those of one partition in offset order)."""
        if not records:
            return
        if not self.count:
            self.started = time.monotonic()
        parts = self.parts
        for key, recs in itertools.groupby(records, key=_partition_of):
            part = parts.get(key)
            if part is None:
                parts[key] = list(recs)
            else:
                part.extend(recs)
        self.count += len(records)

    def records(self) -> list[ConsumerRecord]:
        """Every record in (topic, partition, offset) order: the batch's rows, whatever the arrival order."""
        return [r for key in sorted(self.parts) for r in self.parts[key]]

    def ranges(self) -> list[list[Any]]:
        """[[topic, partition, first_offset, last_offset], ...] sorted."""
        return [[t, p, recs[0].offset, recs[-1].offset] for (t, p), recs in sorted(self.parts.items())]


@dataclass
class _Staged:
    """A batch parsed into a staging table, and what Python made of the messages the engine refused."""

    raw: RawBatch
    stage: str
    records: list[ConsumerRecord]
    refused: int
    users: list[UserRow] = field(default_factory=list)
    invalid: list[tuple[str, int, int, bytes, str]] = field(default_factory=list)
    prepare_ms: float = 0.0
    stage_ms: float = 0.0


def new_token() -> str:
    """The insert deduplication token of a new batch (kept in its manifest, reused by its replays)."""
    return f"access-{uuid.uuid4().hex}"


# ---------------------------------------------------------------- the loader
def _decode_records(msg: KafkaMessage) -> tuple[ConsumerRecord, ...]:
    """FastStream decoder: the handler gets the ConsumerRecords themselves (values stay bytes)."""
    return msg.raw_message  # type: ignore[return-value]


class _Assigned(ConsumerRebalanceListener):
    def __init__(self, event: asyncio.Event) -> None:
        self.event = event

    async def on_partitions_revoked(self, revoked: Any) -> None:
        pass

    async def on_partitions_assigned(self, assigned: Any) -> None:
        if assigned:
            self.event.set()


class AccessLoader:
    """Consumes the access and users topics through FastStream and stores them in batches, exactly once.

    A FastStream `KafkaBroker` with one batch subscriber on both topics (`AckPolicy.MANUAL`: nothing is
    committed by FastStream). Fetched batches are appended to the batch being collected; a collected batch
    is stored in a worker thread while the subscriber keeps fetching, and its offsets are committed once
    it is stored (one batch in flight, commits in order).
    """

    def __init__(
        self,
        store: Store,
        settings: AnalyticsSettings,
        kafka: KafkaSettings | None = None,
        closed_periods: ClosedPeriods | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.closed_periods = closed_periods  # told when a batch holds late events (before the current hour)
        self.kafka = kafka or KafkaSettings()
        s = settings
        self._assigned = asyncio.Event()
        self.broker = KafkaBroker(
            self.kafka.kafka_bootstrap_servers,
            client_id=f"{self.kafka.kafka_client_id}-analytics",
            apply_types=False,
            logger=log,
            log_level=logging.DEBUG,  # FastStream's per-batch Received/Processed lines
            graceful_timeout=60,
        )
        self.subscriber = self.broker.subscriber(
            s.access_topic,
            s.users_topic,
            batch=True,
            max_records=s.batch_max_events,
            # Short: the loader collects its own batches (flush_interval_ms); FastStream sleeps this long again
            # after a poll that found nothing, which would add to an idle stream's freshness.
            batch_timeout_ms=50,
            group_id=s.group_id,
            group_instance_id=s.group_instance_id or None,
            ack_policy=AckPolicy.MANUAL,
            auto_offset_reset="earliest",
            session_timeout_ms=s.session_timeout_ms,
            heartbeat_interval_ms=max(500, s.session_timeout_ms // 4),
            fetch_max_bytes=s.fetch_max_bytes,
            max_partition_fetch_bytes=s.max_partition_fetch_bytes,
            fetch_max_wait_ms=min(s.flush_interval_ms, 500),
            max_poll_records=s.batch_max_events,
            listener=_Assigned(self._assigned),
            parser=raw_batch,
            decoder=_decode_records,
        )
        self.subscriber(self._on_records)
        self._task: asyncio.Task | None = None
        self._ticker: asyncio.Task | None = None
        self._seq = 0
        self._pending = RawBatch()
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._flushing: asyncio.Task | None = None  # the batch dispatched last
        self._older: asyncio.Task | None = None  # the batch dispatched before it
        self._dispatched = 0
        self._seq_written: Manifest | None = None
        self._stopping = False
        #: Two staging tables: a batch is parsed into one while the one before is deduplicated and inserted.
        self.stages = (stage_name(settings.group_id) + "_0", stage_name(settings.group_id) + "_1")
        self.stats: dict[str, int | str] = {
            "batches": 0,
            "stored": 0,
            "duplicates": 0,
            "invalid": 0,
            "replayed": 0,
            "phase": "starting",
        }
        self.ready = asyncio.Event()

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Replay an interrupted batch, then start the broker, in the background (returns at once)."""
        self._task = asyncio.create_task(self._start(), name="access-loader")

    async def _start(self) -> None:
        delay = 1.0
        while True:
            try:
                for stage in self.stages:
                    await asyncio.to_thread(self.store.create_stage, stage)
                manifest = await asyncio.to_thread(self.store.last_manifest, self.settings.group_id)
                self._seq = manifest.seq if manifest else 0
                if manifest:
                    await self._replay(manifest)
                break
            except Exception:
                log.exception("loader start-up failed; retrying in %.0f s", delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10)
        self._ticker = asyncio.create_task(self._tick(), name="access-loader-flush")
        await self.broker.start()
        await self._assigned.wait()
        self.stats["phase"] = "idle"
        self.ready.set()

    async def stop(self) -> None:
        """Stop consuming: a batch being stored is finished and committed, a collected one is dropped (re-read)."""
        self._stopping = True
        self.ready.clear()
        for task in (self._task, self._ticker):
            if task is not None and not task.done():
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        for task in (self._older, self._flushing):
            if task is not None:
                try:
                    await asyncio.shield(task)
                except Exception:
                    log.exception("the last batches failed")
        await self.broker.stop()

    # ------------------------------------------------------------ replay after a crash
    async def _replay(self, manifest: Manifest) -> None:
        """Store the last manifest's batch again if its offsets were never committed.

        Runs before the broker starts, with a consumer of the same group that only reads (manual assignment,
        no group membership, no commit): the subscriber then re-reads those messages from the committed
        offsets and drops them as duplicates (the store holds them), committing past them.
        """
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.kafka.kafka_bootstrap_servers,
            client_id=f"{self.kafka.kafka_client_id}-analytics-replay",
            group_id=self.settings.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_bytes=self.settings.fetch_max_bytes,
            max_partition_fetch_bytes=self.settings.max_partition_fetch_bytes,
        )
        await consumer.start()
        try:
            targets: dict[TopicPartition, tuple[int, int]] = {}
            for topic, part, first, last in manifest.ranges:
                tp = TopicPartition(topic, part)
                committed = await consumer.committed(tp)
                if committed is None or committed <= last:
                    targets[tp] = (first, last)
            if not targets:
                return
            log.info("replaying batch %s (%s rows) interrupted before its commit", manifest.seq, manifest.rows)
            consumer.assign(list(targets))
            for tp, (first, _) in targets.items():
                consumer.seek(tp, first)
            raw = RawBatch()
            todo = dict(targets)
            async with asyncio.timeout(120):
                while todo:
                    got = await consumer.getmany(*todo, timeout_ms=500)
                    for tp, records in got.items():
                        last = targets[tp][1]
                        raw.add([r for r in records if r.offset <= last])
                        if records and records[-1].offset >= last:
                            todo.pop(tp, None)
        finally:
            await consumer.stop()
        await self._flush(raw, self.stages[0], None, replay=manifest, commit=False)
        self.stats["replayed"] += 1

    # ------------------------------------------------------------ batches
    async def _on_records(self, records: tuple[ConsumerRecord, ...]) -> None:
        """The FastStream handler: one fetch (records of several partitions, each in offset order)."""
        if self._stopping or not records:
            return  # not committed: re-read by the next run
        self._pending.add(records)
        self._wake.set()
        await self._maybe_flush()

    def _busy(self) -> bool:
        return self._flushing is not None and not self._flushing.done()

    async def _maybe_flush(self) -> None:
        """Hand the collected batch to storage when it is full, or due (flush_interval_ms) and none is in flight.

        While a batch is being stored the next one keeps growing (up to batch_max_events): under load batches
        get bigger and fetching never stops; when idle a batch leaves after flush_interval_ms. Two batches at
        most are in flight: the newer one is parsed by the engine while the older one is inserted.
        """
        async with self._lock:
            raw = self._pending
            if not raw.count:
                return
            full = raw.count >= self.settings.batch_max_events
            due = time.monotonic() >= raw.started + self.settings.flush_interval_ms / 1000
            if not (full or (due and not self._busy())):
                return
            previous = self._flushing
            if previous is not None and self._older is not None:
                await self._older  # the batch before `previous` must be done: its staging table is reused
            self._older = previous
            self._pending = RawBatch()
            stage = self.stages[self._dispatched % 2]
            self._dispatched += 1
            self._flushing = asyncio.create_task(self._flush(raw, stage, previous))

    async def _tick(self) -> None:
        """Flush a collected batch once it is due, even when no more messages arrive."""
        interval = self.settings.flush_interval_ms / 1000
        while True:
            raw = self._pending
            if not raw.count:
                self._wake.clear()
                await self._wake.wait()
                continue
            delay = raw.started + interval - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
                continue
            if self._busy():
                await asyncio.wait([self._flushing])  # type: ignore[list-item]
            await self._maybe_flush()
            await asyncio.sleep(0)

    async def _flush(
        self,
        raw: RawBatch,
        stage: str,
        previous: asyncio.Task | None,
        replay: Manifest | None = None,
        commit: bool = True,
    ) -> None:
        """Stage one batch, then (once the batch before it is stored) deduplicate, store and commit it.

        Each step is retried until it succeeds; commits happen in batch order.
        """
        delay = 0.5
        while True:
            try:
                staged = await asyncio.to_thread(self._stage_batch, raw, stage)
                break
            except Exception:
                log.exception("staging a batch failed; retrying in %.1f s", delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10)
        if previous is not None:
            await asyncio.wait([previous])  # batches are stored and committed in order
        delay = 0.5
        while True:
            try:
                await asyncio.to_thread(self._store_batch, staged, replay)
                break
            except Exception:
                log.exception("storing a batch failed; retrying in %.1f s", delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10)
                if replay is None and self._seq_written:
                    # The manifest is in the store: a retry must rebuild exactly that batch.
                    replay = self._seq_written
        self._seq_written = None
        if replay is None and staged.invalid:
            await self._dead_letter(staged.invalid)
        consumer = self.subscriber.consumer
        if commit and consumer is not None:
            offsets = {TopicPartition(t, p): last + 1 for t, p, _, last in raw.ranges()}
            try:
                await consumer.commit(offsets)
            except Exception:  # a rebalance: the next owner re-reads the batch and drops its ids as duplicates
                log.warning("offset commit failed after storing a batch", exc_info=True)
        self.stats["batches"] += 1
        if not self._busy() or self._flushing is asyncio.current_task():
            self.stats["phase"] = "idle"

    def _stage_batch(self, raw: RawBatch, stage: str) -> _Staged:
        """Parse a batch into its staging table (worker thread; the engine releases the GIL)."""
        t0 = time.perf_counter()
        records = raw.records()
        values = [r.value for r in records]
        t_prep = time.perf_counter()
        refused = self.store.stage_values(stage, values)
        staged = _Staged(raw, stage, records, len(refused))
        fixed: list[tuple[int, AccessRow]] = []
        for n in refused:  # what the engine would not parse: Python decides (user events land here too)
            try:
                kind, row = decode_message(records[n].value)
            except InvalidEvent as exc:
                r = records[n]
                staged.invalid.append((r.topic, r.partition, r.offset, r.value or b"", str(exc)))
                continue
            if kind == "access":
                fixed.append((n, row))  # type: ignore[arg-type]
            elif kind == "user":
                staged.users.append(row)  # type: ignore[arg-type]
        self.store.stage_rows(stage, fixed)
        staged.prepare_ms = (t_prep - t0) * 1000
        staged.stage_ms = (time.perf_counter() - t_prep) * 1000
        return staged

    def _store_batch(self, staged: _Staged, replay: Manifest | None) -> None:
        """Deduplicate and insert a staged batch (worker thread), after the batch before it is stored."""
        t0 = time.perf_counter()
        store, stage, records, raw = self.store, staged.stage, staged.records, staged.raw
        self.stats["phase"] = "deduplicating"
        if replay is not None:
            index = {(r.topic, r.partition, r.offset): n for n, r in enumerate(records)}
            skip = sorted(index[tuple(p)] for p in replay.skipped if tuple(p) in index)
            manifest: Manifest | None = replay
            rows, duplicates, earliest = replay.rows, 0, 0
        else:
            skip, count, rows, earliest = store.stage_duplicates(stage)
            duplicates = count - rows
            manifest = None
            if rows:
                self.stats["phase"] = "writing manifest"
                skipped = [[records[n].topic, records[n].partition, records[n].offset] for n in skip]
                manifest = Manifest(self._seq + 1, new_token(), raw.ranges(), skipped, rows)
                self._seq_written = manifest
                store.write_manifest(self.settings.group_id, manifest)
                self._seq = manifest.seq
        t_deduped = time.perf_counter()
        self.stats["phase"] = "inserting"
        store.insert_users(staged.users)
        if manifest is not None:
            store.insert_staged(stage, skip, manifest.token)
            if self.closed_periods is not None and earliest < time.time() // 3600 * 3600:
                self.closed_periods.invalidate()  # after the insert: see queries.ClosedPeriods
        self.stats["phase"] = "committing"
        self.stats["stored"] += rows
        self.stats["invalid"] += len(staged.invalid)
        self.stats["duplicates"] += duplicates
        t_end = time.perf_counter()
        correlation_id.set(manifest.token if manifest else None)
        log.info(
            "batch stored",
            extra={
                "fields": {
                    "messages": raw.count,
                    "rows": rows,
                    "users": len(staged.users),
                    "refused": staged.refused,
                    "duplicates": duplicates,
                    "invalid": len(staged.invalid),
                    "replay": replay is not None,
                    "prepare_ms": round(staged.prepare_ms, 1),
                    "stage_ms": round(staged.stage_ms, 1),
                    "dedupe_ms": round((t_deduped - t0) * 1000, 1),
                    "insert_ms": round((t_end - t_deduped) * 1000, 1),
                }
            },
        )

    async def _dead_letter(self, invalid: list[tuple[str, int, int, bytes, str]]) -> None:
        for topic, part, offset, value, error in invalid:
            log.warning("invalid event at %s/%s@%s: %s", topic, part, offset, error)
            try:
                await self.broker.publish(
                    value or b"",
                    topic=self.settings.dead_letter_topic,
                    headers={
                        "x-origin": f"{topic}/{part}@{offset}",
                        "x-error": error[:1000],
                        "x-consumer": "analytics",
                    },
                )
            except Exception:
                log.warning("could not publish to the dead-letter topic", exc_info=True)
