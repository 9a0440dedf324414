"""The analytics loader under the consumer policy, in its own process (real Kafka, chDB): poison messages are
dead-lettered with their error and the events after them are loaded; a batch the store refuses for good is
stored in parts instead of stalling its partitions; the group's offsets move past all of them."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from datetime import UTC, datetime

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from test_analytics import AnalyticsProcess

from registry_shared.events import FileAccessed, encode_event, make_event


@pytest.fixture(scope="module")
async def svc(tmp_path_factory, kafka_settings):
    tag = uuid.uuid4().hex[:10]
    svc = AnalyticsProcess(tmp_path_factory.mktemp("analytics-failures"), tag, kafka_settings.kafka_bootstrap_servers)
    await svc.create_topics()
    await svc.start()
    yield svc
    svc.stop()
    await svc.delete_topics()


def access(user_id: int, ts: float, repo: str = "acme/alpha", **fields) -> bytes:
    data = FileAccessed(user_id=user_id, kind="download", repo_id=repo, version="v1", ts=ts)
    return encode_event(make_event(data, source="/test", **fields))


async def user_events(http: httpx.AsyncClient, user_id: int) -> int:
    body = (await http.get(f"/v1/usage/users/{user_id}", params={"since": 0, "until": int(time.time())})).json()
    return body["totals"]["events"]


async def wait_events(svc: AnalyticsProcess, user_id: int, n: int, within: float = 90) -> None:
    async with httpx.AsyncClient(base_url=svc.url, timeout=10) as http:
        deadline = time.monotonic() + within
        while (got := await user_events(http, user_id)) != n:
            assert time.monotonic() < deadline, f"user {user_id}: {got} events loaded, expected {n}"
            await asyncio.sleep(0.3)


async def dead_letters(svc: AnalyticsProcess, n: int, within: float = 30) -> list:
    consumer = AIOKafkaConsumer(svc.dlq_topic, bootstrap_servers=svc.bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    got: list = []
    try:
        deadline = time.monotonic() + within
        while len(got) < n and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                got.extend(records)
    finally:
        await consumer.stop()
    return got


async def committed_past(svc: AnalyticsProcess, topic: str, sent: dict[int, int], within: float = 30) -> None:
    """Wait until the group's committed offset of each partition is past the last message `sent` there."""
    admin = AIOKafkaAdminClient(bootstrap_servers=svc.bootstrap)
    await admin.start()
    try:
        deadline = time.monotonic() + within
        while True:
            offsets = await admin.list_consumer_group_offsets(svc.env["ANALYTICS_GROUP_ID"])
            behind = {
                p: (offsets.get(TopicPartition(topic, p)), last)
                for p, last in sent.items()
                if (meta := offsets.get(TopicPartition(topic, p))) is None or meta.offset <= last
            }
            if not behind:
                return
            assert time.monotonic() < deadline, f"offsets not committed past the messages sent: {behind}"
            await asyncio.sleep(0.5)
    finally:
        await admin.close()


async def send(svc: AnalyticsProcess, messages: list[tuple[bytes | None, bytes]]) -> dict[int, int]:
    """Publish in order with one key (one partition); the last offset sent per partition."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=svc.bootstrap, acks="all", linger_ms=20)
    await producer.start()
    try:
        futures = [await producer.send(svc.access_topic, value, key=key) for key, value in messages]
        metas = await asyncio.gather(*futures)
    finally:
        await producer.stop()
    last: dict[int, int] = {}
    for m in metas:
        last[m.partition] = max(last.get(m.partition, -1), m.offset)
    return last


async def test_poison_is_dead_lettered_with_its_error_and_the_next_event_loaded(svc):
    key = b"acme/alpha"
    wrong_schema = json.loads(access(901, time.time()))
    wrong_schema["data"]["kind"] = "teleport"
    poison = [
        b"not json at all",
        json.dumps(wrong_schema).encode(),
        access(901, time.time(), id="access-1"),  # an id that is not a UUID
    ]
    sent = await send(svc, [*((key, p) for p in poison), (key, access(901, time.time() - 60))])
    await wait_events(svc, 901, 1)
    letters = await dead_letters(svc, len(poison))
    assert sorted(r.value for r in letters) == sorted(poison)
    errors = {r.value: dict((k, v.decode()) for k, v in r.headers) for r in letters}
    assert "not JSON" in errors[poison[0]]["error"]
    assert "kind" in errors[poison[1]]["error"]
    assert "not a UUID" in errors[poison[2]]["error"]
    for headers in errors.values():
        assert (
            headers["consumer_group"] == svc.env["ANALYTICS_GROUP_ID"] and headers["source_topic"] == svc.access_topic
        )
    await committed_past(svc, svc.access_topic, sent)
    async with httpx.AsyncClient(base_url=svc.url, timeout=10) as http:
        health = (await http.get("/healthz")).json()
    assert health["consumers"]["analytics-loader"]["dead_lettered"] >= len(poison)


async def test_a_batch_the_store_refuses_is_stored_in_parts_not_retried_forever(svc):
    # 400 events, each in a month of its own: ClickHouse refuses a block of more than 100 partitions
    # (TOO_MANY_PARTS: too many partitions for a single INSERT block), which no retry can change.
    months = [datetime(1990 + m // 12, m % 12 + 1, 15, tzinfo=UTC).timestamp() for m in range(400)]
    messages = [(b"acme/alpha", access(902, ts)) for ts in months]
    messages.append((b"acme/alpha", access(902, time.time() - 60)))  # and a good one after them
    sent = await send(svc, messages)
    await wait_events(svc, 902, len(messages), within=180)
    await committed_past(svc, svc.access_topic, sent)
    async with httpx.AsyncClient(base_url=svc.url, timeout=10) as http:
        health = (await http.get("/healthz")).json()
        assert health["loader"]["split"] >= 1  # the refused batch was split, not dropped
        assert health["ok"] is True
        body = (await http.get("/v1/usage/users/902", params={"since": 0, "until": int(time.time())})).json()
    assert body["totals"]["downloads"] == len(messages)
    assert len(body["timeseries_daily"]) == len(messages)  # every month's event, once
