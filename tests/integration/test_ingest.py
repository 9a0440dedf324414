"""The ingest worker against the real stack: real Kafka, real MinIO notifications, real Postgres.

The tests start their own `registry-ingest` processes (own group, topics and key prefix; see
ingest_helpers), play the api's part by publishing UploadInitiated/UploadCompleted, PUT objects into
MinIO, and read the verdicts the worker publishes.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiokafka.partitioner import murmur2
from ingest_helpers import (
    EventBus,
    IngestProcess,
    PatternStream,
    TopicReader,
    Upload,
    WorkerConfig,
    committed_and_end_offsets,
    eventually,
    forget_prefix,
    object_row,
    safetensors_bytes,
    sha256_hex,
    upload_row,
    verdict_rows,
)
from minio import Minio
from minio.error import S3Error

from registry_shared.events import CloudEvent, Topics, decode_event, encode_event, make_event
from registry_shared.storage import minio_client, quarantine_key

pytestmark = pytest.mark.timeout(150)

VALID_ST = safetensors_bytes({"embed.weight": ("F32", [64, 32]), "head.bias": ("F16", [32])}, metadata={"format": "pt"})


@dataclass
class Ingest:
    """One running test worker and everything a test needs around it."""

    config: WorkerConfig
    worker: IngestProcess
    bus: EventBus
    verdicts: TopicReader
    dead_letters: TopicReader
    client: Minio
    bucket: str
    database_url: str

    def upload(self, rfilename: str, repo: str | None = None) -> Upload:
        return Upload(self.config.prefix, repo or f"acme/m-{uuid.uuid4().hex[:6]}", rfilename)

    async def put(self, key: str, data: bytes) -> None:
        await asyncio.to_thread(self.client.put_object, self.bucket, key, io.BytesIO(data), len(data))

    def read(self, key: str) -> bytes | None:
        try:
            resp = self.client.get_object(self.bucket, key)
        except S3Error as exc:
            if exc.code == "NoSuchKey":
                return None
            raise
        try:
            return resp.read()
        finally:
            resp.close()
            resp.release_conn()

    async def initiate(self, up: Upload) -> CloudEvent:
        return await self.bus.publish(self.config.uploads_topic, up.initiated())

    async def complete(self, up: Upload, size: int, sha256: str) -> CloudEvent:
        return await self.bus.publish(self.config.uploads_topic, up.completed(size, sha256))

    async def submit(self, up: Upload, data: bytes, *, size: int | None = None, sha256: str | None = None) -> None:
        """The developer's happy path: initiate, PUT, complete (with declared values, correct by default)."""
        await self.initiate(up)
        await self.put(up.key, data)
        await self.complete(up, len(data) if size is None else size, sha256 or sha256_hex(data))

    async def object_recorded(self, key: str) -> None:
        """Until the worker has processed MinIO's notification for `key`."""

        async def seen() -> bool:
            row = await object_row(self.database_url, key)
            return bool(row and row["present"])

        await eventually(seen, 30, f"the worker to record the notification of {key}")


async def start_ingest(bootstrap: str, config: WorkerConfig, log_dir: Path, name: str) -> IngestProcess:
    worker = IngestProcess(config, log_dir, name)
    worker.start()
    try:
        await worker.wait_ready()
    except BaseException:
        worker.stop()
        raise
    return worker


@pytest.fixture(scope="module")
async def ingest(kafka_settings, minio_settings, pg_settings, tmp_path_factory):
    bootstrap = kafka_settings.kafka_bootstrap_servers
    config = WorkerConfig(tag=uuid.uuid4().hex[:8])
    await config.prepare(bootstrap)
    log_dir = tmp_path_factory.mktemp("ingest-logs")
    worker = await start_ingest(bootstrap, config, log_dir, "worker")
    bus, verdicts, dead = EventBus(bootstrap), TopicReader(bootstrap, config.verdicts_topic), None
    await bus.start()
    await verdicts.start()
    dead = TopicReader(bootstrap, config.dead_letter_topic)
    await dead.start()
    ctx = Ingest(
        config,
        worker,
        bus,
        verdicts,
        dead,
        minio_client(minio_settings),
        minio_settings.minio_bucket,
        pg_settings.database_url,
    )
    try:
        yield ctx
        # Audit of the whole module, once the worker has stopped (in-flight work finished): no upload and no
        # stray object ever got a second verdict, whatever duplicates and orderings the tests played.
        worker.stop()
        records = await verdicts.read_to_end(bootstrap)
        events = [decode_event(r.value) for r in records]
        subjects = [e.data["upload_id"] if "upload_id" in e.data else e.data["object_key"] for e in events]
        assert len(subjects) == len(set(subjects)), f"duplicate verdicts: {subjects}"
        assert len({e.id for e in events}) == len(events)
    finally:
        worker.stop()
        await verdicts.stop()
        await dead.stop()
        await bus.stop()
        await cleanup(ctx.client, ctx.bucket, config.prefix, pg_settings.database_url)


