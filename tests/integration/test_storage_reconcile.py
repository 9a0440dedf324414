"""Verification without bucket notifications (STORAGE_NOTIFICATIONS=none), against the real stack's MinIO.

The test worker does not consume MinIO's notification topic at all (MinIO still sends them; nobody here
reads them): an upload is verified through the api's `upload.completed` and a read of the object, strays
are found by the reconciler's bounded listing (ListObjectsV2, a page of 2 keys per request here, so a pass
takes several requests) and quarantined, and objects that disappear are recorded as vanished.
"""

from __future__ import annotations

import asyncio
import io
import time
import uuid

import pytest
from ingest_helpers import (
    EventBus,
    IngestProcess,
    TopicReader,
    Upload,
    WorkerConfig,
    eventually,
    forget_prefix,
    object_row,
    safetensors_bytes,
    sha256_hex,
)

from registry_shared.events import Topics
from registry_shared.storage import minio_client, quarantine_key

pytestmark = pytest.mark.timeout(150)

VALID_ST = safetensors_bytes({"w": ("F32", [16, 8])}, metadata={"format": "pt"})
#: The reconciler's settings in these tests: a page every 0.5 s, 2 keys a page.
INTERVAL, PAGE = 0.5, 2


@pytest.fixture(scope="module")
async def ingest(kafka_settings, minio_settings, pg_settings, tmp_path_factory):
    bootstrap = kafka_settings.kafka_bootstrap_servers
    config = WorkerConfig(
        tag=uuid.uuid4().hex[:8],
        overrides={
            "STORAGE_NOTIFICATIONS": "none",
            "INGEST_RECONCILE_INTERVAL_SECONDS": str(INTERVAL),
            "INGEST_RECONCILE_PAGE_SIZE": str(PAGE),
        },
    )
    await config.prepare(bootstrap)
    worker = IngestProcess(config, tmp_path_factory.mktemp("ingest-logs"), "worker")
    worker.start()
    bus, verdicts = EventBus(bootstrap), TopicReader(bootstrap, config.verdicts_topic)
    client, bucket = minio_client(minio_settings), minio_settings.minio_bucket
    try:
        await worker.wait_ready()
        await bus.start()
        await verdicts.start()
        yield config, worker, bus, verdicts, client, bucket, pg_settings.database_url
    finally:
        worker.stop()
        await verdicts.stop()
        await bus.stop()
        for p in (config.prefix, quarantine_key(config.prefix)):
            for obj in client.list_objects(bucket, prefix=p, recursive=True):
                client.remove_object(bucket, obj.object_name)
        await forget_prefix(pg_settings.database_url, config.prefix)


async def put(client, bucket: str, key: str, data: bytes) -> None:
    await asyncio.to_thread(client.put_object, bucket, key, io.BytesIO(data), len(data))


def read(client, bucket: str, key: str) -> bytes | None:
    try:
        resp = client.get_object(bucket, key)
    except Exception:
        return None
    try:
        return resp.read()
    finally:
        resp.close()
        resp.release_conn()


async def test_worker_reads_no_notifications(ingest):
    config, worker, *_ = ingest
    health = await worker.health()
    assert health["ok"] is True and health["notifications"] == "none"
    assert not any(p.startswith(f"{Topics.MINIO_EVENTS}:") for p in health["partitions"])
    assert any(p.startswith(f"{config.uploads_topic}:") for p in health["partitions"])
    assert "ingest-minio" not in health["consumers"] and "ingest-reconciler" in health["consumers"]


async def test_upload_is_verified_through_complete(ingest):
    config, _, bus, verdicts, client, bucket, _ = ingest
    up = Upload(config.prefix, f"acme/m-{uuid.uuid4().hex[:6]}", "model.safetensors")
    await bus.publish(config.uploads_topic, up.initiated())
    await put(client, bucket, up.key, VALID_ST)
    await bus.publish(config.uploads_topic, up.completed(len(VALID_ST), sha256_hex(VALID_ST)))

    verdict = await verdicts.wait_verdict(up.upload_id)
    assert verdict.type == "registry.upload.verified.v1"
    assert verdict.payload().sha256 == sha256_hex(VALID_ST)
    assert read(client, bucket, up.key) == VALID_ST


