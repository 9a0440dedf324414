"""The batch loader: access and user events from Kafka into the analytics store, each exactly once.

A FastStream app: a `KafkaBroker` with one batch subscriber on the access and users topics, whose offsets
FastStream never commits (`AckPolicy.MANUAL`); the loader commits them once a batch is stored.

No message is parsed by Python on the way: the raw values go to the ClickHouse engine, which parses, checks
and deduplicates them (store.STAGE_SELECT); Python decodes only what the engine refuses (decode.py).

How a batch (batching.RawBatch) becomes exactly-once:

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

When a step fails (the project's consumer policy, registry_shared.consumers):

- a transient failure (the store unreachable, out of memory, too busy: store.transient) is retried with the
  shared bounded backoff, logged, and shown as `retrying` in `/healthz`; the batch is not committed meanwhile;
- any other failure is permanent for that batch: it is split in two halves, stored one after the other (each
  a batch of its own: manifest, token, commit), down to the single message that fails, which is dead-lettered
  with the error; the rest of the batch is stored and the partition moves on;
- a message the decoder refuses is dead-lettered with its error (step 2); a dead letter Kafka refuses is
  retried like a transient failure, and the batch's offsets are committed only once its dead letters are out.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from faststream import AckPolicy
from faststream.kafka import KafkaBroker
from faststream.kafka.message import KafkaMessage

from registry_analytics.batching import RawBatch, new_token
from registry_analytics.decode import AccessRow, InvalidEvent, UserRow, decode_message
from registry_analytics.queries import ClosedPeriods
from registry_analytics.settings import AnalyticsSettings
from registry_analytics.store import Manifest, Store, failure_kind, stage_name
from registry_shared.background import BackgroundTask, supervise
from registry_shared.backoff import Backoff, sleep_or_stop
from registry_shared.consumer_policy import DEFAULT_CLASSIFIER, ConsumerPolicy, Stopped, describe, faststream_sink
from registry_shared.health import HEALTH, HealthRegistry
from registry_shared.kafka import raw_batch
from registry_shared.logging import correlation_id
from registry_shared.metrics import ANALYTICS_LAST_LOAD, ANALYTICS_NEWEST_EVENT, ANALYTICS_ROWS
from registry_shared.settings import KafkaSettings

log = logging.getLogger(__name__)
T = TypeVar("T")

#: The component of /healthz that reports the loader (and names it in dead letters).
COMPONENT = "analytics-loader"
#: The shared classification, plus the store's errors (store.failure_kind).
CLASSIFIER = DEFAULT_CLASSIFIER.extend(rule=failure_kind)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message the loader gives up on, and why."""

    record: ConsumerRecord
    error: str


@dataclass
class Staged:
    """A batch parsed into a staging table, and what Python made of the messages the engine refused."""

    raw: RawBatch
    stage: str
    records: list[ConsumerRecord]
    refused: int
    users: list[UserRow] = field(default_factory=list)
    invalid: list[DeadLetter] = field(default_factory=list)
    prepare_ms: float = 0.0
    stage_ms: float = 0.0


class _Permanent(Exception):
    """A step failed in a way retrying cannot fix (the cause is chained)."""