async def cleanup(client: Minio, bucket: str, prefix: str, database_url: str) -> None:
    for p in (prefix, quarantine_key(prefix)):
        for obj in client.list_objects(bucket, prefix=p, recursive=True):
            client.remove_object(bucket, obj.object_name)
    await forget_prefix(database_url, prefix)


# ---------------------------------------------------------------- verdicts
async def test_worker_health_reports_its_partitions(ingest):
    health = await ingest.worker.health()
    assert health["ok"] is True and health["service"] == "ingest"
    assert health["group"] == ingest.config.group
    assert f"{ingest.config.uploads_topic}:0" in health["partitions"]
    assert f"{Topics.MINIO_EVENTS}:0" in health["partitions"]


async def test_correct_safetensors_upload_is_verified(ingest):
    up = ingest.upload("model.safetensors")
    await ingest.submit(up, VALID_ST)

    verdict = await ingest.verdicts.wait_verdict(up.upload_id)
    assert verdict.type == "registry.upload.verified.v1"
    assert verdict.subject == up.repo_id and verdict.source == "/ingest"
    data = verdict.payload()
    assert data.size == len(VALID_ST)
    assert data.sha256 == sha256_hex(VALID_ST)
    assert data.etag  # MinIO's etag of the verified version
    assert (data.file_format, data.is_pickle) == ("safetensors", False)
    assert (data.object_key, data.repo_id, data.rfilename) == (up.key, up.repo_id, up.rfilename)
    # A verified object stays where it is.
    assert ingest.read(up.key) == VALID_ST
    assert ingest.read(quarantine_key(up.key)) is None


async def test_pickle_upload_is_verified_and_flagged(ingest):
    up = ingest.upload("pytorch_model.bin")
    body = b"\x80\x04\x95" + bytes(range(256)) * 40
    await ingest.submit(up, body)

    data = (await ingest.verdicts.wait_verdict(up.upload_id)).payload()
    assert type(data).__name__ == "UploadVerified"
    assert (data.file_format, data.is_pickle) == ("pickle", True)


def _truncated_header() -> bytes:
    # The 8-byte length announces 4 KiB of JSON header, but the file ends after 100 bytes of it.
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    return (4096).to_bytes(8, "little") + (header + b" " * 100)[:100]


@pytest.mark.parametrize(
    ("name", "body", "declare", "reason"),
    [
        ("model.safetensors", VALID_ST, {"sha256": "0" * 64}, "sha256_mismatch"),
        ("model.safetensors", VALID_ST, {"size": len(VALID_ST) + 1}, "size_mismatch"),
        ("model.safetensors", _truncated_header(), {}, "bad_safetensors_header"),
    ],
    ids=["wrong-sha256", "wrong-size", "truncated-safetensors-header"],
)
async def test_bad_upload_is_rejected_and_quarantined(ingest, name, body, declare, reason):
    up = ingest.upload(name)
    await ingest.submit(up, body, **declare)

    verdict = await ingest.verdicts.wait_verdict(up.upload_id)
    assert verdict.type == "registry.upload.rejected.v1"
    data = verdict.payload()
    assert data.reason == reason
    assert data.detail
    assert data.quarantine_key == quarantine_key(up.key)
    # Moved before the verdict was published: gone from its key, kept byte for byte in quarantine.
    assert ingest.read(up.key) is None
    assert ingest.read(data.quarantine_key) == body


async def test_missing_object_is_rejected_after_the_grace_period(ingest):
    up = ingest.upload("never-uploaded.safetensors")
    await ingest.initiate(up)
    sent = await ingest.complete(up, len(VALID_ST), sha256_hex(VALID_ST))

    verdict = await ingest.verdicts.wait_verdict(up.upload_id, within=40)
    data = verdict.payload()
    assert verdict.type == "registry.upload.rejected.v1"
    assert (data.reason, data.quarantine_key) == ("object_missing", None)
    # Not before the grace period (3 s in these tests) had passed since complete.
    assert (verdict.time - sent.time).total_seconds() >= 3