async def test_bad_upload_is_rejected_and_quarantined(ingest):
    config, _, bus, verdicts, client, bucket, _ = ingest
    up = Upload(config.prefix, f"acme/m-{uuid.uuid4().hex[:6]}", "model.safetensors")
    await bus.publish(config.uploads_topic, up.initiated())
    await put(client, bucket, up.key, VALID_ST)
    await bus.publish(config.uploads_topic, up.completed(len(VALID_ST), "0" * 64))

    data = (await verdicts.wait_verdict(up.upload_id)).payload()
    assert (data.reason, data.quarantine_key) == ("sha256_mismatch", quarantine_key(up.key))
    assert read(client, bucket, up.key) is None
    assert read(client, bucket, quarantine_key(up.key)) == VALID_ST


async def test_missing_object_is_rejected_after_the_grace_period(ingest):
    config, _, bus, verdicts, *_ = ingest
    up = Upload(config.prefix, f"acme/m-{uuid.uuid4().hex[:6]}", "never.safetensors")
    await bus.publish(config.uploads_topic, up.initiated())
    sent = await bus.publish(config.uploads_topic, up.completed(len(VALID_ST), sha256_hex(VALID_ST)))

    verdict = await verdicts.wait_verdict(up.upload_id, within=40)
    assert verdict.payload().reason == "object_missing"
    assert (verdict.time - sent.time).total_seconds() >= 3


async def test_strays_are_quarantined_within_the_reconciliation_period(ingest):
    config, _, _, verdicts, client, bucket, database_url = ingest
    # Five strays: with 2 keys a page, one pass over them takes 3 listings.
    keys = [f"{config.prefix}acme/nobody/1.0.0/stray-{i}.bin" for i in range(5)]
    started = time.monotonic()
    for i, key in enumerate(keys):
        await put(client, bucket, key, b"no upload behind this %d" % i)

    for i, key in enumerate(keys):
        event = await verdicts.wait_event(
            lambda e, k=key: e.type == "registry.object.quarantined.v1" and e.data["object_key"] == k,
            f"ObjectQuarantined of {key}",
            within=60,
        )
        assert event.payload().quarantine_key == quarantine_key(key)
        assert read(client, bucket, quarantine_key(key)) == b"no upload behind this %d" % i
        assert read(client, bucket, key) is None
        row = await object_row(database_url, key)
        assert row is not None and row["event_name"].startswith("reconcile:")  # found by listing, not notified
    elapsed = time.monotonic() - started
    # Bound: a full pass (every key listed, at most ceil(n/page)+1 listings) + the stray grace (2 s) + the
    # sweep interval, with slack for this loaded machine.
    assert elapsed < 30, f"strays took {elapsed:.1f} s"


async def test_vanished_object_is_recorded_as_removed(ingest):
    config, _, bus, _, client, bucket, database_url = ingest
    # An upload in progress keeps its object from being a stray while the reconciler sees it.
    up = Upload(config.prefix, f"acme/m-{uuid.uuid4().hex[:6]}", "gone.bin")
    await bus.publish(config.uploads_topic, up.initiated())
    await put(client, bucket, up.key, b"soon gone")

    async def listed() -> bool:
        row = await object_row(database_url, up.key)
        return bool(row and row["present"] and row["listed_at"] is not None)

    await eventually(listed, 30, "the reconciler to list the object")
    await asyncio.to_thread(client.remove_object, bucket, up.key)

    async def vanished() -> dict | None:
        row = await object_row(database_url, up.key)
        return row if row and not row["present"] else None

    row = await eventually(vanished, 30, "the reconciler to record the object as vanished")
    assert row["event_name"] == "reconcile:vanished"
