"""The batch loader: access and user events from Kafka into the analytics store, each exactly once.

A FastStream app: a `KafkaBroker` with one batch subscriber on the access and users topics, whose offsets
FastStream never commits (`AckPolicy.MANUAL`); the loader commits them once a batch is stored.

How a batch becomes exactly-once:

1. Messages are collected per partition (up to `batch_max_events`, or `flush_interval_ms` after the first).
2. They are decoded (CloudEvents JSON) in (topic, partition, offset) order; a repeated event id inside the
   batch is dropped, and so is one the store already holds (the ids of the hours of the events' `ts`, a
   duplicate carries the same ts, cached per hour: see SeenIds).
3. A manifest (offset ranges, the offsets dropped by the store look-up, and an insert token built from the
   kept event ids) is written to `ingest_batches` before the rows.
4. The rows go in as one insert with that `insert_deduplication_token`; the rollup's materialized view
   follows with deduplication too.
5. Only then are the Kafka offsets committed.

After a crash (even SIGKILL half-way through an insert), the last manifest is replayed before the broker
starts: the same messages give the same rows and the same token, so ClickHouse drops every part the
interrupted attempt had committed and writes only the missing ones. A batch whose offsets were committed
is not replayed; redelivered messages of any other batch are found by the store look-up.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, get_args

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from faststream import AckPolicy
from faststream.kafka import KafkaBroker
from faststream.kafka.message import FAKE_CONSUMER, KafkaMessage
from orjson import dumps as _json_dumps
from orjson import loads as _json_loads

from registry_analytics.settings import AnalyticsSettings
from registry_analytics.store import Manifest, Store
from registry_shared.events import AccessKind, FileAccessed, UserRegistered, decode_event
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


# ---------------------------------------------------------------- decoding
#: An access event as the loader keeps it: (event_id, ts in ms, the JSON line ClickHouse parses into a row).
AccessRow = tuple[str, int, bytes]
UserRow = tuple[int, str, str, str, int]  # user_id, email, name, role, updated_at_ms
_MAX_INT = 2**63


def decode_message(value: bytes) -> tuple[str, AccessRow | UserRow | None]:
    """Decode one Kafka message value: ("access", row), ("user", row) or ("other", None).

    The common case (a well-formed registry.file.accessed.v1 event) takes a fast path of plain type
    checks, and its own bytes are what ClickHouse parses into the row (see store.SCHEMA, access_ingest).
    Anything else goes through the shared pydantic models and is re-encoded canonically, so both paths
    accept exactly the same events. Raises InvalidEvent for anything that is not a valid CloudEvent.
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
            if (
                type(uid) is int
                and 0 <= uid < _MAX_INT
                and kind in _KINDS
                and type(ts) in (float, int)
                and 0 <= ts < 1e11
                and type(nbytes) is int
                and 0 <= nbytes < _MAX_INT
                and type(data.get("repo_id")) in _OPT_STR
                and type(data.get("version")) in _OPT_STR
                and type(data.get("rfilename")) in _OPT_STR
                and b"\n" not in value
                and b"\r" not in value
            ):
                return "access", (eid, math.floor(ts * 1000), value)
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
        if not (0 <= payload.user_id < _MAX_INT and 0 <= payload.bytes < _MAX_INT and 0 <= payload.ts < 1e11):
            raise InvalidEvent("user_id, bytes and ts must be non-negative and in range")
        line = _json_dumps({"id": event.id, "data": payload.model_dump()})
        return "access", (event.id, math.floor(payload.ts * 1000), line)
    if isinstance(payload, UserRegistered):
        if not 0 <= payload.user_id < _MAX_INT:
            raise InvalidEvent("user_id out of range")
        updated = math.floor(event.time.timestamp() * 1000)
        return "user", (payload.user_id, payload.email, payload.name, payload.role, updated)
    return "other", None


# ---------------------------------------------------------------- batches
@dataclass
class _Partition:
    """What one partition contributed to a batch, decoded as it arrived (offset order)."""

    first: int
    last: int = -1
    #: (offset, event_id, ts_ms, line) of the access events
    access: list[tuple[int, str, int, bytes]] = field(default_factory=list)
    users: list[UserRow] = field(default_factory=list)
    invalid: list[tuple[int, bytes, str]] = field(default_factory=list)


