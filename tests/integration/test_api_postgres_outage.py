"""Stopping Postgres under requests: every answer comes in under a second (503 `database unavailable` with
Retry-After, or a download served from the api's caches), /readyz says the database is down and why, and
once Postgres is back everything recovers and every download answered is counted exactly once.

Stops and restarts this stack's own Postgres (deploy/local/stack.sh down/up postgres)."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from dataclasses import dataclass, field

import httpx
import psycopg
from aiokafka import AIOKafkaConsumer, TopicPartition
from conftest import SEED_FILE, seed_file, spawn_api, stop_process
from test_outbox_kafka_outage import stack

from registry_shared.devstack import TOPIC_PARTITIONS
from registry_shared.events import FileAccessed, Topics, decode_event

FAST = 1.0  # seconds: the bound on every answer while Postgres is away


@dataclass
class Seen:
    """What the clients saw: (path kind, status, seconds, retry-after, detail) per request."""

    answers: list[tuple[str, int, float, str | None, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, kind: str, r: httpx.Response, took: float) -> None:
        detail = r.json().get("detail", "") if r.headers.get("content-type") == "application/json" else ""
        with self.lock:
            self.answers.append((kind, r.status_code, took, r.headers.get("retry-after"), detail))


def hammer(base: str, requests: list[tuple[str, str, dict]], stop: threading.Event, seen: Seen) -> None:
    """Send `requests` (kind, path, headers) round-robin until `stop`, recording every answer."""
    with httpx.Client(base_url=base, timeout=30) as http:
        i = 0
        while not stop.is_set():
            kind, path, headers = requests[i % len(requests)]
            i += 1
            t0 = time.monotonic()
            r = http.get(path, headers=headers)
            seen.add(kind, r, time.monotonic() - t0)


async def access_consumer(kafka_settings) -> AIOKafkaConsumer:
    """A consumer of the access topic, positioned at its end now."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=kafka_settings.kafka_bootstrap_servers,
        group_id=f"pg-outage-test-{uuid.uuid4().hex[:8]}",
        enable_auto_commit=False,
    )
    await consumer.start()
    parts = [TopicPartition(Topics.ACCESS, p) for p in range(TOPIC_PARTITIONS[Topics.ACCESS])]
    consumer.assign(parts)
    await consumer.seek_to_end(*parts)
    for tp in parts:
        await consumer.position(tp)
    return consumer


async def download_events(consumer: AIOKafkaConsumer, repo: str, expected: int, within: float = 90) -> dict:
    """event id → times seen, for download events of `repo`, until `expected` ids are seen (and a bit more)."""
    seen: dict[str, int] = {}

    def count(records) -> None:
        for msg in records:
            event = decode_event(msg.value)
            if event.type == FileAccessed.event_type and event.data.get("repo_id") == repo:
                assert event.data["kind"] == "download"
                seen[event.id] = seen.get(event.id, 0) + 1

    deadline = time.monotonic() + within
    while time.monotonic() < deadline and len(seen) < expected:
        for records in (await consumer.getmany(timeout_ms=500)).values():
            count(records)
    for records in (await consumer.getmany(timeout_ms=2000)).values():  # anything more, or twice?
        count(records)
    return seen


async def wait_ready(http: httpx.AsyncClient, within: float = 90) -> dict:
    deadline = time.monotonic() + within
    while True:
        r = await http.get("/readyz")
        if r.status_code == 200:
            return r.json()
        assert time.monotonic() < deadline, f"not ready {within}s after Postgres came back: {r.text}"
        await asyncio.sleep(0.5)


def downloads_counter(pg_settings, repo: str) -> int:
    with psycopg.connect(pg_settings.database_url) as conn:
        return conn.execute("select downloads from models where repo_id = %s", [repo]).fetchone()[0]