async def test_stray_object_is_quarantined(ingest):
    key = f"{ingest.config.prefix}acme/nobody/1.0.0/stray.bin"
    body = b"no upload behind this" * 100
    await ingest.put(key, body)

    event = await ingest.verdicts.wait_event(
        lambda e: e.type == "registry.object.quarantined.v1" and e.data["object_key"] == key, "ObjectQuarantined"
    )
    data = event.payload()
    assert event.subject == key
    assert (data.quarantine_key, data.size, data.reason) == (quarantine_key(key), len(body), "stray_object")
    assert ingest.read(key) is None
    assert ingest.read(quarantine_key(key)) == body


async def test_upload_never_completed_expires_and_its_object_is_removed(ingest, kafka_settings, tmp_path):
    # A worker of its own with a short TTL (same topics/prefix would share work: use a separate tag).
    config = WorkerConfig(tag=uuid.uuid4().hex[:8], overrides={"INGEST_UPLOAD_TTL_SECONDS": "4"})
    await config.prepare(kafka_settings.kafka_bootstrap_servers)
    worker = await start_ingest(kafka_settings.kafka_bootstrap_servers, config, tmp_path, "ttl")
    reader = TopicReader(kafka_settings.kafka_bootstrap_servers, config.verdicts_topic)
    await reader.start()
    try:
        up = Upload(config.prefix, "acme/slow", "model.safetensors")
        await ingest.bus.publish(config.uploads_topic, up.initiated())
        await ingest.put(up.key, VALID_ST)

        verdict = await reader.wait_verdict(up.upload_id, within=40)
        data = verdict.payload()
        assert (data.reason, data.quarantine_key) == ("expired", None)
        assert ingest.read(up.key) is None
        # A complete that arrives after the expiry changes nothing.
        await ingest.bus.publish(config.uploads_topic, up.completed(len(VALID_ST), sha256_hex(VALID_ST)))
        barrier = Upload(config.prefix, "acme/slow", "barrier.bin")
        await ingest.bus.publish(config.uploads_topic, barrier.initiated())
        await ingest.put(barrier.key, b"barrier")
        await ingest.bus.publish(config.uploads_topic, barrier.completed(7, sha256_hex(b"barrier")))
        await reader.wait_verdict(barrier.upload_id)
        assert len(reader.verdicts_for(up.upload_id)) == 1
    finally:
        worker.stop()
        await reader.stop()
        await cleanup(ingest.client, ingest.bucket, config.prefix, ingest.database_url)


# ---------------------------------------------------------------- ordering and duplicates
@pytest.mark.parametrize("declared_ok", [True, False], ids=["good-file", "bad-sha256"])
async def test_same_verdict_whether_complete_comes_before_or_after_the_object(ingest, declared_ok):
    sha = sha256_hex(VALID_ST) if declared_ok else "f" * 64
    repo = f"acme/order-{uuid.uuid4().hex[:6]}"
    late_object = Upload(ingest.config.prefix, repo, "a.safetensors")
    late_complete = Upload(ingest.config.prefix, repo, "b.safetensors")

    # complete first: the object is not there yet; the worker waits for MinIO's notification.
    await ingest.initiate(late_object)
    await ingest.complete(late_object, len(VALID_ST), sha)

    async def waiting() -> bool:
        row = await upload_row(ingest.database_url, late_object.upload_id)
        return bool(row and row["missing_since"] is not None)

    await eventually(waiting, 30, "the worker to find the object missing")
    await ingest.put(late_object.key, VALID_ST)

    # object first: the worker has the notification before complete arrives.
    await ingest.initiate(late_complete)
    await ingest.put(late_complete.key, VALID_ST)
    await ingest.object_recorded(late_complete.key)
    await ingest.complete(late_complete, len(VALID_ST), sha)

    a = (await ingest.verdicts.wait_verdict(late_object.upload_id)).payload()
    b = (await ingest.verdicts.wait_verdict(late_complete.upload_id)).payload()
    expected = "UploadVerified" if declared_ok else "UploadRejected"
    assert type(a).__name__ == type(b).__name__ == expected
    ignore = {"upload_id", "rfilename", "object_key", "quarantine_key", "detail"}
    assert a.model_dump(exclude=ignore) == b.model_dump(exclude=ignore)
    if not declared_ok:
        assert a.reason == b.reason == "sha256_mismatch"