@dataclass
class RawBatch:
    """Messages collected for one flush, per partition, decoded as they arrive.

    Decoding happens on the event loop as each fetch comes in (no thread fights the fetcher for the GIL);
    `prepare` then merges the partitions in a fixed order, so the batch does not depend on arrival order.
    """

    parts: dict[TopicPartition, _Partition] = field(default_factory=dict)
    count: int = 0
    started: float = 0.0

    def add(self, tp: TopicPartition, offset: int, value: bytes) -> None:
        """Decode and append one message (messages of one partition arrive in offset order)."""
        self.add_many(tp, [(offset, value)])

    def add_many(self, tp: TopicPartition, messages: Sequence[tuple[int, bytes]]) -> None:
        """Decode and append messages of one partition, in offset order."""
        if not messages:
            return
        if not self.count:
            self.started = time.monotonic()
        part = self.parts.get(tp)
        if part is None:
            part = self.parts[tp] = _Partition(first=messages[0][0])
        access, users, invalid = part.access.append, part.users.append, part.invalid.append
        for offset, value in messages:
            try:
                kind, row = decode_message(value)
            except InvalidEvent as exc:
                invalid((offset, value, str(exc)))
                continue
            if kind == "access":
                eid, ts, line = row  # type: ignore[misc]
                access((offset, eid, ts, line))
            elif kind == "user":
                users(row)  # type: ignore[arg-type]
        part.last = messages[-1][0]
        self.count += len(messages)

    def ranges(self) -> list[list[Any]]:
        """[[topic, partition, first_offset, last_offset], ...] sorted."""
        return [[tp.topic, tp.partition, p.first, p.last] for tp, p in self._sorted()]

    def _sorted(self) -> list[tuple[TopicPartition, _Partition]]:
        return sorted(self.parts.items(), key=lambda kv: (kv[0].topic, kv[0].partition))


@dataclass
class PreparedBatch:
    """A decoded batch, ready to store: parallel lists of event ids, ts (ms), JSON lines and positions."""

    ranges: list[list[Any]]
    ids: list[str]
    ts_ms: list[int]
    lines: list[bytes]
    positions: list[tuple[str, int, int]]
    users: list[UserRow]
    invalid: list[tuple[str, int, int, bytes, str]]
    duplicates_in_batch: int

    def keep(self, flags: list[bool]) -> None:
        """Keep only the access rows whose flag is true."""
        self.ids = [v for v, k in zip(self.ids, flags, strict=True) if k]
        self.ts_ms = [v for v, k in zip(self.ts_ms, flags, strict=True) if k]
        self.lines = [v for v, k in zip(self.lines, flags, strict=True) if k]
        self.positions = [v for v, k in zip(self.positions, flags, strict=True) if k]


def prepare(raw: RawBatch) -> PreparedBatch:
    """Merge a batch deterministically: the same messages always give the same rows in the same order."""
    ids: list[str] = []
    ts_ms: list[int] = []
    lines: list[bytes] = []
    positions: list[tuple[str, int, int]] = []
    users: list[UserRow] = []
    invalid: list[tuple[str, int, int, bytes, str]] = []
    seen: set[str] = set()
    dups = 0
    for tp, part in raw._sorted():
        topic, partition = tp.topic, tp.partition
        for offset, eid, ts, line in part.access:
            if eid in seen:
                dups += 1
                continue
            seen.add(eid)
            ids.append(eid)
            ts_ms.append(ts)
            lines.append(line)
            positions.append((topic, partition, offset))
        users.extend(part.users)
        invalid.extend((topic, partition, offset, value, err) for offset, value, err in part.invalid)
    return PreparedBatch(raw.ranges(), ids, ts_ms, lines, positions, users, invalid, dups)


