"""Helpers of the ingest tests: run real `registry-ingest` processes, publish upload events, read verdicts.

Each worker under test gets its own consumer group, its own uploads/verdicts/dead-letter topics and its
own object-key prefix (INGEST_UPLOAD_PREFIX), so the stack's own ingest process (which also reads
`minio.bucket-events`) ignores the test's objects and the test worker ignores everything else.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import random
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from registry_shared.events import (
    CloudEvent,
    Topics,
    UploadCompleted,
    UploadInitiated,
    decode_event,
    encode_event,
    make_event,
)

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def eventually(check: Callable[[], Awaitable[Any]], within: float, what: str, interval: float = 0.1) -> Any:
    """Poll `check` until it returns something truthy; fail with `what` after `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within:g} s waiting for {what}")
        await asyncio.sleep(interval)


# ---------------------------------------------------------------- topics and groups
async def create_topics(bootstrap: str, names: list[str], partitions: int = 3) -> None:
    """Create topics (idempotently) so consumers can be assigned all partitions up front."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        new = [NewTopic(n, num_partitions=partitions, replication_factor=1) for n in names if n not in existing]
        if new:
            await admin.create_topics(new)
    finally:
        await admin.close()


async def topic_partitions(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    """Every partition of `topic`, as a started consumer's metadata knows them (refreshed once if empty)."""
    partitions = consumer.partitions_for_topic(topic)
    if not partitions:
        await consumer._client.force_metadata_update()
        partitions = consumer.partitions_for_topic(topic) or set()
    return [TopicPartition(topic, p) for p in sorted(partitions)]


async def start_group_at_end(bootstrap: str, group: str, topic: str) -> None:
    """Commit the current end offsets of `topic` for `group`, so a new worker skips the topic's history.

    MinIO's topic is shared and long; a test worker only needs what happens from now on.
    """
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = await topic_partitions(consumer, topic)
        ends = await consumer.end_offsets(tps)
        consumer.assign(tps)
        await consumer.commit({tp: ends[tp] for tp in tps})
    finally:
        await consumer.stop()


# ---------------------------------------------------------------- the worker process
@dataclass
class WorkerConfig:
    """The environment of a group of test workers (same group, topics and prefix)."""

    tag: str
    overrides: dict[str, str] = field(default_factory=dict)

    @property
    def group(self) -> str:
        return f"itest-ingest-{self.tag}"

    @property
    def uploads_topic(self) -> str:
        return f"itest.ingest.{self.tag}.uploads"

    @property
    def verdicts_topic(self) -> str:
        return f"itest.ingest.{self.tag}.verdicts"

    @property
    def dead_letter_topic(self) -> str:
        return f"itest.ingest.{self.tag}.dead-letter"

    @property
    def prefix(self) -> str:
        return f"itest-{self.tag}/uploads/"

    def env(self, port: int) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "INGEST_PORT": str(port),
                "INGEST_GROUP_ID": self.group,
                "INGEST_UPLOADS_TOPIC": self.uploads_topic,
                "INGEST_VERDICTS_TOPIC": self.verdicts_topic,
                "INGEST_DEAD_LETTER_TOPIC": self.dead_letter_topic,
                "INGEST_UPLOAD_PREFIX": self.prefix,
                "INGEST_OBJECT_GRACE_SECONDS": "3",
                "INGEST_STRAY_GRACE_SECONDS": "2",
                "INGEST_UPLOAD_TTL_SECONDS": "600",
                "INGEST_LEASE_SECONDS": "10",
                "INGEST_SWEEP_INTERVAL_SECONDS": "0.5",
                "LOG_LEVEL": "info",
            }
        )
        env.update(self.overrides)
        return env

    async def prepare(self, bootstrap: str) -> None:
        """Create the worker's topics and start its group at the end of MinIO's topic."""
        await create_topics(bootstrap, [self.uploads_topic, self.verdicts_topic, self.dead_letter_topic])
        await start_group_at_end(bootstrap, self.group, Topics.MINIO_EVENTS)


class IngestProcess:
    """A `uv run --no-sync registry-ingest` child in its own process group (so SIGKILL reaches python itself)."""

    def __init__(self, config: WorkerConfig, log_dir: Path, name: str) -> None:
        self.config = config
        self.port = free_port()
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                ["uv", "run", "--no-sync", "registry-ingest"],
                cwd=ROOT,
                env=self.config.env(self.port),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    async def health(self) -> dict[str, Any] | None:
        try:
            async with httpx.AsyncClient(timeout=2) as http:
                resp = await http.get(f"http://127.0.0.1:{self.port}/healthz")
            return resp.json() if resp.status_code == 200 else None
        except httpx.HTTPError:
            return None

    async def wait_ready(self, within: float = 60) -> dict[str, Any]:
        """Until /healthz answers and the consumer owns at least one partition."""

        async def ready() -> dict[str, Any] | None:
            assert self.proc is not None and self.proc.poll() is None, f"worker exited: {self.log_tail()}"
            h = await self.health()
            return h if h and h.get("partitions") else None

        return await eventually(ready, within, f"worker on :{self.port} to join its group")

    def kill(self) -> None:
        """SIGKILL the whole process group: no shutdown code runs."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM (graceful: in-flight work ends, leases are released), SIGKILL if it hangs."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        except ProcessLookupError:
            pass

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def log_lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
        return out


# ---------------------------------------------------------------- events in and out
@dataclass
class Upload:
    """One upload of a test: its identifiers and where its object lives."""

    prefix: str
    repo_id: str
    rfilename: str
    version: str = "1.0.0"
    upload_id: int = field(default_factory=lambda: random.randint(10**15, 2**62))

    @property
    def key(self) -> str:
        return f"{self.prefix}{self.repo_id}/{self.version}/{self.rfilename}"

    def initiated(self) -> UploadInitiated:
        return UploadInitiated(
            upload_id=self.upload_id,
            repo_id=self.repo_id,
            version=self.version,
            rfilename=self.rfilename,
            object_key=self.key,
            developer_id=7,
            expires_ts=int(time.time()) + 3600,
        )

    def completed(self, size: int, sha256: str) -> UploadCompleted:
        return UploadCompleted(
            upload_id=self.upload_id,
            repo_id=self.repo_id,
            version=self.version,
            rfilename=self.rfilename,
            object_key=self.key,
            developer_id=7,
            size=size,
            sha256=sha256,
        )


class EventBus:
    """The test's producer: publishes CloudEvents (key = subject) and raw bytes, acks=all."""

    def __init__(self, bootstrap: str) -> None:
        self.producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)

    async def start(self) -> None:
        await self.producer.start()

    async def stop(self) -> None:
        await self.producer.stop()

    async def publish(
        self,
        topic: str,
        data: Any,
        event: CloudEvent | None = None,
        headers: list[tuple[str, bytes | None]] | None = None,
    ) -> CloudEvent:
        event = event or make_event(data, source="/test")
        await self.producer.send_and_wait(topic, encode_event(event), key=event.key, headers=headers)
        return event

    async def publish_raw(self, topic: str, value: bytes, key: bytes | None) -> None:
        await self.producer.send_and_wait(topic, value, key=key)


async def committed_and_end_offsets(
    bootstrap: str, group: str, topic: str, partitions: int = 3
) -> dict[int, tuple[int, int]]:
    """For each partition of `topic`: (the offset `group` committed, -1 if none; the end offset)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await admin.start()
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        committed = await admin.list_consumer_group_offsets(group, partitions=tps)
        ends = await consumer.end_offsets(tps)
        return {tp.partition: (committed[tp].offset if tp in committed else -1, ends[tp]) for tp in tps}
    finally:
        await consumer.stop()
        await admin.close()


class TopicReader:
    """Reads a whole topic from its beginning in the background; tests wait for the records they expect."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.topic = topic
        self.consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
        self.records: list[Any] = []
        #: When each record arrived here (time.monotonic()), by (partition, offset).
        self.arrived: dict[tuple[int, int], float] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self, partitions: int = 3) -> None:
        await self.consumer.start()
        tps = [TopicPartition(self.topic, p) for p in range(partitions)]
        self.consumer.assign(tps)
        await self.consumer.seek_to_beginning(*tps)
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            batch = await self.consumer.getmany(timeout_ms=200)
            now = time.monotonic()
            for msgs in batch.values():
                self.records.extend(msgs)
                self.arrived.update({(m.partition, m.offset): now for m in msgs})

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.consumer.stop()

    def events(self) -> list[CloudEvent]:
        return [decode_event(r.value) for r in self.records]

    def verdicts_for(self, upload_id: int) -> list[CloudEvent]:
        return [e for e in self.events() if e.data.get("upload_id") == upload_id]

    def arrival_of(self, upload_id: int) -> float:
        """When the first verdict of an upload arrived (time.monotonic())."""
        for r in self.records:
            if decode_event(r.value).data.get("upload_id") == upload_id:
                return self.arrived[(r.partition, r.offset)]
        raise KeyError(upload_id)

    async def wait_verdict(self, upload_id: int, within: float = 30) -> CloudEvent:
        async def found() -> CloudEvent | None:
            got = self.verdicts_for(upload_id)
            return got[0] if got else None

        return await eventually(found, within, f"a verdict for upload {upload_id}")

    async def wait_event(self, pred: Callable[[CloudEvent], bool], what: str, within: float = 30) -> CloudEvent:
        async def found() -> CloudEvent | None:
            return next((e for e in self.events() if pred(e)), None)

        return await eventually(found, within, what)

    async def read_to_end(self, bootstrap: str, partitions: int = 3) -> list[Any]:
        """Every record of the topic up to its current end offsets (call once producers have stopped)."""
        tps = [TopicPartition(self.topic, p) for p in range(partitions)]
        ends = await self.consumer.end_offsets(tps)

        async def caught_up() -> bool:
            seen: dict[int, int] = {}
            for r in self.records:
                seen[r.partition] = max(seen.get(r.partition, -1), r.offset)
            return all(seen.get(tp.partition, -1) >= ends[tp] - 1 for tp in tps)

        await eventually(caught_up, 30, f"the end of {self.topic}")
        return list(self.records)


# ---------------------------------------------------------------- state in Postgres
async def upload_row(database_url: str, upload_id: int) -> dict[str, Any] | None:
    """ingest.uploads row of an upload, as a dict (None if ingest has not seen it)."""
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = conn.cursor(row_factory=psycopg.rows.dict_row)
        await cur.execute("SELECT * FROM ingest.uploads WHERE upload_id = %s", [upload_id])
        return await cur.fetchone()


async def object_row(database_url: str, key: str) -> dict[str, Any] | None:
    """ingest.objects row of an object key."""
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = conn.cursor(row_factory=psycopg.rows.dict_row)
        await cur.execute("SELECT * FROM ingest.objects WHERE object_key = %s", [key])
        return await cur.fetchone()


async def verdict_rows(database_url: str, dedupe_key: str) -> list[dict[str, Any]]:
    """ingest.verdicts rows claimed for an upload or stray."""
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = conn.cursor(row_factory=psycopg.rows.dict_row)
        await cur.execute("SELECT * FROM ingest.verdicts WHERE dedupe_key = %s", [dedupe_key])
        return await cur.fetchall()


async def forget_prefix(database_url: str, prefix: str) -> None:
    """Remove a test's rows from ingest's tables (the schema is shared with the stack's worker)."""
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        for table in ("uploads", "objects", "verdicts"):
            await conn.execute(f"DELETE FROM ingest.{table} WHERE starts_with(object_key, %s)", [prefix])


# ---------------------------------------------------------------- files
def safetensors_bytes(tensors: dict[str, tuple[str, list[int]]], metadata: dict[str, str] | None = None) -> bytes:
    """A valid safetensors file: for each name (dtype, shape), deterministic data of the right length."""
    widths = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "U8": 1}
    header: dict[str, Any] = {}
    data = bytearray()
    for name, (dtype, shape) in tensors.items():
        n = widths[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + n]}
        data += random.Random(name).randbytes(n)
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes
    return struct.pack("<Q", len(raw)) + raw + bytes(data)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class PatternStream(io.RawIOBase):
    """`size` deterministic pseudo-random bytes produced as they are read (never whole in memory).

    Hashes what it hands out, so `sha256` is known once the upload has read it all.
    """

    def __init__(self, size: int, seed: int = 1) -> None:
        self.size = size
        self.pos = 0
        self.block = random.Random(seed).randbytes(1 << 20)
        self._sha = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = self.size - self.pos
        n = min(n, self.size - self.pos)
        out = bytearray()
        while len(out) < n:
            off = (self.pos + len(out)) % len(self.block)
            out += self.block[off : off + n - len(out)]
        chunk = bytes(out)
        self._sha.update(chunk)
        self.pos += n
        return chunk

    @property
    def sha256(self) -> str:
        assert self.pos == self.size, "not read to the end"
        return self._sha.hexdigest()


# ---------------------------------------------------------------- a dependency that goes away
class TcpProxy:
    """A TCP proxy on loopback in front of a real server (Postgres), which a test can cut and restore: an
    outage of that server as one process sees it, while the rest of the stack keeps it."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers.difference_update((writer, up_writer))

    async def cut(self) -> None:
        """Refuse new connections and drop the open ones."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()

    async def restore(self) -> None:
        """Accept connections again, on the same port."""
        await self.start()