# ---------------------------------------------------------------- the FastStream wiring
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
        registry: HealthRegistry = HEALTH,
        backoff: Backoff | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.closed_periods = closed_periods  # told when a batch holds late events (before the current hour)
        self.kafka = kafka or KafkaSettings()
        self.backoff = backoff or Backoff(initial=0.5, cap=10.0)
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
        self._stop = asyncio.Event()
        #: The project's consumer policy: retries of transient failures (bounded backoff, logged, in /healthz),
        #: dead letters (the error in their headers), the loader's health.
        self.policy = ConsumerPolicy(
            COMPONENT,
            group=s.group_id,
            sink=faststream_sink(self.broker),
            dead_letter_topic=s.dead_letter_topic,
            classifier=CLASSIFIER,
            backoff=self.backoff,
            registry=registry,
            stop=self._stop,
        )
        self.health = self.policy.health
        self.policy.watch(lambda: [getattr(self.subscriber, "consumer", None)])
        self._task: asyncio.Task | None = None
        self._ticker: BackgroundTask | None = None
        self._registry = registry
        self._seq = 0
        self._pending = RawBatch()
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._flushing: asyncio.Task | None = None  # the batch dispatched last
        self._older: asyncio.Task | None = None  # the batch dispatched before it
        self._dispatched = 0
        self._seq_written: Manifest | None = None
        #: Set when a batch failed in a way the loader does not handle (a bug): nothing is committed after it.
        self._broken: str | None = None
        #: Two staging tables: a batch is parsed into one while the one before is deduplicated and inserted.
        self.stages = (stage_name(settings.group_id) + "_0", stage_name(settings.group_id) + "_1")
        self.stats: dict[str, int | str] = {
            "batches": 0,
            "stored": 0,
            "duplicates": 0,
            "invalid": 0,
            "failed": 0,
            "split": 0,
            "replayed": 0,
            "phase": "starting",
        }
        self.ready = asyncio.Event()

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Replay an interrupted batch, then start the broker, in the background (returns at once)."""
        self._task = asyncio.create_task(self._start(), name="access-loader")
        self._task.add_done_callback(self._died)

    def _died(self, task: asyncio.Task) -> None:
        """The start-up task failed in a way it does not retry: /healthz fails (the loader would never load)."""
        if task.cancelled() or self._stop.is_set() or task.exception() is None:
            return
        exc = task.exception()
        log.error("analytics loader start-up died: %s", describe(exc), exc_info=exc)
        self.health.dead(f"start-up: {describe(exc)}")

    async def _start(self) -> None:
        async def prepare() -> None:
            for stage in self.stages:
                await asyncio.to_thread(self.store.create_stage, stage)
            manifest = await asyncio.to_thread(self.store.last_manifest, self.settings.group_id)
            self._seq = manifest.seq if manifest else 0
            if manifest:
                await self._replay(manifest)

        await self._until_done("start-up", prepare)
        # The flusher runs supervised (registry_shared.background): restarted if it dies, in /healthz.
        self._ticker = supervise(f"{COMPONENT}-flush", self._tick, self._registry)
        await self._until_done("starting the Kafka broker", self.broker.start)
        await self._assigned.wait()
        self.stats["phase"] = "idle"
        self.health.ok()
        self.ready.set()

    async def _until_done(self, what: str, op: Callable[[], Awaitable[object]]) -> None:
        """Start-up steps: retried with the shared backoff, whatever fails (the store or Kafka not there yet)."""
        attempt = 0
        while True:
            try:
                await op()
                return
            except Exception as exc:
                attempt += 1
                delay = self.backoff.delay(attempt)
                log.warning("%s failed (%s); retrying in %.1f s", what, describe(exc), delay)
                self.health.retrying(f"{what}: {describe(exc)}")
                if await sleep_or_stop(delay, self._stop):
                    raise Stopped from exc

    async def stop(self) -> None:
        """Stop consuming: a batch being stored is finished and committed, a collected one is dropped (re-read).

        A batch whose step is waiting to be retried (the store away) is abandoned uncommitted: re-read later.
        """
        self._stop.set()
        self.ready.clear()
        if self._task is not None and not self._task.done():
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Stopped):
                pass
        if self._ticker is not None:
            await self._ticker.stop()
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
        if self._stop.is_set() or not records:
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
                await asyncio.wait([self._older])  # the batch before `previous` must be done: its table is reused
            self._older = previous
            self._pending = RawBatch()
            stage = self.stages[self._dispatched % 2]
            self._dispatched += 1
            self._flushing = asyncio.create_task(self._flush(raw, stage, previous), name="access-loader-batch")

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

        Transient failures are retried (bounded backoff); a permanent one splits the batch (see `_isolate`).
        Commits happen in batch order. Never raises but on cancellation: a failure the loader does not
        handle marks it broken (nothing is committed any more, /healthz fails).
        """
        try:
            staged: Staged | None = None
            failure: BaseException | None = None
            try:
                staged = await self._retrying("staging a batch", self._stage_batch, raw, stage)
            except _Permanent as exc:
                failure = exc.__cause__
            if previous is not None:
                await asyncio.wait([previous])  # batches are stored and committed in order
            if staged is not None:
                try:
                    await self._store(staged, replay)
                except _Permanent as exc:
                    failure = exc.__cause__
            if failure is None:
                assert staged is not None
                await self._finish(raw, staged.invalid if replay is None else [], commit=commit)
            elif replay is not None:
                # The interrupted batch cannot be rebuilt as it was: the subscriber re-reads its messages from
                # the committed offsets and stores them as new batches (what the store holds is found there).
                log.error("replaying batch %s failed for good (%s); left to the consumer", replay.seq, failure)
            else:
                await self._isolate(raw, stage, failure)
        except Stopped:
            log.info("loader stopping: a batch of %s messages is left uncommitted (re-read next time)", raw.count)
        except Exception as exc:
            self._broken = describe(exc)
            self.health.dead(f"storing a batch: {self._broken}")
            log.exception("the loader failed; nothing is committed any more")
        finally:
            self.stats["batches"] += 1
            if not self._busy() or self._flushing is asyncio.current_task():
                self.stats["phase"] = "idle"

    async def _load(self, raw: RawBatch, stage: str) -> None:
        """Stage, store and commit one batch on its own (a half of a batch that failed); isolates failures."""
        try:
            staged = await self._retrying("staging a batch", self._stage_batch, raw, stage)
            await self._store(staged, None)
        except _Permanent as exc:
            assert exc.__cause__ is not None
            await self._isolate(raw, stage, exc.__cause__)
            return
        await self._finish(raw, staged.invalid, commit=True)

    async def _isolate(self, raw: RawBatch, stage: str, failure: BaseException) -> None:
        """A batch failed for good: store its halves one after the other, down to the message that fails,
        which is dead-lettered with the error (and committed past)."""
        self._seq_written = None  # a manifest written for the failed batch is never replayed: its halves have theirs
        if raw.count == 1:
            (r,) = raw.records()
            error = f"the analytics store refused it: {describe(failure)}"
            log.error("message at %s/%s@%s cannot be stored: %s", r.topic, r.partition, r.offset, error)
            self.stats["failed"] += 1
            await self._finish(raw, [DeadLetter(r, error)], commit=True)
            return
        log.warning("a batch of %s messages failed for good (%s): storing its halves apart", raw.count, failure)
        self.stats["split"] += 1
        for half in raw.split():
            await self._load(half, stage)

    async def _retrying(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` in a worker thread under the policy: transient failures retried (bounded backoff),
        unexpected ones a few times. Raises _Permanent (from the cause) when it fails for good, Stopped if the
        loader stops meanwhile."""
        try:
            return await self.policy.retry(lambda: asyncio.to_thread(fn, *args))
        except Stopped:
            raise
        except Exception as exc:
            raise _Permanent(what) from exc

    async def _store(self, staged: Staged, replay: Manifest | None) -> None:
        """Deduplicate and insert a staged batch, retrying transient failures; _Permanent on any other."""
        self._seq_written = None

        async def attempt() -> None:
            nonlocal replay
            if replay is None and self._seq_written:
                # The manifest of an earlier attempt is in the store: a retry must rebuild exactly that batch.
                replay = self._seq_written
            await asyncio.to_thread(self._store_batch, staged, replay)

        try:
            await self.policy.retry(attempt)
        except Stopped:
            raise
        except Exception as exc:
            raise _Permanent("storing a batch") from exc
        self._seq_written = None

    async def _finish(self, raw: RawBatch, dead: list[DeadLetter], commit: bool) -> None:
        """A stored batch: its dead letters out first, then its offsets committed."""
        if dead:
            await self._dead_letter(dead)
        if self._broken is not None:
            return  # a batch before this one was lost: committing past it would lose it for good
        consumer = self.subscriber.consumer
        if commit and consumer is not None:
            offsets = {TopicPartition(t, p): last + 1 for t, p, _, last in raw.ranges()}
            try:
                await consumer.commit(offsets)
            except Exception:  # a rebalance: the next owner re-reads the batch and drops its ids as duplicates
                log.warning("offset commit failed after storing a batch", exc_info=True)
        self.health.handled += raw.count
        for topic, partition, _, last in raw.ranges():
            self.policy.positions[(topic, partition)] = last + 1
        self.health.ok()

    def _stage_batch(self, raw: RawBatch, stage: str) -> Staged:
        """Parse a batch into its staging table (worker thread; the engine releases the GIL)."""
        t0 = time.perf_counter()
        records = raw.records()
        values = [r.value for r in records]
        t_prep = time.perf_counter()
        refused = self.store.stage_values(stage, values)
        staged = Staged(raw, stage, records, len(refused))
        fixed: list[tuple[int, AccessRow]] = []
        for n in refused:  # what the engine would not parse: Python decides (user events land here too)
            try:
                kind, row = decode_message(records[n].value)
            except InvalidEvent as exc:
                r = records[n]
                staged.invalid.append(DeadLetter(r, str(exc)))
                continue
            if kind == "access":
                fixed.append((n, row))  # type: ignore[arg-type]
            elif kind == "user":
                staged.users.append(row)  # type: ignore[arg-type]
        self.store.stage_rows(stage, fixed)
        staged.prepare_ms = (t_prep - t0) * 1000
        staged.stage_ms = (time.perf_counter() - t_prep) * 1000
        return staged

    def _store_batch(self, staged: Staged, replay: Manifest | None) -> None:
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
        ANALYTICS_ROWS.inc(rows)
        ANALYTICS_LAST_LOAD.set(time.time())
        if records:
            ANALYTICS_NEWEST_EVENT.set(max(r.timestamp for r in records) / 1000)
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

    async def _dead_letter(self, dead: list[DeadLetter]) -> None:
        """Publish each message given up on to the dead-letter topic with its error (Kafka away: retried)."""
        for d in dead:
            if not (await self.policy.dead_letter(d.record, d.error)).committable:
                raise Stopped
