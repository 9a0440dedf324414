"""Benchmark of the analytics service: load through Kafka, usage query latency vs Postgres, freshness.

    uv run --no-sync pytest tests/bench/test_bench_analytics.py -m bench -s

BENCH_EVENTS (default 10,000,000) access events, CloudEvents JSON, ts spread over the last 30 days in time
order, 1,000 users with a handful of favourite models each out of 2,000, are published to a fresh topic,
then a fresh `registry-analytics` process (own chDB folder) loads them: events/s is measured from the
loader being ready to the last event stored. Then, on the same data: p50/p95 of each usage endpoint over
HTTP, freshness (publish one event → visible in the user's usage), and the same queries as GROUP BY on a
Postgres table (schema `bench`) holding the same rows, exported from the store and loaded with COPY.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
import psycopg
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from registry_shared.events import FileAccessed, UserRegistered, decode_event, encode_event, make_event

pytestmark = [pytest.mark.bench, pytest.mark.timeout(3600)]

ROOT = Path(__file__).resolve().parents[2]
N_EVENTS = int(os.environ.get("BENCH_EVENTS", "10000000"))
N_USERS, N_MODELS, FAVOURITES = 1000, 2000, 6
KINDS = ["download"] * 50 + ["manifest"] * 15 + ["files_list"] * 15 + ["platform_manifest"] * 10
KINDS += ["model_detail"] * 5 + ["changes"] * 5
DAY = 86_400

TEMPLATE = (
    b'{"specversion":"1.0","id":"%s","source":"/bench","type":"registry.file.accessed.v1",'
    b'"time":"%s","subject":"%s","datacontenttype":"application/json","data":{"user_id":%d,'
    b'"kind":"%s","repo_id":"%s","version":"v1","rfilename":"model.safetensors","bytes":%d,"ts":%.3f}}'
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))]


def generate(tag: str, start: float, span: float):
    """Yield (key, value) chunks of pre-encoded CloudEvents, ts increasing (time order, like live traffic)."""
    rng = random.Random(42)
    favourites = [[f"org/model-{rng.randrange(N_MODELS)}".encode() for _ in range(FAVOURITES)] for _ in range(N_USERS)]
    kinds = [k.encode() for k in KINDS]
    now_iso = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ").encode()
    step = span / N_EVENTS
    chunk: list[tuple[bytes, bytes]] = []
    for i in range(N_EVENTS):
        user = rng.randrange(N_USERS)
        repo = favourites[user][rng.randrange(FAVOURITES)]
        value = TEMPLATE % (
            b"%s-0000-4000-8000-%012x" % (tag.encode(), i),  # a UUID (event ids are UUIDs): tag = 8 hex digits
            now_iso,
            repo,
            user,
            kinds[rng.randrange(100)],
            repo,
            rng.randrange(1, 1 << 30),
            start + i * step,
        )
        chunk.append((repo, value))
        if len(chunk) == 100_000:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


async def produce_all(bootstrap: str, topic: str, tag: str, start: float, span: float) -> float:
    """Publish every event with the producer's batch API; returns events/s."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks=1, linger_ms=50, max_batch_size=1 << 20)
    await producer.start()
    t0 = time.perf_counter()
    n = 0
    try:
        partitions = sorted(await producer.partitions_for(topic))
        futures = []
        for chunk in generate(tag, start, span):
            by_part: dict[int, list[bytes]] = {p: [] for p in partitions}
            for key, value in chunk:  # keyed like the api does (repo_id), so one model stays on one partition
                by_part[partitions[hash(key) % len(partitions)]].append(value)
            for part, values in by_part.items():
                i = 0
                while i < len(values):
                    batch = producer.create_batch()
                    while i < len(values) and batch.append(key=None, value=values[i], timestamp=None) is not None:
                        i += 1
                    batch.close()
                    futures.append(await producer.send_batch(batch, topic, partition=part))
            n += len(chunk)
            if len(futures) > 200:
                await asyncio.gather(*futures)
                futures = []
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return n / (time.perf_counter() - t0)


