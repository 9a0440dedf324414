"""Stopping Kafka during a burst of requests loses no event: the api keeps answering, the outbox holds
the events, and every one reaches its topic once Kafka is back."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from pathlib import Path

import psycopg
from aiokafka import AIOKafkaConsumer, TopicPartition

from registry_shared.events import Topics, decode_event

STACK = Path(__file__).resolve().parents[2] / "deploy/local/stack.sh"


def stack(*args: str) -> None:
    subprocess.run(["bash", str(STACK), *args], check=True, env=os.environ, capture_output=True, timeout=180)


async def end_offsets(bootstrap: str, topic: str) -> dict[TopicPartition, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        return await consumer.end_offsets(parts)
    finally:
        await consumer.stop()


async def read_from(bootstrap: str, start: dict[TopicPartition, int], want: set[str], wait_s: float) -> dict[str, int]:
    """Count UserRegistered events per e-mail in `want`, reading from `start`."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    seen: dict[str, int] = {}
    try:
        consumer.assign(list(start))
        for tp, offset in start.items():
            consumer.seek(tp, offset)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and set(seen) != want:
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                for msg in records:
                    event = decode_event(msg.value)
                    email = event.data.get("email")
                    if event.type == "registry.user.registered.v1" and email in want:
                        seen[email] = seen.get(email, 0) + 1
        # a little longer, to see duplicates if the relay published anything twice
        batch = await consumer.getmany(timeout_ms=1000)
        for records in batch.values():
            for msg in records:
                event = decode_event(msg.value)
                if event.data.get("email") in want:
                    seen[event.data["email"]] += 1
    finally:
        await consumer.stop()
    return seen


def test_kafka_outage_loses_no_event(registry, kafka_settings, pg_settings):
    bootstrap = kafka_settings.kafka_bootstrap_servers
    start = asyncio.run(end_offsets(bootstrap, Topics.USERS))
    stack("down", "kafka")
    try:
        emails = set()
        t0 = time.monotonic()
        for i in range(60):
            acc = registry.register(f"Outage{i}")
            emails.add(acc.email)
        burst = time.monotonic() - t0
        assert burst < 30, f"requests slowed down while Kafka was away: {burst:.1f}s for 60"
        with psycopg.connect(pg_settings.database_url) as conn:
            pending = conn.execute(
                "select count(*) from outbox where topic = %s and published_at is null", [Topics.USERS]
            ).fetchone()[0]
        assert pending >= 60
    finally:
        stack("up", "kafka")
    seen = asyncio.run(read_from(bootstrap, start, emails, wait_s=90))
    assert set(seen) == emails, f"{len(emails - set(seen))} events never reached Kafka"
    assert all(n == 1 for n in seen.values()), "an event was published more than once"
    with psycopg.connect(pg_settings.database_url) as conn:
        left = conn.execute(
            "select count(*) from outbox where topic = %s and published_at is null", [Topics.USERS]
        ).fetchone()[0]
    assert left == 0
