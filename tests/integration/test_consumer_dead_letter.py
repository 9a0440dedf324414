"""The api's consumers under the consumer policy, against the running stack: poison messages on
`registry.verdicts.v1` and `registry.access.v1` land in `registry.dead-letter.v1` with their error, the
good message after them is applied, and the consumers' offsets move past both. With Postgres away, the
download counter retries (and says so in /healthz), then counts what it read, once."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import httpx
import psycopg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from test_outbox_kafka_outage import stack

from registry_shared.events import FileAccessed, Topics, UploadVerified, encode_event, make_event

VERDICTS_GROUP = "registry-api-verdicts"
DOWNLOADS_GROUP = "registry-api-downloads"


# ---------------------------------------------------------------- Kafka helpers
async def dead_letter_end(bootstrap: str) -> int:
    """The end offset of the dead-letter topic (one partition): where this test's dead letters start."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        tp = TopicPartition(Topics.DEAD_LETTER, 0)
        return (await consumer.end_offsets([tp]))[tp]
    finally:
        await consumer.stop()


async def read_dead_letters(
    bootstrap: str, start: int, group: str, wanted: set[tuple[str, int, int]], within: float = 60
) -> dict[tuple[str, int, int], ConsumerRecord]:
    """The dead letters of consumer group `group` from offset `start`, by (topic, partition, offset) of the
    message they carry, until all of `wanted` are there (or the timeout)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    found: dict[tuple[str, int, int], ConsumerRecord] = {}
    try:
        tp = TopicPartition(Topics.DEAD_LETTER, 0)
        consumer.assign([tp])
        consumer.seek(tp, start)
        deadline = time.monotonic() + within
        while not wanted <= set(found) and time.monotonic() < deadline:
            for records in (await consumer.getmany(tp, timeout_ms=500)).values():
                for r in records:
                    h = {k: v.decode() for k, v in r.headers}
                    if h.get("consumer_group") == group:
                        found[(h["source_topic"], int(h["source_partition"]), int(h["source_offset"]))] = r
    finally:
        await consumer.stop()
    return found


async def publish(bootstrap: str, topic: str, messages: list[tuple[bytes, bytes]]) -> list[tuple[int, int]]:
    """Send (key, value) messages in order; their (partition, offset)."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        out = []
        for key, value in messages:
            meta = await producer.send_and_wait(topic, value, key=key)
            out.append((meta.partition, meta.offset))
        return out
    finally:
        await producer.stop()


async def committed(bootstrap: str, group: str, tp: TopicPartition) -> int:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group, partitions=[tp])
        meta = offsets.get(tp)
        return meta.offset if meta is not None else -1
    finally:
        await admin.close()