async def test_duplicate_and_redelivered_complete_give_exactly_one_verdict(ingest):
    up = ingest.upload("model.safetensors")
    await ingest.initiate(up)
    await ingest.put(up.key, VALID_ST)
    first = make_event(up.completed(len(VALID_ST), sha256_hex(VALID_ST)), source="/test")
    await ingest.bus.publish(ingest.config.uploads_topic, None, event=first)
    await ingest.bus.publish(ingest.config.uploads_topic, None, event=first)  # the same event redelivered
    # A second complete with another id and conflicting values: the first complete wins.
    await ingest.complete(up, len(VALID_ST), "0" * 64)
    await ingest.bus.publish(ingest.config.uploads_topic, None, event=first)

    verdict = await ingest.verdicts.wait_verdict(up.upload_id)
    assert verdict.type == "registry.upload.verified.v1"
    row = await upload_row(ingest.database_url, up.upload_id)
    assert row["completed_event_id"] == first.id

    # A barrier on the same partition (same key): once its verdict is out, every duplicate before it was handled.
    barrier = ingest.upload("barrier.bin", repo=up.repo_id)
    await ingest.submit(barrier, b"barrier")
    await ingest.verdicts.wait_verdict(barrier.upload_id)
    assert [v.id for v in ingest.verdicts.verdicts_for(up.upload_id)] == [verdict.id]
    assert len(await verdict_rows(ingest.database_url, f"upload:{up.upload_id}")) == 1


async def test_poison_messages_are_dead_lettered_and_the_worker_keeps_going(ingest, kafka_settings):
    """Each kind of poison on the uploads topic, then a good upload on the same partition (same key): every
    poison is dead-lettered with its error and source, the good upload is verified, and the group's committed
    offset moves past all of them."""
    bootstrap = kafka_settings.kafka_bootstrap_servers
    topic = ingest.config.uploads_topic
    repo = f"acme/poison-{uuid.uuid4().hex[:6]}"
    envelope = {"specversion": "1.0", "source": "/test", "subject": repo, "type": "registry.upload.completed.v1"}
    first = ingest.upload("first.safetensors", repo=repo)
    await ingest.initiate(first)  # recorded for its own object key
    contradicting = first.completed(len(VALID_ST), sha256_hex(VALID_ST)).model_copy(
        update={"object_key": f"{ingest.config.prefix}{repo}/1.0.0/another-file.safetensors"}
    )
    poisons = [
        (b"\xff not json {", "not a CloudEvent: invalid JSON"),
        (json.dumps({**envelope, "id": str(uuid.uuid4()), "data": {"upload_id": "nope"}}).encode(), "upload_id"),
        (
            json.dumps({**envelope, "id": "not-a-uuid", "data": first.completed(1, "0" * 64).model_dump()}).encode(),
            "event id is not a UUID",
        ),
        (
            encode_event(make_event(contradicting, source="/test")),
            f"upload {first.upload_id} is recorded for object {first.key!r}",
        ),
    ]
    for value, _ in poisons:
        await ingest.bus.publish_raw(topic, value, key=repo.encode())

    up = ingest.upload("after-poison.safetensors", repo=repo)
    await ingest.submit(up, VALID_ST)
    verdict = await ingest.verdicts.wait_verdict(up.upload_id)
    assert verdict.type == "registry.upload.verified.v1"

    async def all_parked() -> list:
        mine = [r for r in ingest.dead_letters.records if r.key == repo.encode()]
        return mine if len(mine) >= len(poisons) else []

    parked = await eventually(all_parked, 30, "a dead letter for every poison")
    assert [r.value for r in parked] == [value for value, _ in poisons]
    partition = parked[0].partition
    offsets = []
    for r, (_, error) in zip(parked, poisons, strict=True):
        headers = {k: v.decode() for k, v in r.headers}
        assert headers["source_topic"] == topic
        assert headers["consumer_group"] == ingest.config.group
        assert headers["consumer"] == "ingest-uploads"
        assert headers["error"].startswith("PoisonMessage: " if "recorded for" in error else "PermanentError: ")
        assert error in headers["error"], headers["error"]
        offsets.append(int(headers["source_offset"]))
    assert offsets == sorted(offsets)
    assert len({r.partition for r in parked}) == 1 and partition == parked[-1].partition

    async def committed_past_all() -> bool:
        source = int(dict(parked[0].headers)["source_partition"])
        committed, end = (await committed_and_end_offsets(bootstrap, ingest.config.group, topic))[source]
        return committed > offsets[-1] and committed == end

    await eventually(committed_past_all, 30, "the group's offset to move past the poisons and the good upload")
    row = await upload_row(ingest.database_url, first.upload_id)
    assert row is not None and row["completed_at"] is None  # the contradicting complete changed nothing