class SeenIds:
    """The event ids the store holds, per hour of their `ts`, loaded from the store on first use.

    A duplicate carries the same ts as the event it repeats, so the ids of the hours a batch touches are
    all it needs to be checked against. Live traffic touches the current hour or two; older hours are
    dropped least-recently-used first once `max_ids` ids are held. Only the loader writes access_events,
    so the cache stays exact: ids are added only once their batch is stored.
    """

    def __init__(self, store: Store, max_ids: int = 2_000_000) -> None:
        self.store = store
        self.max_ids = max_ids
        self.hours: OrderedDict[int, set[str]] = OrderedDict()
        self.size = 0

    def clear(self) -> None:
        """Forget everything (after an error: the store is the truth)."""
        self.hours.clear()
        self.size = 0

    def _load(self, hours: set[int]) -> None:
        missing = sorted(h for h in hours if h not in self.hours)
        for h in missing:
            self.hours[h] = set()
        if missing:
            for h, eid in self.store.event_ids_by_hour([h * 3600 for h in missing]):
                self.hours[h // 3600].add(eid)
                self.size += 1
        for h in hours:
            self.hours.move_to_end(h)

    def existing(self, ids: list[str], ts_ms: list[int]) -> set[str]:
        """Which of the ids (with their ts in ms) the store already holds."""
        hours_of = [t // 3_600_000 for t in ts_ms]
        self._load(set(hours_of))
        hours = self.hours
        return {eid for eid, h in zip(ids, hours_of, strict=True) if eid in hours[h]}

    def add(self, ids: list[str], ts_ms: list[int]) -> None:
        """Record ids that were just stored, then drop the least recently used hours beyond `max_ids`."""
        hours = self.hours
        for eid, t in zip(ids, ts_ms, strict=True):
            bucket = hours.get(t // 3_600_000)
            if bucket is not None:  # an hour not loaded yet is read from the store, these ids included
                bucket.add(eid)
        self.size = sum(len(b) for b in hours.values())
        while self.size > self.max_ids and len(hours) > 1:
            _, dropped = hours.popitem(last=False)
            self.size -= len(dropped)


def insert_token(event_ids: Sequence[str]) -> str:
    """The insert deduplication token of a batch: a digest of its event ids, in order."""
    h = hashlib.blake2b(digest_size=16)
    for eid in event_ids:
        h.update(eid.encode())
        h.update(b"\n")
    return f"access-{len(event_ids)}-{h.hexdigest()}"


# ---------------------------------------------------------------- the loader
def _parse_records(records: tuple[ConsumerRecord, ...]) -> KafkaMessage:
    """FastStream parser of a fetched batch: the records as they are (no per-message work here)."""
    first = records[0]
    msg_id = f"{first.topic}/{first.partition}@{first.offset}+{len(records)}"
    # KafkaMessage counts as acknowledged: FastStream never commits, the loader does once a batch is stored.
    return KafkaMessage(raw_message=records, body=b"", consumer=FAKE_CONSUMER, message_id=msg_id, correlation_id=msg_id)


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

    def __init__(self, store: Store, settings: AnalyticsSettings, kafka: KafkaSettings | None = None) -> None:
        self.store = store
        self.settings = settings
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
            batch_timeout_ms=min(s.flush_interval_ms, 500),
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
            parser=_parse_records,
            decoder=_decode_records,
        )
        self.subscriber(self._on_records)
        self._task: asyncio.Task | None = None
        self._ticker: asyncio.Task | None = None
        self._seq = 0
        self._pending = RawBatch()
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._flushing: asyncio.Task | None = None
        self._seq_written: Manifest | None = None
        self._stopping = False
        self.seen = SeenIds(store)
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
        if self._flushing is not None:
            try:
                await asyncio.shield(self._flushing)
            except Exception:
                log.exception("the last batch failed")
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
                        raw.add_many(tp, [(r.offset, r.value) for r in records if r.offset <= last])
                        if records and records[-1].offset >= last:
                            todo.pop(tp, None)
        finally:
            await consumer.stop()
        await self._flush(raw, replay=manifest, commit=False)
        self.stats["replayed"] += 1

    # ------------------------------------------------------------ batches
    async def _on_records(self, records: tuple[ConsumerRecord, ...]) -> None:
        """The FastStream handler: one fetch (records of several partitions, each in offset order)."""
        if self._stopping or not records:
            return  # not committed: re-read by the next run
        raw = self._pending
        for (topic, partition), recs in itertools.groupby(records, key=lambda r: (r.topic, r.partition)):
            raw.add_many(TopicPartition(topic, partition), [(r.offset, r.value) for r in recs])
        self._wake.set()
        await self._maybe_flush()

    def _busy(self) -> bool:
        return self._flushing is not None and not self._flushing.done()

    async def _maybe_flush(self) -> None:
        """Hand the collected batch to storage when it is full, or due (flush_interval_ms) and none is in flight.

        While a batch is being stored the next one keeps growing (up to batch_max_events): under load batches
        get bigger and fetching never stops; when idle a batch leaves after flush_interval_ms.
        """
        async with self._lock:
            raw = self._pending
            if not raw.count:
                return
            full = raw.count >= self.settings.batch_max_events
            due = time.monotonic() >= raw.started + self.settings.flush_interval_ms / 1000
            if not (full or (due and not self._busy())):
                return
            if self._flushing is not None:
                await self._flushing  # one batch in flight, committed in order
            self._pending = RawBatch()
            self._flushing = asyncio.create_task(self._flush(raw))

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

    async def _flush(self, raw: RawBatch, replay: Manifest | None = None, commit: bool = True) -> None:
        """Deduplicate, store and commit one batch; retried until it succeeds."""
        delay = 0.5
        while True:
            try:
                prepared, manifest = await asyncio.to_thread(self._store_batch, raw, replay)
                break
            except Exception:
                log.exception("storing a batch failed; retrying in %.1f s", delay)
                self.seen.clear()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10)
                if replay is None and self._seq_written:
                    # The manifest is in the store: a retry must rebuild exactly that batch.
                    replay = self._seq_written
        self._seq_written = None
        if replay is None and prepared.invalid:
            await self._dead_letter(prepared.invalid)
        consumer = self.subscriber.consumer
        if commit and consumer is not None:
            offsets = {TopicPartition(t, p): last + 1 for t, p, _, last in prepared.ranges}
            try:
                await consumer.commit(offsets)
            except Exception:  # a rebalance: the next owner re-reads the batch and drops its ids as duplicates
                log.warning(
                    "offset commit failed after storing batch %s", manifest.seq if manifest else "-", exc_info=True
                )
        self.stats["batches"] += 1
        self.stats["phase"] = "idle"

    def _store_batch(self, raw: RawBatch, replay: Manifest | None) -> tuple[PreparedBatch, Manifest | None]:
        """Runs in a worker thread (the insert releases the GIL while the loop fetches and decodes the next)."""
        t0 = time.perf_counter()
        self.stats["phase"] = "decoding"
        prepared = prepare(raw)
        t_decoded = time.perf_counter()
        skipped_pos: list[list[Any]] = []
        if replay is not None:
            skipped = {tuple(p) for p in replay.skipped}
            if skipped:
                prepared.keep([p not in skipped for p in prepared.positions])
            if len(prepared.ids) != replay.rows:
                log.error("replayed batch %s has %s rows, its manifest %s", replay.seq, len(prepared.ids), replay.rows)
            manifest: Manifest | None = replay
        else:
            self.stats["phase"] = "deduplicating"
            existing = self.seen.existing(prepared.ids, prepared.ts_ms)
            if existing:
                flags = [eid not in existing for eid in prepared.ids]
                skipped_pos = [list(p) for p, k in zip(prepared.positions, flags, strict=True) if not k]
                prepared.keep(flags)
            manifest = None
            if prepared.ids:
                self.stats["phase"] = "writing manifest"
                token = insert_token(prepared.ids)
                manifest = Manifest(self._seq + 1, token, prepared.ranges, skipped_pos, len(prepared.ids))
                self.store.write_manifest(self.settings.group_id, manifest)
                self._seq = manifest.seq
                self._seq_written = manifest
        t_deduped = time.perf_counter()
        self.stats["phase"] = "inserting"
        self.store.insert_users(prepared.users)
        if prepared.ids:
            token = manifest.token if manifest else insert_token(prepared.ids)
            self.store.insert_access_lines(prepared.lines, token)
            self.seen.add(prepared.ids, prepared.ts_ms)
        self.stats["phase"] = "committing"
        duplicates = prepared.duplicates_in_batch + len(skipped_pos)
        self.stats["stored"] += len(prepared.ids)
        self.stats["invalid"] += len(prepared.invalid)
        self.stats["duplicates"] += duplicates
        t_end = time.perf_counter()
        correlation_id.set(manifest.token if manifest else None)
        log.info(
            "batch stored",
            extra={
                "fields": {
                    "messages": raw.count,
                    "rows": len(prepared.ids),
                    "users": len(prepared.users),
                    "duplicates": duplicates,
                    "invalid": len(prepared.invalid),
                    "replay": replay is not None,
                    "ms": round((t_end - t0) * 1000, 1),
                    "decode_ms": round((t_decoded - t0) * 1000, 1),
                    "dedupe_ms": round((t_deduped - t_decoded) * 1000, 1),
                    "insert_ms": round((t_end - t_deduped) * 1000, 1),
                }
            },
        )
        return prepared, manifest

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