async def find(bootstrap: str, tp: TopicPartition, start: int, match, within: float = 60) -> int:
    """The offset of the first message of `tp` from `start` for which `match(value)` holds."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign([tp])
        consumer.seek(tp, start)
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            for records in (await consumer.getmany(tp, timeout_ms=500)).values():
                for r in records:
                    if match(r.value):
                        return r.offset
        raise AssertionError(f"no matching message on {tp} from {start}")
    finally:
        await consumer.stop()


def verified(upload_id: int, repo: str, **over) -> UploadVerified:
    fields = dict(
        upload_id=upload_id,
        repo_id=repo,
        version="v1",
        rfilename="w.bin",
        object_key=f"uploads/{upload_id}",
        size=1,
        sha256="0" * 64,
    )
    return UploadVerified(**{**fields, **over})


def assert_errors(letters: dict, expected: dict[tuple[str, int, int], str]) -> None:
    for where, fragment in expected.items():
        assert where in letters, f"no dead letter for {where}: {sorted(letters)}"
        headers = {k: v.decode() for k, v in letters[where].headers}
        assert fragment in headers["error"], (where, headers["error"])


# ---------------------------------------------------------------- the verdict consumer
async def test_poison_verdicts_are_dead_lettered_and_the_next_upload_is_verified(registry, kafka_settings):
    bootstrap = kafka_settings.kafka_bootstrap_servers
    dev = registry.register("PoisonVerdicts")
    repo = registry.create_model(dev, "private")
    registry.create_version(dev, repo, "v1")
    key = repo.encode()
    dlq_start = await dead_letter_end(bootstrap)

    # Upload ids no upload has (the test database starts afresh: small ids may be this test's own upload).
    wrong_schema = json.loads(encode_event(make_event(verified(2**62 + 1, repo), source="/test")))
    del wrong_schema["data"]["sha256"]
    not_a_uuid = make_event(verified(2**62 + 2, repo), source="/test", id="verdict-1")
    missing_row = make_event(verified(2**62, repo), source="/test")
    poison = [
        (key, b"{not json"),
        (key, json.dumps(wrong_schema).encode()),
        (key, encode_event(not_a_uuid)),
        (key, encode_event(missing_row)),
    ]
    sent = await publish(bootstrap, Topics.VERDICTS, poison)
    partition = sent[0][0]
    assert {p for p, _ in sent} == {partition}  # one key: one partition, in this order

    # The good message after them: a real upload, verified by ingest (its verdict has the same key).
    data = b"weights-" + uuid.uuid4().hex.encode()
    up = await asyncio.to_thread(registry.upload, dev, repo, "v1", "w.bin", data)
    done = await asyncio.to_thread(registry.wait_upload, dev, up["upload_id"], 90.0)
    assert done["status"] == "available", done

    tp = TopicPartition(Topics.VERDICTS, partition)
    good = await find(bootstrap, tp, sent[-1][1] + 1, lambda v: f'"upload_id":{up["upload_id"]},'.encode() in v)
    letters = await read_dead_letters(
        bootstrap, dlq_start, VERDICTS_GROUP, {(Topics.VERDICTS, partition, o) for _, o in sent}
    )
    assert_errors(
        letters,
        {
            (Topics.VERDICTS, partition, sent[0][1]): "not a CloudEvent",
            (Topics.VERDICTS, partition, sent[1][1]): "sha256",
            (Topics.VERDICTS, partition, sent[2][1]): "not a UUID",
            (Topics.VERDICTS, partition, sent[3][1]): "no upload",
        },
    )
    for (_, _, _), record in letters.items():
        assert record.value in {v for _, v in poison}  # the value as it was
    deadline = time.monotonic() + 30
    while (offset := await committed(bootstrap, VERDICTS_GROUP, tp)) <= good:
        assert time.monotonic() < deadline, f"committed {offset}, not past the good verdict at {good}"
        await asyncio.sleep(0.5)
    health = registry.http.get("/healthz").json()
    assert health["consumers"]["verdict-consumer"]["dead_lettered"] >= 4


# ---------------------------------------------------------------- the download counter
def download(repo: str, **fields) -> bytes:
    data = FileAccessed(user_id=1, kind="download", repo_id=repo, version="v1", rfilename="w.bin", ts=time.time())
    return encode_event(make_event(data, source="/test", **fields))


def stored_offset(pg_settings, partition: int) -> int:
    with psycopg.connect(pg_settings.database_url) as conn:
        row = conn.execute(
            "select next_offset from consumer_offsets where group_id = %s and topic = %s and partition = %s",
            [DOWNLOADS_GROUP, Topics.ACCESS, partition],
        ).fetchone()
    return row[0] if row else -1


def downloads(pg_settings, repo: str) -> int:
    with psycopg.connect(pg_settings.database_url) as conn:
        return conn.execute("select downloads from models where repo_id = %s", [repo]).fetchone()[0]


async def test_poison_access_events_are_dead_lettered_and_the_next_download_counted(
    registry, kafka_settings, pg_settings
):
    bootstrap = kafka_settings.kafka_bootstrap_servers
    dev = registry.register("PoisonDownloads")
    repo = registry.create_model(dev, "public")
    key = repo.encode()
    dlq_start = await dead_letter_end(bootstrap)
    wrong_schema = download(repo).replace(b'"kind":"download"', b'"kind":"teleport"')
    nowhere = f"ns{uuid.uuid4().hex[:10]}/missing"
    poison = [
        (key, b"\xff not json"),
        (key, wrong_schema),
        (key, download(repo, id="download-1")),
        (key, download(nowhere)),
    ]
    sent = await publish(bootstrap, Topics.ACCESS, [*poison, (key, download(repo))])
    partition, good = sent[-1]
    assert {p for p, _ in sent} == {partition}

    deadline = time.monotonic() + 60
    while downloads(pg_settings, repo) < 1:
        assert time.monotonic() < deadline, "the good download after the poison was never counted"
        await asyncio.sleep(0.3)
    letters = await read_dead_letters(
        bootstrap, dlq_start, DOWNLOADS_GROUP, {(Topics.ACCESS, partition, o) for _, o in sent[:-1]}
    )
    assert_errors(
        letters,
        {
            (Topics.ACCESS, partition, sent[0][1]): "not a CloudEvent",
            (Topics.ACCESS, partition, sent[1][1]): "kind",
            (Topics.ACCESS, partition, sent[2][1]): "not a UUID",
            (Topics.ACCESS, partition, sent[3][1]): f"no model '{nowhere}'",
        },
    )
    assert stored_offset(pg_settings, partition) > good
    await asyncio.sleep(1.5)  # nothing counted twice, nothing counted for the poison
    assert downloads(pg_settings, repo) == 1
    health = registry.http.get("/healthz").json()["consumers"]["download-counter"]
    assert health["dead_lettered"] >= 4 and health["state"] == "ok"


# ---------------------------------------------------------------- Postgres away: retried, then counted once
async def test_the_download_counter_waits_for_postgres_and_counts_once_it_is_back(
    registry, api_base_url, kafka_settings, pg_settings
):
    bootstrap = kafka_settings.kafka_bootstrap_servers
    dev = registry.register("PgAway")
    repo = registry.create_model(dev, "public")
    key = repo.encode()
    await stack("down", "postgres")
    try:
        ((partition, offset),) = await publish(bootstrap, Topics.ACCESS, [(key, download(repo))])
        # The counter retries with backoff and says so in /healthz (the pool's timeout first: 10 s).
        async with httpx.AsyncClient(base_url=api_base_url, timeout=10) as http:
            deadline = time.monotonic() + 60
            while True:
                health = (await http.get("/healthz")).json()["consumers"]["download-counter"]
                if health["state"] == "retrying":
                    break
                assert time.monotonic() < deadline, f"the counter never reported its retries: {health}"
                await asyncio.sleep(0.5)
            assert health["status"].startswith("retrying: ") and health["retries"] >= 1
            assert (await http.get("/healthz")).status_code == 200  # retrying is not dead
    finally:
        await stack("up", "postgres")

    deadline = time.monotonic() + 90
    while True:
        try:
            if downloads(pg_settings, repo) == 1 and stored_offset(pg_settings, partition) > offset:
                break
        except psycopg.OperationalError:
            pass
        assert time.monotonic() < deadline, "the download made while Postgres was away was never counted"
        await asyncio.sleep(0.5)
    health = registry.http.get("/healthz").json()["consumers"]["download-counter"]
    assert health["state"] == "ok"
    await asyncio.sleep(1.5)
    assert downloads(pg_settings, repo) == 1  # once