async def test_poison_notifications_are_dead_lettered_too(ingest, minio_settings):
    """MinIO's topic: a record under the worker's prefix that is not an S3 event record is dead-lettered (the
    stack's own ingest, and other tests' workers, skip it by its key), and the worker goes on."""
    key = f"{minio_settings.minio_bucket}/{ingest.config.prefix}junk-{uuid.uuid4().hex[:6]}".encode()
    await ingest.bus.publish_raw(Topics.MINIO_EVENTS, b'{"Records": "not a list"}', key=key)

    async def parked() -> list:
        return [r for r in ingest.dead_letters.records if r.key == key]

    (letter,) = await eventually(parked, 30, "the junk notification's dead letter")
    headers = {k: v.decode() for k, v in letter.headers}
    assert headers["source_topic"] == Topics.MINIO_EVENTS
    assert headers["consumer"] == "ingest-minio"
    assert "undecodable MinIO notification" in headers["error"]
    up = ingest.upload("after-junk.safetensors")
    await ingest.submit(up, VALID_ST)
    assert (await ingest.verdicts.wait_verdict(up.upload_id)).type == "registry.upload.verified.v1"


async def test_an_object_key_the_store_cannot_hold_ends_in_a_rejection(ingest):
    """An upload whose object key is over S3's 1,024 bytes can never be read: instead of retrying its
    verification without end, the worker rejects it as `unverifiable`, with the reason."""
    up = ingest.upload("x" * 1100 + ".safetensors")
    await ingest.initiate(up)
    await ingest.complete(up, len(VALID_ST), sha256_hex(VALID_ST))
    verdict = await ingest.verdicts.wait_verdict(up.upload_id, within=60)
    assert verdict.type == "registry.upload.rejected.v1"
    assert verdict.data["reason"] == "unverifiable"
    assert "object key is" in verdict.data["detail"] and "1024" in verdict.data["detail"]
    row = await upload_row(ingest.database_url, up.upload_id)
    assert row is not None and row["verdict"] == "rejected" and row["reason"] == "unverifiable"


async def test_health_lists_the_consumers_and_the_sweeper(ingest):
    health = await ingest.worker.health()
    assert health is not None and health["ok"] is True
    consumers = health["consumers"]
    assert {"ingest-uploads", "ingest-minio", "ingest-sweeper"} <= set(consumers)
    assert consumers["ingest-uploads"]["dead_lettered"] >= 0
    assert all(c["state"] in ("ok", "starting", "retrying") for c in consumers.values())


async def test_a_message_whose_headers_are_not_text_is_still_handled(ingest):
    # FastStream decodes header values as UTF-8: a record with binary (or null) header values must still be
    # judged, not dropped before it reaches the handler.
    up = ingest.upload("binary-headers.safetensors")
    odd = [("trace", b"\xff\xfe\x00binary"), ("empty", None)]
    await ingest.bus.publish(ingest.config.uploads_topic, up.initiated(), headers=odd)
    await ingest.put(up.key, VALID_ST)
    await ingest.bus.publish(
        ingest.config.uploads_topic, up.completed(len(VALID_ST), sha256_hex(VALID_ST)), headers=odd
    )

    verdict = await ingest.verdicts.wait_verdict(up.upload_id)
    assert verdict.type == "registry.upload.verified.v1"