class Service:
    def __init__(self, tmp: Path, tag: str, bootstrap: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.chdb = tmp / "chdb"
        self.access_topic, self.users_topic = f"bench.access.{tag}", f"bench.users.{tag}"
        self.env = {
            **os.environ,
            "ANALYTICS_PORT": str(self.port),
            "CLICKHOUSE_MODE": "chdb",
            "CHDB_PATH": str(self.chdb),
            "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            "ANALYTICS_GROUP_ID": f"bench-analytics-{tag}",
            "ANALYTICS_GROUP_INSTANCE_ID": f"bench-analytics-{tag}-0",
            "ANALYTICS_ACCESS_TOPIC": self.access_topic,
            "ANALYTICS_USERS_TOPIC": self.users_topic,
            "ANALYTICS_DEAD_LETTER_TOPIC": f"bench.dlq.{tag}",
        }
        self.log = tmp / "analytics.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                ["uv", "run", "--no-sync", "registry-analytics"],
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


async def timed(http: httpx.AsyncClient, path: str, params_list: list[dict]) -> list[float]:
    out = []
    for params in params_list:
        t = time.perf_counter()
        resp = await http.get(path, params=params)
        out.append((time.perf_counter() - t) * 1000)
        assert resp.status_code == 200, resp.text
    return out


def copy_file(conn: psycopg.Connection, path: Path, sql: str) -> None:
    """Stream a TSV file into Postgres with COPY."""
    with conn.cursor().copy(sql) as copy, open(path, "rb") as f:
        while block := f.read(8 << 20):
            copy.write(block)


PG_SOURCE = "bench.access_events WHERE ts >= to_timestamp(%(since)s) AND ts < to_timestamp(%(until)s + 1) {f}"
PG_USER = {
    "totals": "SELECT count(*), count(*) FILTER (WHERE kind IN ('manifest','platform_manifest')),"
    " count(*) FILTER (WHERE kind='files_list'), count(*) FILTER (WHERE kind='download'),"
    " max(ts), count(DISTINCT repo_id) FROM " + PG_SOURCE,
    "top_models": "SELECT repo_id, count(*) FILTER (WHERE kind='download') d FROM "
    + PG_SOURCE
    + " GROUP BY repo_id HAVING count(*) FILTER (WHERE kind='download') > 0 ORDER BY d DESC, repo_id LIMIT 100",
    "daily": "SELECT (ts AT TIME ZONE 'UTC')::date AS day, count(*), count(*) FILTER (WHERE kind='download')"
    " FROM " + PG_SOURCE + " GROUP BY day ORDER BY day",
}
PG_ADMIN = {
    **PG_USER,
    "top_users": "SELECT t.user_id, u.email, u.name, t.ev, t.dl, t.last FROM (SELECT user_id, count(*) ev,"
    " count(*) FILTER (WHERE kind='download') dl, max(ts) last FROM "
    + PG_SOURCE
    + " GROUP BY user_id ORDER BY ev DESC, dl DESC, user_id LIMIT 50) t"
    " LEFT JOIN bench.users u USING (user_id) ORDER BY t.ev DESC, t.dl DESC, t.user_id",
}


def pg_time(conn: psycopg.Connection, queries: dict[str, str], params_list: list[dict], where: str) -> list[float]:
    out = []
    for params in params_list:
        t = time.perf_counter()
        for sql in queries.values():
            conn.execute(sql.replace("{f}", where), params).fetchall()
        out.append((time.perf_counter() - t) * 1000)
    return out


async def test_bench_analytics(kafka_settings, pg_settings):
    tag = uuid.uuid4().hex[:8]
    bootstrap = kafka_settings.kafka_bootstrap_servers
    tmp = Path(tempfile.mkdtemp(prefix="bench-analytics-"))
    svc = Service(tmp, tag, bootstrap)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    await admin.create_topics(
        [
            NewTopic(svc.access_topic, num_partitions=3, replication_factor=1),
            NewTopic(svc.users_topic, num_partitions=3, replication_factor=1),
        ]
    )
    now = time.time()
    start, span = now - 30 * DAY + 600, 30 * DAY - 1200
    # The template is a valid CloudEvent of the shared contract.
    sample = next(generate(tag, start, span))[0][1]
    assert decode_event(sample).payload().kind in KINDS
    print(f"\n[analytics bench] {N_EVENTS:,} access events, {N_USERS} users, {N_MODELS} models, 30 days")
    try:
        users = []
        for uid in range(N_USERS):
            ev = make_event(
                UserRegistered(user_id=uid, email=f"u{uid}@bench.test", name=f"User {uid}", role="platform"),
                source="/bench",
            )
            users.append((ev.key, encode_event(ev)))
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20)
        await producer.start()
        await asyncio.gather(*[await producer.send(svc.users_topic, v, key=k) for k, v in users])
        await producer.stop()

        produce_rate = await produce_all(bootstrap, svc.access_topic, tag, start, span)
        print(f"  produce (aiokafka batch API, pre-encoded JSON): {produce_rate:,.0f} events/s")

        svc.start()
        async with httpx.AsyncClient(base_url=svc.url, timeout=30) as http:
            async with asyncio.timeout(120):
                while True:
                    try:
                        if (await http.get("/healthz")).json().get("loader", {}).get("ready"):
                            break
                    except httpx.HTTPError:
                        pass
                    await asyncio.sleep(0.1)
            t0 = time.perf_counter()
            async with asyncio.timeout(max(600, N_EVENTS / 10_000)):
                while True:
                    stats = (await http.get("/healthz")).json()["loader"]
                    if stats["stored"] >= N_EVENTS:
                        break
                    await asyncio.sleep(0.25)
            load_s = time.perf_counter() - t0
            print(
                f"  load Kafka → ClickHouse (chDB): {N_EVENTS:,} events in {load_s:.1f} s = "
                f"{N_EVENTS / load_s:,.0f} events/s (target ≥ 100,000)"
            )
            batches = [json.loads(line) for line in svc.log.read_text().splitlines() if '"batch stored"' in line]
            if batches:
                avg = {
                    k: statistics.mean(b[k] for b in batches)
                    for k in ("messages", "prepare_ms", "stage_ms", "dedupe_ms", "insert_ms")
                }
                print(
                    f"  {len(batches)} batches, avg {avg['messages']:,.0f} messages: prepare {avg['prepare_ms']:.0f} ms,"
                    f" stage (engine parse) {avg['stage_ms']:.0f} ms, dedupe {avg['dedupe_ms']:.0f} ms,"
                    f" insert {avg['insert_ms']:.0f} ms"
                )
            total = (await http.get("/v1/usage/admin", params={"since": 0})).json()["totals"]["events"]
            assert total == N_EVENTS

            rng = random.Random(1)
            it = 60
            ch: dict[str, list[float]] = {}
            user_params = [rng.randrange(N_USERS) for _ in range(it)]
            lat = []
            for uid in user_params:
                t = time.perf_counter()
                r = await http.get(f"/v1/usage/users/{uid}")
                lat.append((time.perf_counter() - t) * 1000)
                assert r.status_code == 200 and r.json()["totals"]["events"] > 0
            ch["user usage, 30 days"] = lat
            ch["admin usage, 30 days"] = await timed(http, "/v1/usage/admin", [{}] * it)
            ch["admin, filter_user_id"] = await timed(
                http, "/v1/usage/admin", [{"filter_user_id": rng.randrange(N_USERS)} for _ in range(it)]
            )
            ch["admin, filter_email"] = await timed(
                http, "/v1/usage/admin", [{"filter_email": f"u{rng.randrange(N_USERS)}@bench.test"} for _ in range(it)]
            )
            ch["downloads per model"] = await timed(http, "/v1/usage/downloads", [{}] * it)

            for name, values in ch.items():
                print(f"  ClickHouse {name:<24} p50 {pct(values, 50):6.1f} ms  p95 {pct(values, 95):6.1f} ms")
            # The admin overview keeps its closed periods (whole days and hours) between requests; here each
            # request starts an hour later than the one before, so none finds them kept (as after a late event).
            cold = await timed(
                http, "/v1/usage/admin", [{"since": int(time.time()) - 30 * DAY + 3600 * (k + 1)} for k in range(it)]
            )
            print(
                f"  ClickHouse admin usage, new window each  p50 {pct(cold, 50):6.1f} ms  p95 {pct(cold, 95):6.1f} ms"
                " (closed periods read from the rollups every time)"
            )

            # Freshness: one event published → visible in that user's usage.
            fresh = []
            producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks=1)
            await producer.start()
            try:
                for i in range(20):
                    uid = 10_000 + i
                    ev = make_event(
                        FileAccessed(user_id=uid, kind="download", repo_id="org/fresh", ts=time.time()), source="/bench"
                    )
                    t = time.perf_counter()
                    await producer.send_and_wait(svc.access_topic, encode_event(ev), key=ev.key)
                    async with asyncio.timeout(30):
                        while (await http.get(f"/v1/usage/users/{uid}")).json()["totals"]["events"] != 1:
                            await asyncio.sleep(0.02)
                    fresh.append((time.perf_counter() - t) * 1000)
            finally:
                await producer.stop()
            print(
                f"  freshness publish → visible in usage: p50 {pct(fresh, 50):.0f} ms, p95 {pct(fresh, 95):.0f} ms"
                " (target p95 ≤ 2000 ms)"
            )
        window = {"since": int(now) - 30 * DAY, "until": int(now)}
        svc.stop()

        # Postgres: the same rows (exported from the store), COPY, indexes, the same queries as GROUP BY.
        import clickhouse_connect

        dump = tmp / "events.tsv"
        client = clickhouse_connect.get_client(interface="chdb", path=str(svc.chdb), database="registry")
        client.command(
            f"SELECT event_id, toString(ts), user_id, kind, repo_id, bytes FROM access_events"
            f" INTO OUTFILE '{dump}' FORMAT TSV"
        )
        client.close()
        with psycopg.connect(pg_settings.database_url, autocommit=True) as conn:
            conn.execute("SET TIME ZONE 'UTC'")
            conn.execute("DROP SCHEMA IF EXISTS bench CASCADE")
            conn.execute("CREATE SCHEMA bench")
            conn.execute(
                "CREATE UNLOGGED TABLE bench.access_events (event_id text, ts timestamptz, user_id bigint,"
                " kind text, repo_id text, bytes bigint)"
            )
            t = time.perf_counter()
            copy_file(conn, dump, "COPY bench.access_events FROM STDIN")
            conn.execute("CREATE INDEX ON bench.access_events (user_id, ts)")
            conn.execute("CREATE INDEX ON bench.access_events (ts)")
            conn.execute("CREATE TABLE bench.users (user_id bigint primary key, email text, name text)")
            conn.execute(
                "INSERT INTO bench.users SELECT g, 'u' || g || '@bench.test', 'User ' || g"
                " FROM generate_series(0, %s) g",
                [N_USERS - 1],
            )
            conn.execute("VACUUM ANALYZE bench.access_events")
            n_pg = conn.execute("SELECT count(*) FROM bench.access_events").fetchone()[0]
            print(f"  Postgres: {n_pg:,} rows loaded with COPY + 2 indexes in {time.perf_counter() - t:.0f} s")
            assert n_pg == N_EVENTS + len(fresh)
            pit = 10
            pg = {
                "user usage, 30 days": pg_time(
                    conn, PG_USER, [{**window, "u": rng.randrange(N_USERS)} for _ in range(pit)], "AND user_id = %(u)s"
                ),
                "admin usage, 30 days": pg_time(conn, PG_ADMIN, [window] * 3, ""),
                "admin, filter_user_id": pg_time(
                    conn, PG_ADMIN, [{**window, "u": rng.randrange(N_USERS)} for _ in range(pit)], "AND user_id = %(u)s"
                ),
                "admin, filter_email": pg_time(
                    conn,
                    PG_ADMIN,
                    [{**window, "e": f"u{rng.randrange(N_USERS)}@bench.test"} for _ in range(pit)],
                    "AND user_id IN (SELECT user_id FROM bench.users WHERE lower(email) = lower(%(e)s))",
                ),
                "downloads per model": pg_time(
                    conn,
                    {"d": "SELECT repo_id, count(*) FROM bench.access_events WHERE kind = 'download' GROUP BY repo_id"},
                    [{}] * 3,
                    "",
                ),
            }
            conn.execute("DROP SCHEMA bench CASCADE")

        print(f"  {'query':<24}{'ClickHouse p50':>16}{'p95':>10}{'Postgres p50':>16}{'p95':>10}{'PG/CH p95':>11}")
        for name, values in ch.items():
            p50, p95 = pct(values, 50), pct(values, 95)
            q50, q95 = pct(pg[name], 50), pct(pg[name], 95)
            print(f"  {name:<24}{p50:>13.1f} ms{p95:>7.1f} ms{q50:>13.1f} ms{q95:>7.1f} ms{q95 / p95:>10.1f}x")
        print("  (ClickHouse: the analytics HTTP endpoint end to end; Postgres: the same SQL statements, summed)")
    finally:
        svc.stop()
        try:
            await admin.delete_topics([svc.access_topic, svc.users_topic])
        finally:
            await admin.close()
        shutil.rmtree(tmp, ignore_errors=True)
