"""Stopping Kafka during a burst of requests loses no event: the api keeps answering, the outbox holds
the events, and every one reaches its topic once Kafka is back."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
import uuid
from pathlib import Path

import psycopg
from aiokafka import AIOKafkaConsumer, TopicPartition

from registry_shared.devstack import TOPIC_PARTITIONS
from registry_shared.events import Topics, decode_event

STACK = Path(__file__).resolve().parents[2] / "deploy/local/stack.sh"


async def stack(*args: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        "bash", str(STACK), *args, env=os.environ, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    _, err = await asyncio.wait_for(proc.communicate(), timeout=180)
    assert proc.returncode == 0, err.decode()[-2000:]


def pending(pg_settings) -> int:
    with psycopg.connect(pg_settings.database_url) as conn:
        return conn.execute(
            "select count(*) from outbox where topic = %s and published_at is null", [Topics.USERS]
        ).fetchone()[0]


async def test_kafka_outage_loses_no_event(registry, kafka_settings, pg_settings):
    # A group id (never committed to) keeps aiokafka on its group coordinator, whose stop() is clean.
    consumer = AIOKafkaConsumer(
        bootstrap_servers=kafka_settings.kafka_bootstrap_servers,
        group_id=f"outage-test-{uuid.uuid4().hex[:8]}",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        parts = [TopicPartition(Topics.USERS, p) for p in range(TOPIC_PARTITIONS[Topics.USERS])]
        consumer.assign(parts)
        await consumer.seek_to_end(*parts)
        for tp in parts:
            await consumer.position(tp)  # fix the starting point before the outage

        await stack("down", "kafka")
        try:
            t0 = time.monotonic()
            emails = {(await asyncio.to_thread(registry.register, f"Outage{i}")).email for i in range(60)}
            burst = time.monotonic() - t0
            assert burst < 30, f"requests slowed down while Kafka was away: {burst:.1f}s for 60"
            assert pending(pg_settings) >= 60
        finally:
            await stack("up", "kafka")

        seen: dict[str, int] = {}
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and set(seen) != emails:
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                for msg in records:
                    event = decode_event(msg.value)
                    if event.type == "registry.user.registered.v1" and event.data["email"] in emails:
                        seen[event.data["email"]] = seen.get(event.data["email"], 0) + 1
        for records in (await consumer.getmany(timeout_ms=1000)).values():  # anything published twice?
            for msg in records:
                email = decode_event(msg.value).data.get("email")
                if email in seen:
                    seen[email] += 1
    finally:
        await consumer.stop()

    assert set(seen) == emails, f"{len(emails - set(seen))} of 60 events never reached Kafka"
    assert all(n == 1 for n in seen.values()), "an event was published more than once"
    assert pending(pg_settings) == 0