async def test_postgres_outage_fast_answers_and_every_download_counted_once(
    registry, api_base_url, kafka_settings, pg_settings, minio_settings
):
    dev = registry.register("PgOutage")
    repo = registry.create_model(dev, "private")
    registry.create_version(dev, repo, "v1")
    seed_file(pg_settings, minio_settings, repo, "v1")
    download = f"/v1/files/{repo}/{SEED_FILE}/download"
    uncached = f"/v1/files/{repo}/{SEED_FILE}/download?version=v9"  # not found: never cached
    unknown = {"x-api-key": "sk_live_" + uuid.uuid4().hex[:12] + uuid.uuid4().hex}  # well-formed, never cached

    async with httpx.AsyncClient(base_url=api_base_url, timeout=30) as http:
        ready = await wait_ready(http, within=30)
        assert ready["components"]["database"]["ok"] is True
        consumer = await access_consumer(kafka_settings)
        try:
            warm = await http.get(download, headers=dev.headers)  # caches the key and the lookup
            assert warm.status_code == 200, warm.text

            seen = Seen()
            stop = threading.Event()
            plan = [
                ("cached", download, dev.headers),
                ("uncached-lookup", uncached, dev.headers),
                ("uncached-key", download, unknown),
                ("models", "/v1/models", dev.headers),
                ("healthz", "/healthz", {}),
            ]
            threads = [threading.Thread(target=hammer, args=(api_base_url, plan, stop, seen)) for _ in range(3)]
            for t in threads:
                t.start()
            try:
                await asyncio.sleep(1.0)
                await stack("down", "postgres")
                try:
                    await asyncio.sleep(0.3)
                    stopped = len(seen.answers)
                    # Postgres away: readiness says so, and why, at once; the clients keep going for a while.
                    t0 = time.monotonic()
                    r = await http.get("/readyz")
                    assert time.monotonic() - t0 < FAST
                    assert r.status_code == 503, r.text
                    body = r.json()
                    assert body["ready"] is False and "database" in body["not_ready"], body
                    db = body["components"]["database"]
                    assert db["ok"] is False and db["status"] == "down" and db["reason"], db
                    assert "database" in body["detail"]
                    await asyncio.sleep(6.0)  # longer than the caches' trust once their listener is gone
                    during = seen.answers[stopped:]
                finally:
                    await stack("up", "postgres")
            finally:
                stop.set()
                for t in threads:
                    await asyncio.to_thread(t.join, 60)

            # Every answer came fast; while Postgres was away, each was the documented one.
            slow = [a for a in seen.answers if a[2] >= FAST]
            assert not slow, f"{len(slow)} answers took {FAST}s or more, e.g. {slow[:3]}"
            by_kind: dict[str, set[int]] = {}
            for kind, status, _, retry_after, detail in during:
                by_kind.setdefault(kind, set()).add(status)
                if status == 503:
                    assert detail == "database unavailable", detail
                    assert retry_after is not None and int(retry_after) >= 1
                elif kind == "healthz":
                    assert status == 200
                else:
                    assert (kind, status) == ("cached", 200), (kind, status, detail)
            assert by_kind["cached"] == {200}, f"cached downloads while Postgres was away: {by_kind['cached']}"
            for kind in ("uncached-lookup", "uncached-key", "models"):
                assert by_kind[kind] == {503}, (kind, by_kind[kind])
            assert by_kind["healthz"] == {200}

            # Back: ready again, and everything answers.
            ready = await wait_ready(http)
            assert ready["not_ready"] == {}
            for path, headers, expected in (
                (download, dev.headers, 200),
                (uncached, dev.headers, 404),
                (download, unknown, 401),
                ("/v1/models", dev.headers, 200),
            ):
                r = await http.get(path, headers=headers)
                assert r.status_code == expected, (path, r.status_code, r.text)

            # Counted exactly once: every download answered 200 (the warm-up, those before, during and after the
            # outage) has exactly one access event on Kafka and one count in models.downloads.
            answered = 2 + sum(1 for a in seen.answers if a[0] == "cached" and a[1] == 200)
            events = await download_events(consumer, repo, answered)
        finally:
            await consumer.stop()
    assert all(n == 1 for n in events.values()), "an access event was published more than once"
    assert len(events) == answered, f"{len(events)} access events for {answered} downloads answered"
    deadline = time.monotonic() + 60
    while (n := downloads_counter(pg_settings, repo)) != answered:
        assert n < answered and time.monotonic() < deadline, f"downloads counter {n}, {answered} downloads answered"
        await asyncio.sleep(0.5)


