"""Stopping Kafka during a burst of requests loses no event: the api keeps answering, the outbox holds
the events (domain and access events), and every one reaches its topic once Kafka is back."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import psycopg
from aiokafka import AIOKafkaConsumer, TopicPartition
from conftest import SEED_FILE, seed_file

from registry_shared.devstack import TOPIC_PARTITIONS
from registry_shared.events import FileAccessed, Topics, decode_event

STACK = Path(__file__).resolve().parents[2] / "deploy/local/stack.sh"


async def stack(*args: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        "bash", str(STACK), *args, env=os.environ, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    _, err = await asyncio.wait_for(proc.communicate(), timeout=180)
    assert proc.returncode == 0, err.decode()[-2000:]


def pending(pg_settings, topic: str = Topics.USERS) -> int:
    """Rows of `topic` still in the outbox (the relay deletes what Kafka acknowledged)."""
    with psycopg.connect(pg_settings.database_url) as conn:
        return conn.execute("select count(*) from outbox where topic = %s", [topic]).fetchone()[0]


async def relay_readiness(api_base_url: str) -> tuple[int, str | None]:
    """(/readyz status, why the outbox relay is not ready or None)."""
    async with httpx.AsyncClient(base_url=api_base_url, timeout=30) as http:
        r = await http.get("/readyz")
    return r.status_code, r.json()["not_ready"].get("outbox-relay")


async def test_kafka_outage_loses_no_event(registry, api_base_url, kafka_settings, pg_settings, minio_settings):
    dev = registry.register("OutageDev")
    repo = registry.create_model(dev, "private")
    registry.create_version(dev, repo, "v1")
    seed_file(pg_settings, minio_settings, repo, "v1")
    download = f"/v1/files/{repo}/{SEED_FILE}/download"
    assert registry.http.get(download, headers=dev.headers).status_code == 200  # lookups cached before the outage

    # A group id (never committed to) keeps aiokafka on its group coordinator, whose stop() is clean.
    consumer = AIOKafkaConsumer(
        bootstrap_servers=kafka_settings.kafka_bootstrap_servers,
        group_id=f"outage-test-{uuid.uuid4().hex[:8]}",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        parts = [TopicPartition(t, p) for t in (Topics.USERS, Topics.ACCESS) for p in range(TOPIC_PARTITIONS[t])]
        consumer.assign(parts)
        await consumer.seek_to_end(*parts)
        for tp in parts:
            await consumer.position(tp)  # fix the starting point before the outage

        await stack("down", "kafka")
        try:
            t0 = time.monotonic()
            emails = {(await asyncio.to_thread(registry.register, f"Outage{i}")).email for i in range(60)}
            for _ in range(40):
                r = await asyncio.to_thread(registry.http.get, download, headers=dev.headers)
                assert r.status_code == 200, r.text
            burst = time.monotonic() - t0
            assert burst < 30, f"requests slowed down while Kafka was away: {burst:.1f}s for 100"
            assert pending(pg_settings) >= 60
            deadline = time.monotonic() + 15  # access events are written to the outbox in batches
            while pending(pg_settings, Topics.ACCESS) < 40:
                assert time.monotonic() < deadline, "downloads made while Kafka was away are not in the outbox"
                await asyncio.sleep(0.2)
            deadline = time.monotonic() + 60
            while (ready := await relay_readiness(api_base_url))[1] is None:
                assert time.monotonic() < deadline, "/readyz does not say the relay cannot publish"
                await asyncio.sleep(0.5)
            assert ready[0] == 503 and ("stalled" in ready[1] or "retrying" in ready[1]), ready
        finally:
            await stack("up", "kafka")

        seen: dict[str, int] = {}
        downloads: dict[str, int] = {}

        def count(records) -> None:
            for msg in records:
                event = decode_event(msg.value)
                if event.type == "registry.user.registered.v1" and event.data["email"] in emails:
                    seen[event.data["email"]] = seen.get(event.data["email"], 0) + 1
                elif event.type == FileAccessed.event_type and event.data.get("repo_id") == repo:
                    downloads[event.id] = downloads.get(event.id, 0) + 1

        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and (set(seen) != emails or len(downloads) < 40):
            for records in (await consumer.getmany(timeout_ms=500)).values():
                count(records)
        for records in (await consumer.getmany(timeout_ms=1000)).values():  # anything published twice?
            count(records)
    finally:
        await consumer.stop()

    assert set(seen) == emails, f"{len(emails - set(seen))} of 60 events never reached Kafka"
    assert all(n == 1 for n in seen.values()), "an event was published more than once"
    assert pending(pg_settings) == 0
    # 40 during the outage, and maybe the warm-up's if it was published after the consumer took its place
    assert 40 <= len(downloads) <= 41, f"{len(downloads)} access events of 40 (+1) downloads reached Kafka"
    assert all(n == 1 for n in downloads.values()), "an access event was published more than once"
    assert pending(pg_settings, Topics.ACCESS) == 0
    assert (await relay_readiness(api_base_url))[1] is None, "the relay is still reported not ready"