async def test_offsets_are_committed_once_the_verdict_is_out(ingest, kafka_settings):
    up = ingest.upload("committed.safetensors")
    await ingest.submit(up, VALID_ST)
    await ingest.verdicts.wait_verdict(up.upload_id)

    # Every uploads message sent so far has been handled: the group's commits reach the end of each partition
    # (a partition no message went to has nothing to commit).
    seen: dict[int, tuple[int, int]] = {}

    async def all_committed() -> bool:
        seen.update(
            await committed_and_end_offsets(
                kafka_settings.kafka_bootstrap_servers, ingest.config.group, ingest.config.uploads_topic
            )
        )
        return all(committed == end or (end == 0 and committed < 0) for committed, end in seen.values())

    try:
        await eventually(all_committed, 30, "the group's commits to reach the end of the uploads topic")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; (committed, end) by partition: {seen}") from None


# ---------------------------------------------------------------- scale-out and crashes
def repos_per_partition(each: int, partitions: int = 3) -> list[str]:
    """Repo ids (message keys) spread evenly over the partitions by Kafka's default partitioner (murmur2)."""
    buckets: dict[int, list[str]] = {p: [] for p in range(partitions)}
    i = 0
    while any(len(b) < each for b in buckets.values()):
        repo = f"acme/pair-{uuid.uuid4().hex[:6]}-{i}"
        part = (murmur2(repo.encode()) & 0x7FFFFFFF) % partitions
        if len(buckets[part]) < each:
            buckets[part].append(repo)
        i += 1
    return [r for b in buckets.values() for r in b]


async def test_two_workers_in_one_group_give_exactly_one_verdict_per_upload(ingest, kafka_settings, tmp_path):
    bootstrap = kafka_settings.kafka_bootstrap_servers
    config = WorkerConfig(tag=uuid.uuid4().hex[:8])
    await config.prepare(bootstrap)
    workers = [IngestProcess(config, tmp_path, f"w{i}") for i in range(2)]
    reader = TopicReader(bootstrap, config.verdicts_topic)
    await reader.start()
    try:
        for w in workers:
            w.start()

        async def shared() -> bool:
            parts = [set((await w.wait_ready()).get("partitions", [])) for w in workers]
            return all(parts) and not (parts[0] & parts[1]) and len(parts[0] | parts[1]) == 6

        await eventually(shared, 60, "both workers to share the six partitions")
        uploads = [Upload(config.prefix, repo, "model.safetensors") for repo in repos_per_partition(6)]
        for i, up in enumerate(uploads):
            await ingest.bus.publish(config.uploads_topic, up.initiated())
            if i % 2:  # half complete before the object exists, half after
                await ingest.bus.publish(config.uploads_topic, up.completed(len(VALID_ST), sha256_hex(VALID_ST)))
                await ingest.put(up.key, VALID_ST)
            else:
                await ingest.put(up.key, VALID_ST)
                await ingest.bus.publish(config.uploads_topic, up.completed(len(VALID_ST), sha256_hex(VALID_ST)))
        for up in uploads:
            assert (await reader.wait_verdict(up.upload_id, within=60)).type == "registry.upload.verified.v1"
        for w in workers:
            w.stop()
        records = await reader.read_to_end(bootstrap)
        ids = [json.loads(r.value)["data"]["upload_id"] for r in records]
        assert sorted(ids) == sorted(up.upload_id for up in uploads)  # exactly one each, nothing else
        # Both processes did part of the work (each owns uploads partitions, and every partition has uploads).
        verifiers = {w.log_path.name for w in workers if any(x["msg"] == "verdict published" for x in w.log_lines())}
        assert verifiers == {"w0.log", "w1.log"}
    finally:
        for w in workers:
            w.stop()
        await reader.stop()
        await cleanup(ingest.client, ingest.bucket, config.prefix, ingest.database_url)


async def _verification_under_way(ingest, config: WorkerConfig, repo: str, size: int, seed: int):
    """Upload `size` pattern bytes under `repo`, complete it, and wait until a worker is part-way through
    verifying it. Returns (upload, its stream, the `complete` message as published)."""
    up = Upload(config.prefix, repo, "model.bin")
    stream = PatternStream(size, seed=seed)
    await ingest.bus.publish(config.uploads_topic, up.initiated())
    await asyncio.to_thread(ingest.client.put_object, ingest.bucket, up.key, stream, size, part_size=16 * 1024 * 1024)
    completed = await ingest.bus.publish(config.uploads_topic, up.completed(size, stream.sha256))

    async def under_way() -> bool:
        row = await upload_row(ingest.database_url, up.upload_id)
        return bool(row and row["lease_owner"] and 0 < row["bytes_read"] < size)

    await eventually(under_way, 60, "the verification to be under way", interval=0.05)
    return up, stream, completed