async def test_a_full_access_buffer_refuses_downloads_instead_of_losing_their_events(
    registry, kafka_settings, pg_settings, minio_settings
):
    dev = registry.register("PgOutageCap")
    repo = registry.create_model(dev, "private")
    registry.create_version(dev, repo, "v1")
    seed_file(pg_settings, minio_settings, repo, "v1")
    download = f"/v1/files/{repo}/{SEED_FILE}/download"
    cap = 100
    proc, base = spawn_api(ACCESS_BUFFER_MAX=str(cap))  # its events reach Kafka through the stack api's relay
    try:
        async with httpx.AsyncClient(base_url=base, timeout=30) as http:
            await wait_ready(http, within=30)
            consumer = await access_consumer(kafka_settings)
            try:
                assert (await http.get(download, headers=dev.headers)).status_code == 200  # cached from now on
                await asyncio.sleep(1.0)  # its event written to the outbox
                await stack("down", "postgres")
                try:
                    statuses = []
                    for _ in range(cap + 30):
                        t0 = time.monotonic()
                        r = await http.get(download, headers=dev.headers)
                        assert time.monotonic() - t0 < FAST
                        statuses.append(r.status_code)
                        if r.status_code == 503:
                            assert r.json() == {"detail": "access log unavailable"}, r.text
                            assert int(r.headers["retry-after"]) >= 1
                    assert statuses == [200] * cap + [503] * 30, statuses
                    r = await http.get("/readyz")
                    assert r.status_code == 503
                    recorder = r.json()["components"]["access-recorder"]
                    assert recorder["ok"] is False and recorder["buffered"] == cap and recorder["refused"] == 30
                finally:
                    await stack("up", "postgres")
                await wait_ready(http)
                assert (await http.get(download, headers=dev.headers)).status_code == 200
                events = await download_events(consumer, repo, cap + 2)
            finally:
                await consumer.stop()
    finally:
        stop_process(proc)
    assert len(events) == cap + 2 and all(n == 1 for n in events.values()), (len(events), cap + 2)


async def test_the_invalidation_listener_comes_back_after_its_connection_is_killed(registry, api_base_url, pg_settings):
    """The LISTEN loop is supervised: its backend terminated, it reconnects (seen on /readyz), and a key rotated
    through another api process stops working here at once (its NOTIFY is heard)."""
    dev = registry.register("ListenerKill")
    other, other_base = spawn_api()
    try:
        async with httpx.AsyncClient(base_url=api_base_url, timeout=30) as http:
            before = (await wait_ready(http, within=30))["components"]["invalidation-listener"]
            assert before["ok"] is True and before["connections"] >= 1
            assert (await http.get("/v1/users/me", headers=dev.headers)).status_code == 200  # key cached here
            with psycopg.connect(pg_settings.database_url, autocommit=True) as conn:
                killed = conn.execute(
                    "select count(*) filter (where pg_terminate_backend(pid)) from pg_stat_activity"
                    " where query like 'listen %'"
                ).fetchone()[0]
            assert killed >= 1
            deadline = time.monotonic() + 20
            while True:
                listener = (await http.get("/readyz")).json()["components"]["invalidation-listener"]
                if listener["ok"] and listener["connections"] > before["connections"]:
                    break
                assert time.monotonic() < deadline, f"the listener did not come back: {listener}"
                await asyncio.sleep(0.1)
            assert (await http.get("/v1/users/me", headers=dev.headers)).status_code == 200
            async with httpx.AsyncClient(base_url=other_base, timeout=30) as b:
                rotated = await b.post("/v1/users/rotate-key", headers=dev.headers)
            assert rotated.status_code == 200, rotated.text
            deadline = time.monotonic() + 5
            while (r := await http.get("/v1/users/me", headers=dev.headers)).status_code != 401:
                assert time.monotonic() < deadline, f"a rotated key still works here: {r.status_code}"
                await asyncio.sleep(0.1)
            new = {"x-api-key": rotated.json()["api_key"]}
            assert (await http.get("/v1/users/me", headers=new)).status_code == 200
    finally:
        stop_process(other)


def test_openapi_documents_readiness_and_the_outage_answers(registry):
    spec = registry.http.get("/openapi.json").json()
    for path in ("/healthz", "/readyz"):
        assert spec["paths"][path]["get"]["tags"] == ["Health"]
    readyz = spec["paths"]["/readyz"]["get"]["responses"]
    assert set(readyz) == {"200", "503"}
    assert readyz["503"]["content"]["application/json"]["schema"]["$ref"].endswith("/Readiness")
    download = spec["paths"]["/v1/files/{file_path}/download"]["get"]
    assert "Retry-After" in download["responses"]["503"]["headers"]
    assert "database unavailable" in download["responses"]["503"]["description"]
    r = registry.http.get("/readyz")
    assert r.status_code == 200 and r.json()["ready"] is True and r.json()["not_ready"] == {}, r.text
