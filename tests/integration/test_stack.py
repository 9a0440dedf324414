"""The four servers of the local stack are real and wired together."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import tempfile
import urllib.parse
from datetime import timedelta

import clickhouse_connect
import httpx
import psycopg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from registry_shared.events import Topics
from registry_shared.storage import minio_client


def test_postgres_round_trip(pg_settings, unique):
    with psycopg.connect(pg_settings.database_url) as conn:
        version = conn.execute("show server_version").fetchone()[0]
        assert int(version.split(".")[0]) >= 13
        table = f"roundtrip_{unique}"
        conn.execute(f"create temp table {table} (id bigserial primary key, body jsonb not null)")
        conn.execute(f"insert into {table} (body) values (%s), (%s)", ['{"a": 1}', '{"a": 2}'])
        total = conn.execute(f"select sum((body->>'a')::int) from {table}").fetchone()[0]
        assert total == 3


async def _consume(bootstrap: str, topic: str, group: str, count: int) -> list[bytes]:
    """Read `count` messages as member of `group`, committing after each, then leave the group."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    got: list[bytes] = []
    try:
        async with asyncio.timeout(30):
            while len(got) < count:
                batch = await consumer.getmany(timeout_ms=500, max_records=count - len(got))
                for records in batch.values():
                    got.extend(r.value for r in records)
                if batch:
                    await consumer.commit()
    finally:
        await consumer.stop()
    return got


async def test_kafka_consumer_group_resumes_at_committed_offset(kafka_settings, unique):
    bootstrap = kafka_settings.kafka_bootstrap_servers
    topic, group = f"test.stack.{unique}", f"test-group-{unique}"
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        for i in range(10):
            await producer.send_and_wait(topic, f"m{i}".encode(), key=b"same-partition")
    finally:
        await producer.stop()

    first = await _consume(bootstrap, topic, group, 4)
    assert first == [f"m{i}".encode() for i in range(4)]
    # A new member of the same group (a restarted consumer) starts where the group committed.
    second = await _consume(bootstrap, topic, group, 6)
    assert second == [f"m{i}".encode() for i in range(4, 10)]

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group)
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topic) or {0, 1, 2}
        committed = [await consumer.committed(TopicPartition(topic, p)) for p in partitions]
        assert sum(c or 0 for c in committed) == 10
    finally:
        await consumer.stop()


async def test_presigned_put_arrives_as_minio_notification_on_kafka(kafka_settings, minio_settings, unique):
    client = minio_client(minio_settings)
    bucket = minio_settings.minio_bucket
    key = f"stack-test/{unique}/weights file.bin"
    body = os.urandom(4096 + 17)

    consumer = AIOKafkaConsumer(
        Topics.MINIO_EVENTS,
        bootstrap_servers=kafka_settings.kafka_bootstrap_servers,
        group_id=f"test-minio-{unique}",
        auto_offset_reset="latest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        # Wait for the assignment so the 'latest' position is fixed before the PUT.
        async with asyncio.timeout(20):
            while not consumer.assignment():
                await asyncio.sleep(0.1)
        for tp in consumer.assignment():
            await consumer.position(tp)

        url = client.presigned_put_object(bucket, key, expires=timedelta(minutes=5))
        async with httpx.AsyncClient() as http:
            resp = await http.put(url, content=body)
        assert resp.status_code == 200, resp.text

        record = None
        async with asyncio.timeout(30):
            while record is None:
                batch = await consumer.getmany(timeout_ms=500)
                for msgs in batch.values():
                    for msg in msgs:
                        event = json.loads(msg.value)
                        for rec in event.get("Records", []):
                            if urllib.parse.unquote_plus(rec["s3"]["object"]["key"]) == key:
                                record = rec
    finally:
        await consumer.stop()
        client.remove_object(bucket, key)

    assert record["eventName"] == "s3:ObjectCreated:Put"
    assert record["s3"]["bucket"]["name"] == bucket
    assert record["s3"]["object"]["size"] == len(body)
    assert record["s3"]["object"]["eTag"] == hashlib.md5(body).hexdigest()  # noqa: S324 (S3 ETag)


@pytest.fixture(scope="module")
def chdb_client():
    with tempfile.TemporaryDirectory() as path:
        client = clickhouse_connect.get_client(interface="chdb", path=path)
        yield client
        client.close()


def test_chdb_mergetree_insert_and_aggregate(chdb_client):
    c = chdb_client
    c.command("CREATE DATABASE IF NOT EXISTS stack_test")
    c.command(
        "CREATE TABLE stack_test.events (ts DateTime, user_id UInt64, kind LowCardinality(String), bytes UInt64)"
        " ENGINE = MergeTree PARTITION BY toYYYYMM(ts) ORDER BY (user_id, ts)"
    )
    rows = [(1_700_000_000 + i * 3600, i % 3, "download" if i % 2 else "manifest", i * 10) for i in range(100)]
    c.insert("stack_test.events", rows, column_names=["ts", "user_id", "kind", "bytes"], database="stack_test")
    result = c.query(
        "SELECT user_id, count() AS n, countIf(kind = 'download') AS d, sum(bytes) AS b"
        " FROM stack_test.events GROUP BY user_id ORDER BY user_id"
    ).result_rows
    expected = {}
    for _, user, kind, b in rows:
        n, d, s = expected.get(user, (0, 0, 0))
        expected[user] = (n + 1, d + (kind == "download"), s + b)
    assert [(u, n, d, b) for u, n, d, b in result] == [(u, *expected[u]) for u in sorted(expected)]
    engine = c.query("SELECT engine FROM system.tables WHERE database='stack_test' AND name='events'")
    assert engine.result_rows == [("MergeTree",)]