async def _complete_not_committed(bootstrap: str, config: WorkerConfig, completed) -> bool:
    partition = (murmur2(completed.key) & 0x7FFFFFFF) % 3
    committed, end = (await committed_and_end_offsets(bootstrap, config.group, config.uploads_topic))[partition]
    return committed < end


async def _one_verified_verdict_after_restart(bootstrap, config, reader, tmp_path, name, up, size, stream):
    second = await start_ingest(bootstrap, config, tmp_path, name)
    try:
        verdict = await reader.wait_verdict(up.upload_id, within=90)
        assert verdict.type == "registry.upload.verified.v1"
        assert (verdict.data["size"], verdict.data["sha256"]) == (size, stream.sha256)
    finally:
        second.stop()
    records = await reader.read_to_end(bootstrap)
    assert [json.loads(r.value)["id"] for r in records] == [verdict.id]


async def test_sigkill_during_a_large_verification_then_restart_gives_one_verdict(ingest, kafka_settings, tmp_path):
    bootstrap = kafka_settings.kafka_bootstrap_servers
    # Reads capped at 100 MB/s so the 400 MB verification is reliably in flight when the worker dies;
    # a short lease so the restarted worker takes the dead one's work over quickly.
    config = WorkerConfig(
        tag=uuid.uuid4().hex[:8], overrides={"INGEST_MAX_READ_MBPS": "100", "INGEST_LEASE_SECONDS": "4"}
    )
    await config.prepare(bootstrap)
    reader = TopicReader(bootstrap, config.verdicts_topic)
    await reader.start()
    first = await start_ingest(bootstrap, config, tmp_path, "before-kill")
    try:
        size = 400 * 1024 * 1024
        up, stream, completed = await _verification_under_way(ingest, config, "acme/large", size, seed=42)
        first.kill()
        row = await upload_row(ingest.database_url, up.upload_id)
        assert row["verdict"] is None, "the worker finished before it could be killed"
        assert reader.verdicts_for(up.upload_id) == []
        # The complete being verified was never committed (the initiate before it may have been).
        assert await _complete_not_committed(bootstrap, config, completed)
        await _one_verified_verdict_after_restart(bootstrap, config, reader, tmp_path, "after-kill", up, size, stream)
        assert len(await verdict_rows(ingest.database_url, f"upload:{up.upload_id}")) == 1
    finally:
        first.stop()
        await reader.stop()
        await cleanup(ingest.client, ingest.bucket, config.prefix, ingest.database_url)


async def test_sigterm_during_a_large_verification_hands_the_work_back(ingest, kafka_settings, tmp_path):
    bootstrap = kafka_settings.kafka_bootstrap_servers
    # Reads capped at 40 MB/s: the 200 MiB verification outlasts the 1 s shutdown grace, so it is abandoned.
    config = WorkerConfig(
        tag=uuid.uuid4().hex[:8], overrides={"INGEST_MAX_READ_MBPS": "40", "INGEST_SHUTDOWN_TIMEOUT_SECONDS": "1"}
    )
    await config.prepare(bootstrap)
    reader = TopicReader(bootstrap, config.verdicts_topic)
    await reader.start()
    first = await start_ingest(bootstrap, config, tmp_path, "before-term")
    try:
        size = 200 * 1024 * 1024
        up, stream, completed = await _verification_under_way(ingest, config, "acme/term", size, seed=43)
        t0 = time.monotonic()
        first.stop()  # SIGTERM; SIGKILL only if it has not exited after 30 s
        assert time.monotonic() - t0 < 15, "the worker did not shut down within its grace period"
        assert any(x["msg"] == "ingest stopped" for x in first.log_lines()), first.log_tail()
        # Handed back: no verdict, no lease, and the complete being verified not committed.
        row = await upload_row(ingest.database_url, up.upload_id)
        assert row["verdict"] is None and row["lease_owner"] is None
        assert reader.verdicts_for(up.upload_id) == []
        assert await _complete_not_committed(bootstrap, config, completed)
        await _one_verified_verdict_after_restart(bootstrap, config, reader, tmp_path, "after-term", up, size, stream)
    finally:
        first.stop()
        await reader.stop()
        await cleanup(ingest.client, ingest.bucket, config.prefix, ingest.database_url)
