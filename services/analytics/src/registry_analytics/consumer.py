"""The batch loader: access and user events from Kafka into the analytics store, each exactly once.

How a batch becomes exactly-once:

1. Messages are collected per partition (up to `batch_max_events`, or `flush_interval_ms` after the first).
2. They are decoded (CloudEvents JSON) in (topic, partition, offset) order; a repeated event id inside the
   batch is dropped, and so is one the store already holds (looked up in the hours of the events' `ts`:
   a duplicate carries the same ts).
3. A manifest (offset ranges, the offsets dropped by the store look-up, and an insert token built from the
   kept event ids) is written to `ingest_batches` before the rows.
4. The rows go in as one insert with that `insert_deduplication_token`; the rollup's materialized view
   follows with deduplication too.
5. Only then are the Kafka offsets committed.

After a crash (even SIGKILL half-way through an insert), the last manifest is replayed before anything
else: the same messages give the same rows and the same token, so ClickHouse drops every part the
interrupted attempt had committed and writes only the missing ones. A batch whose offsets were committed
is not replayed; redelivered messages of any other batch are found by the store look-up.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, get_args

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from registry_analytics.settings import AnalyticsSettings
from registry_analytics.store import Manifest, Store
from registry_shared.events import AccessKind, FileAccessed, UserRegistered, decode_event
from registry_shared.logging import correlation_id
from registry_shared.settings import KafkaSettings

try:  # orjson parses the CloudEvents JSON ~3x faster than the standard library when it is installed
    from orjson import loads as _json_loads
except ImportError:  # pragma: no cover
    from json import loads as _json_loads

log = logging.getLogger(__name__)

ACCESS_TYPE = FileAccessed.event_type
USER_TYPE = UserRegistered.event_type
_KINDS = frozenset(get_args(AccessKind))
_ACCESS_KEYS = frozenset(FileAccessed.model_fields)
_OPT_STR = (str, type(None))


class InvalidEvent(ValueError):
    """A message that is not a valid CloudEvent of a type the loader reads."""


# ---------------------------------------------------------------- decoding
AccessRow = tuple[str, int, int, str, str, str, str, int]  # event_id, ts_ms, user_id, kind, repo, version, file, bytes
UserRow = tuple[int, str, str, str, int]  # user_id, email, name, role, updated_at_ms


def decode_message(value: bytes) -> tuple[str, AccessRow | UserRow | None]:
    """Decode one Kafka message value: ("access", row), ("user", row) or ("other", None).

    The common case (a well-formed registry.file.accessed.v1 event) takes a fast path of plain type
    checks; anything else goes through the shared pydantic models, so both accept exactly the same events.
    Raises InvalidEvent for anything that is not a valid CloudEvent.
    """
    try:
        doc = _json_loads(value)
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
            repo, version, rfile = data.get("repo_id"), data.get("version"), data.get("rfilename")
            if (
                type(uid) is int
                and uid >= 0
                and kind in _KINDS
                and type(ts) in (float, int)
                and 0 <= ts < 1e11
                and type(nbytes) is int
                and nbytes >= 0
                and type(repo) in _OPT_STR
                and type(version) in _OPT_STR
                and type(rfile) in _OPT_STR
            ):
                return "access", (eid, math.floor(ts * 1000), uid, kind, repo or "", version or "", rfile or "", nbytes)
    return _decode_slow(value)


def _decode_slow(value: bytes) -> tuple[str, AccessRow | UserRow | None]:
    try:
        event = decode_event(value)
        if event.type not in (ACCESS_TYPE, USER_TYPE):
            return "other", None
        payload = event.payload()
    except ValueError as exc:  # pydantic.ValidationError is a ValueError
        raise InvalidEvent(str(exc).splitlines()[0]) from exc
    if isinstance(payload, FileAccessed):
        if payload.user_id < 0 or payload.bytes < 0 or not 0 <= payload.ts < 1e11:
            raise InvalidEvent("user_id, bytes and ts must not be negative")
        return "access", (
            event.id,
            math.floor(payload.ts * 1000),
            payload.user_id,
            payload.kind,
            payload.repo_id or "",
            payload.version or "",
            payload.rfilename or "",
            payload.bytes,
        )
    if isinstance(payload, UserRegistered):
        if payload.user_id < 0:
            raise InvalidEvent("user_id must not be negative")
        updated = math.floor(event.time.timestamp() * 1000)
        return "user", (payload.user_id, payload.email, payload.name, payload.role, updated)
    return "other", None


# ---------------------------------------------------------------- batches
@dataclass
class RawBatch:
    """Messages collected for one flush, per partition in offset order."""

    records: dict[TopicPartition, list[tuple[int, bytes]]] = field(default_factory=dict)
    count: int = 0
    started: float = 0.0

    def add(self, tp: TopicPartition, offset: int, value: bytes) -> None:
        """Append a message (messages of one partition arrive in offset order)."""
        if not self.count:
            self.started = time.monotonic()
        self.records.setdefault(tp, []).append((offset, value))
        self.count += 1

    def ranges(self) -> list[list[Any]]:
        """[[topic, partition, first_offset, last_offset], ...] sorted."""
        return [[tp.topic, tp.partition, recs[0][0], recs[-1][0]] for tp, recs in self._sorted() if recs]

    def _sorted(self) -> list[tuple[TopicPartition, list[tuple[int, bytes]]]]:
        return sorted(self.records.items(), key=lambda kv: (kv[0].topic, kv[0].partition))


@dataclass
class PreparedBatch:
    """A decoded batch, ready to store."""

    ranges: list[list[Any]]
    columns: list[list[Any]]
    positions: list[tuple[str, int, int]]
    users: list[UserRow]
    invalid: list[tuple[str, int, int, bytes, str]]
    duplicates_in_batch: int


def prepare(raw: RawBatch) -> PreparedBatch:
    """Decode a batch deterministically: the same messages always give the same rows in the same order."""
    cols: list[list[Any]] = [[] for _ in range(8)]
    positions: list[tuple[str, int, int]] = []
    users: list[UserRow] = []
    invalid: list[tuple[str, int, int, bytes, str]] = []
    seen: set[str] = set()
    dups = 0
    append = [c.append for c in cols]
    for tp, recs in raw._sorted():
        topic, part = tp.topic, tp.partition
        for offset, value in recs:
            try:
                kind, row = decode_message(value)
            except InvalidEvent as exc:
                invalid.append((topic, part, offset, value, str(exc)))
                continue
            if kind == "access":
                eid = row[0]
                if eid in seen:
                    dups += 1
                    continue
                seen.add(eid)
                for a, v in zip(append, row, strict=True):
                    a(v)
                positions.append((topic, part, offset))
            elif kind == "user":
                users.append(row)  # type: ignore[arg-type]
    return PreparedBatch(raw.ranges(), cols, positions, users, invalid, dups)


def insert_token(event_ids: Sequence[str]) -> str:
    """The insert deduplication token of a batch: a digest of its event ids, in order."""
    h = hashlib.blake2b(digest_size=16)
    for eid in event_ids:
        h.update(eid.encode())
        h.update(b"\n")
    return f"access-{len(event_ids)}-{h.hexdigest()}"


def drop_rows(columns: list[list[Any]], positions: list[tuple[str, int, int]], keep: list[bool]) -> None:
    """Keep only the rows whose flag is true (in place)."""
    for i, col in enumerate(columns):
        columns[i] = [v for v, k in zip(col, keep, strict=True) if k]
    positions[:] = [p for p, k in zip(positions, keep, strict=True) if k]


# ---------------------------------------------------------------- the loader
class AccessLoader:
    """Consumes the access and users topics and stores them in batches, exactly once."""

    def __init__(self, store: Store, settings: AnalyticsSettings, kafka: KafkaSettings | None = None) -> None:
        self.store = store
        self.settings = settings
        self.kafka = kafka or KafkaSettings()
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        self._task: asyncio.Task | None = None
        self._seq = 0
        self._flushing: asyncio.Task | None = None
        self._seq_written: Manifest | None = None
        self.stats = {"batches": 0, "stored": 0, "duplicates": 0, "invalid": 0, "replayed": 0}
        self.ready = asyncio.Event()

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Start consuming in the background (returns at once)."""
        self._task = asyncio.create_task(self._run_forever(), name="access-loader")

    async def stop(self) -> None:
        """Stop consuming; a batch being stored is finished first, an unfinished one is dropped (and re-read)."""
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _run_forever(self) -> None:
        while True:
            try:
                await self._run()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("loader failed; restarting in 2 s")
                await asyncio.sleep(2)

    async def _run(self) -> None:
        s = self.settings
        self.consumer = AIOKafkaConsumer(
            s.access_topic,
            s.users_topic,
            bootstrap_servers=self.kafka.kafka_bootstrap_servers,
            client_id=f"{self.kafka.kafka_client_id}-analytics",
            group_id=s.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_bytes=s.fetch_max_bytes,
            max_partition_fetch_bytes=s.max_partition_fetch_bytes,
            fetch_max_wait_ms=min(s.flush_interval_ms, 500),
            max_poll_records=s.batch_max_events,
            metadata_max_age_ms=5000,
        )
        self.producer = AIOKafkaProducer(bootstrap_servers=self.kafka.kafka_bootstrap_servers, acks="all")
        await self.consumer.start()
        await self.producer.start()
        try:
            manifest = await asyncio.to_thread(self.store.last_manifest, s.group_id)
            self._seq = manifest.seq if manifest else 0
            await self._wait_assignment()
            if manifest:
                await self._replay(manifest)
            self.ready.set()
            await self._consume()
        finally:
            self.ready.clear()
            if self._flushing is not None:  # let a batch being stored finish and commit
                await asyncio.shield(self._flushing)
                self._flushing = None
            await self.consumer.stop()
            await self.producer.stop()

    async def _wait_assignment(self) -> None:
        assert self.consumer is not None
        async with asyncio.timeout(60):
            while not self.consumer.assignment():
                await self.consumer.getmany(timeout_ms=100, max_records=1)  # drives the group join
                if self.consumer.assignment():
                    break
        # getmany above may have fetched a record: rewind every partition to its committed offset.
        for tp in self.consumer.assignment():
            committed = await self.consumer.committed(tp)
            if committed is not None:
                self.consumer.seek(tp, committed)
            else:
                await self.consumer.seek_to_beginning(tp)

    # ------------------------------------------------------------ replay after a crash
    async def _replay(self, manifest: Manifest) -> None:
        """Store the last manifest's batch again if its offsets were never committed."""
        assert self.consumer is not None
        targets: dict[TopicPartition, tuple[int, int]] = {}
        for topic, part, first, last in manifest.ranges:
            tp = TopicPartition(topic, part)
            committed = await self.consumer.committed(tp)
            if committed is None or committed <= last:
                targets[tp] = (first, last)
        if not targets:
            return
        missing = set(targets) - self.consumer.assignment()
        if missing:
            log.warning("cannot replay batch %s: partitions %s are not assigned here", manifest.seq, missing)
            return
        log.info("replaying batch %s (%s rows) interrupted before its commit", manifest.seq, manifest.rows)
        raw = RawBatch()
        for tp, (first, _) in targets.items():
            self.consumer.seek(tp, first)
        todo = dict(targets)
        async with asyncio.timeout(120):
            while todo:
                got = await self.consumer.getmany(*todo, timeout_ms=500)
                for tp, records in got.items():
                    last = targets[tp][1]
                    for r in records:
                        if r.offset <= last:
                            raw.add(tp, r.offset, r.value)
                        if r.offset >= last:
                            todo.pop(tp, None)
        for tp, (_, last) in targets.items():
            self.consumer.seek(tp, last + 1)
        await self._flush(raw, replay=manifest)
        self.stats["replayed"] += 1

    # ------------------------------------------------------------ the main loop
    async def _consume(self) -> None:
        assert self.consumer is not None
        s = self.settings
        interval = s.flush_interval_ms / 1000
        raw = RawBatch()
        while True:
            timeout = max(0.0, raw.started + interval - time.monotonic()) if raw.count else 1.0
            got = await self.consumer.getmany(
                timeout_ms=int(timeout * 1000), max_records=max(1, s.batch_max_events - raw.count)
            )
            for tp, records in got.items():
                for r in records:
                    raw.add(tp, r.offset, r.value)
            due = raw.count and (raw.count >= s.batch_max_events or time.monotonic() >= raw.started + interval)
            if due:
                if self._flushing is not None:
                    await self._flushing  # one batch in flight: the next is decoded only after it is stored
                self._flushing = asyncio.create_task(self._flush(raw))
                raw = RawBatch()
            elif self._flushing is not None and self._flushing.done():
                await self._flushing
                self._flushing = None

    async def _flush(self, raw: RawBatch, replay: Manifest | None = None) -> None:
        """Decode, deduplicate, store and commit one batch; retried until it succeeds."""
        assert self.consumer is not None
        delay = 0.5
        while True:
            try:
                prepared, manifest = await asyncio.to_thread(self._store_batch, raw, replay)
                break
            except Exception:
                log.exception("storing a batch failed; retrying in %.1f s", delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10)
                if replay is None and self._seq_written:
                    # The manifest is in the store: a retry must rebuild exactly that batch.
                    replay = self._seq_written
        self._seq_written = None
        if replay is None and prepared.invalid:
            await self._dead_letter(prepared.invalid)
        offsets = {TopicPartition(t, p): last + 1 for t, p, _, last in prepared.ranges}
        try:
            await self.consumer.commit(offsets)
        except Exception:  # a rebalance: the next owner re-reads the batch and drops its ids as duplicates
            log.warning("offset commit failed after storing batch %s", manifest.seq if manifest else "-", exc_info=True)
        self.stats["batches"] += 1

    def _store_batch(self, raw: RawBatch, replay: Manifest | None) -> tuple[PreparedBatch, Manifest | None]:
        """Runs in a worker thread (the insert releases the GIL; decoding overlaps the next fetch)."""
        t0 = time.perf_counter()
        prepared = prepare(raw)
        cols, positions = prepared.columns, prepared.positions
        if replay is not None:
            skipped = {tuple(p) for p in replay.skipped}
            if skipped:
                drop_rows(cols, positions, [p not in skipped for p in positions])
            if len(cols[0]) != replay.rows:
                log.error("replayed batch %s has %s rows, its manifest %s", replay.seq, len(cols[0]), replay.rows)
            manifest: Manifest | None = replay
        else:
            ids = cols[0]
            existing = self.store.existing_event_ids(sorted({ts // 3_600_000 * 3600 for ts in cols[1]}), ids)
            skipped_pos: list[list[Any]] = []
            if existing:
                keep = [eid not in existing for eid in ids]
                skipped_pos = [list(p) for p, k in zip(positions, keep, strict=True) if not k]
                drop_rows(cols, positions, keep)
            manifest = None
            if cols[0]:
                manifest = Manifest(self._seq + 1, insert_token(cols[0]), prepared.ranges, skipped_pos, len(cols[0]))
                self.store.write_manifest(self.settings.group_id, manifest)
                self._seq = manifest.seq
                self._seq_written = manifest
            self.stats["duplicates"] += prepared.duplicates_in_batch + len(skipped_pos)
        self.store.insert_users(prepared.users)
        if cols[0]:
            now_ms = int(time.time() * 1000)
            token = manifest.token if manifest else insert_token(cols[0])
            self.store.insert_access([*cols, [now_ms] * len(cols[0])], token)
        self.stats["stored"] += len(cols[0])
        self.stats["invalid"] += len(prepared.invalid)
        correlation_id.set(manifest.token if manifest else None)
        log.info(
            "batch stored",
            extra={
                "fields": {
                    "messages": raw.count,
                    "rows": len(cols[0]),
                    "users": len(prepared.users),
                    "duplicates": prepared.duplicates_in_batch + (len(replay.skipped) if replay else 0),
                    "invalid": len(prepared.invalid),
                    "replay": replay is not None,
                    "ms": round((time.perf_counter() - t0) * 1000, 1),
                }
            },
        )
        return prepared, manifest

    async def _dead_letter(self, invalid: list[tuple[str, int, int, bytes, str]]) -> None:
        for topic, part, offset, value, error in invalid:
            log.warning("invalid event at %s/%s@%s: %s", topic, part, offset, error)
            if self.producer is None:
                continue
            try:
                await self.producer.send_and_wait(
                    self.settings.dead_letter_topic,
                    value,
                    headers=[
                        ("x-origin", f"{topic}/{part}@{offset}".encode()),
                        ("x-error", error.encode()[:1000]),
                        ("x-consumer", b"analytics"),
                    ],
                )
            except Exception:
                log.warning("could not publish to the dead-letter topic", exc_info=True)
