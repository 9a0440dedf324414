"""The analytics service end to end: its own process, real Kafka, the in-process ClickHouse engine (chDB).

Each test module run starts `registry-analytics` on a free port with its own chDB folder, consumer group
and topics, publishes CloudEvents to Kafka and checks the usage endpoints against numbers computed here
from the events sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
import signal
import socket
import subprocess
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from registry_shared.events import FileAccessed, UserRegistered, encode_event, make_event

ROOT = Path(__file__).resolve().parents[2]
KINDS = ["download", "manifest", "files_list", "platform_manifest", "model_detail", "changes"]
DAY = 86_400


# ---------------------------------------------------------------- the service under test
@dataclass
class Access:
    """An access event as sent (and the reference the expected numbers are computed from)."""

    id: str
    user_id: int
    kind: str
    repo_id: str | None
    ts: float

    def encoded(self) -> tuple[bytes | None, bytes]:
        data = FileAccessed(user_id=self.user_id, kind=self.kind, repo_id=self.repo_id, version="v1", ts=self.ts)
        event = make_event(data, source="/test", id=self.id)
        return event.key, encode_event(event)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AnalyticsProcess:
    """`uv run --no-sync registry-analytics` with its own port, chDB folder, group and topics."""

    def __init__(self, tmp: Path, tag: str, bootstrap: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.bootstrap = bootstrap
        self.access_topic, self.users_topic = f"test.access.{tag}", f"test.users.{tag}"
        self.dlq_topic = f"test.dlq.{tag}"
        self.env = {
            **os.environ,
            "ANALYTICS_PORT": str(self.port),
            "CLICKHOUSE_MODE": "chdb",
            "CHDB_PATH": str(tmp / "chdb"),
            "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            "ANALYTICS_GROUP_ID": f"test-analytics-{tag}",
            "ANALYTICS_ACCESS_TOPIC": self.access_topic,
            "ANALYTICS_USERS_TOPIC": self.users_topic,
            "ANALYTICS_DEAD_LETTER_TOPIC": self.dlq_topic,
            "ANALYTICS_FLUSH_INTERVAL_MS": "100",
            "ANALYTICS_GROUP_INSTANCE_ID": f"test-analytics-{tag}-0",
            "LOG_LEVEL": "info",
        }
        self.log_path = tmp / "analytics.log"
        self.proc: subprocess.Popen | None = None

    async def create_topics(self) -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        await admin.start()
        try:
            await admin.create_topics(
                [
                    NewTopic(self.access_topic, num_partitions=3, replication_factor=1),
                    NewTopic(self.users_topic, num_partitions=3, replication_factor=1),
                    NewTopic(self.dlq_topic, num_partitions=1, replication_factor=1),
                ]
            )
        finally:
            await admin.close()

    async def delete_topics(self) -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        await admin.start()
        try:
            with contextlib.suppress(Exception):  # best effort
                await admin.delete_topics([self.access_topic, self.users_topic, self.dlq_topic])
        finally:
            await admin.close()

    def spawn(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                ["uv", "run", "--no-sync", "registry-analytics"],
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    async def start(self) -> None:
        """Spawn the process and wait until its loader is ready (assigned, crash replay done)."""
        self.spawn()
        async with httpx.AsyncClient(base_url=self.url, timeout=2) as http:
            async with asyncio.timeout(60):
                while True:
                    assert self.proc.poll() is None, self.log_path.read_text()[-3000:]
                    try:
                        health = (await http.get("/healthz")).json()
                        if health.get("loader", {}).get("ready"):
                            return
                    except httpx.HTTPError:
                        pass
                    await asyncio.sleep(0.2)

    def kill(self) -> None:
        """SIGKILL the whole process group (uv and the service under it)."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


async def publish(bootstrap: str, topic: str, messages: Iterable[tuple[bytes | None, bytes]]) -> int:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5, max_batch_size=1 << 20)
    await producer.start()
    n = 0
    try:
        futures = []
        for key, value in messages:
            futures.append(await producer.send(topic, value, key=key))
            n += 1
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return n


async def publish_users(svc: AnalyticsProcess, users: dict[int, tuple[str, str]]) -> None:
    msgs = []
    for uid, (email, name) in users.items():
        ev = make_event(UserRegistered(user_id=uid, email=email, name=name, role="platform"), source="/test")
        msgs.append((ev.key, encode_event(ev)))
    await publish(svc.bootstrap, svc.users_topic, msgs)


# ---------------------------------------------------------------- the expected numbers
def utc_day(ts: float) -> str:
    return datetime.fromtimestamp(math.floor(ts), UTC).strftime("%Y-%m-%d")


def expected(
    events: list[Access],
    since: int,
    until: int,
    users: set[int] | None = None,
    names: dict[int, tuple[str, str]] | None = None,
    top_models_limit: int = 20,
    top_users_limit: int = 50,
) -> dict:
    sel = [e for e in events if since <= math.floor(e.ts) <= until and (users is None or e.user_id in users)]
    dl = Counter(e.repo_id for e in sel if e.kind == "download" and e.repo_id)
    days: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    per_user: dict[int, list[int]] = defaultdict(lambda: [0, 0, 0])
    for e in sel:
        days[utc_day(e.ts)][0] += 1
        days[utc_day(e.ts)][1] += e.kind == "download"
        u = per_user[e.user_id]
        u[0] += 1
        u[1] += e.kind == "download"
        u[2] = max(u[2], math.floor(e.ts))
    body = {
        "window": {"since": since, "until": until},
        "totals": {
            "events": len(sel),
            "manifests": sum(e.kind in ("manifest", "platform_manifest") for e in sel),
            "files_list": sum(e.kind == "files_list" for e in sel),
            "downloads": sum(e.kind == "download" for e in sel),
        },
        "last_seen_ts": max((math.floor(e.ts) for e in sel), default=None),
        "distinct_models": len({e.repo_id for e in sel if e.repo_id}),
        "top_models": [{"repo_id": r, "downloads": d} for r, d in sorted(dl.items(), key=lambda kv: (-kv[1], kv[0]))][
            :top_models_limit
        ],
        "timeseries_daily": [{"day": d, "events": v[0], "downloads": v[1]} for d, v in sorted(days.items())],
    }
    if names is not None:
        ranked = sorted(per_user.items(), key=lambda kv: (-kv[1][0], -kv[1][1], kv[0]))[:top_users_limit]
        body["top_users"] = [
            {
                "user_id": uid,
                "email": names.get(uid, (None, None))[0],
                "name": names.get(uid, (None, None))[1],
                "events": v[0],
                "downloads": v[1],
                "last_seen_ts": v[2],
            }
            for uid, v in ranked
        ]
    return body


def make_events(rng: random.Random, n: int, users: list[int], models: list[str], start: float, days: int) -> list:
    out = []
    for _ in range(n):
        kind = rng.choice(KINDS)
        repo = None if kind == "changes" and rng.random() < 0.7 else rng.choice(models)
        ts = round(start + rng.random() * days * DAY, 3)
        out.append(Access(str(uuid.uuid4()), rng.choice(users), kind, repo, ts))
    return out


async def wait_for_total(http: httpx.AsyncClient, params: dict, total: int, limit: float = 60) -> dict:
    body: dict = {}
    async with asyncio.timeout(limit):
        while True:
            body = (await http.get("/v1/usage/admin", params=params)).json()
            if body.get("totals", {}).get("events") == total:
                return body
            await asyncio.sleep(0.2)


# ---------------------------------------------------------------- fixtures
START = datetime(2025, 3, 10, tzinfo=UTC).timestamp()  # 5 days of history from here
USERS = {
    101: ("ada@example.com", "Ada"),
    102: ("bob@example.com", "Bob"),
    103: ("cyd@example.org", "Cyd"),
}
MODELS = ["acme/alpha", "acme/beta", "meta-llama/Llama-3-8B", "org/gamma"]
WIDE = {"since": int(START) - DAY, "until": int(START) + 10 * DAY}


@pytest.fixture(scope="module")
async def svc(tmp_path_factory, kafka_settings):
    tag = uuid.uuid4().hex[:10]
    svc = AnalyticsProcess(tmp_path_factory.mktemp("analytics"), tag, kafka_settings.kafka_bootstrap_servers)
    await svc.create_topics()
    await svc.start()
    yield svc
    svc.stop()
    await svc.delete_topics()


@pytest.fixture(scope="module")
async def loaded(svc):
    """Events of three users on four models over five days (and one unknown user), loaded."""
    rng = random.Random(5)
    events = make_events(rng, 600, [*USERS, 104], MODELS, START, 5)
    # Events at exact second and day boundaries, to pin down the window's edges.
    events += [
        Access(str(uuid.uuid4()), 101, "download", "acme/alpha", START + 2 * DAY),
        Access(str(uuid.uuid4()), 101, "download", "acme/alpha", START + 2 * DAY - 0.001),
        Access(str(uuid.uuid4()), 102, "manifest", "acme/beta", START + 3 * DAY + 0.999),
    ]
    await publish_users(svc, USERS)
    await publish(svc.bootstrap, svc.access_topic, (e.encoded() for e in events))
    async with httpx.AsyncClient(base_url=svc.url, timeout=10) as http:
        await wait_for_total(http, WIDE, len(events))
        # The users dimension arrives on its own topic: wait until the admin view has the names.
        async with asyncio.timeout(30):
            while True:
                body = (await http.get("/v1/usage/admin", params=WIDE)).json()
                if {u["email"] for u in body["top_users"]} >= {e for e, _ in USERS.values()}:
                    break
                await asyncio.sleep(0.2)
    return events


# ---------------------------------------------------------------- tests
WINDOWS = [
    (int(START) - DAY, int(START) + 10 * DAY),  # everything, whole days and empty edges
    (int(START) + 2 * DAY, int(START) + 3 * DAY),  # one whole day plus the first second of the next
    (int(START) + 7_200, int(START) + 3 * DAY + 45_000),  # partial days at both ends
    (int(START) + DAY + 3_600, int(START) + DAY + 7_000),  # inside one day: raw events only
    (int(START) + 2 * DAY - 1, int(START) + 2 * DAY - 1),  # a single second
]


@pytest.mark.parametrize("since,until", WINDOWS)
async def test_user_usage_is_exact(svc, loaded, since, until):
    async with httpx.AsyncClient(base_url=svc.url, timeout=10) as http:
        for uid in [*USERS, 104, 999]:
            resp = await http.get(f"/v1/usage/users/{uid}", params={"since": since, "until": until})
            assert resp.status_code == 200, resp.text
            assert resp.json() == expected(loaded, since, until, users={uid}), uid


@pytest.mark.parametrize("since,until", WINDOWS)
async def test_admin_usage_is_exact(svc, loaded, since, until):
    async with httpx.AsyncClient(base_url=svc.url, timeout=10) as http:
        resp = await http.get("/v1/usage/admin", params={"since": since, "until": until})
        assert resp.status_code == 200, resp.text
        assert resp.json() == expected(loaded, since, until, names=USERS, top_models_limit=100)


async def test_admin_filters_and_limits(svc, loaded):
    since, until = WIDE["since"], WIDE["until"]
    async with httpx.AsyncClient(base_url=svc.url, timeout=10) as http:

        async def admin(**params):
            resp = await http.get("/v1/usage/admin", params={"since": since, "until": until, **params})
            assert resp.status_code == 200, resp.text
            return resp.json()

        by_id = await admin(filter_user_id=102)
        assert by_id == expected(loaded, since, until, users={102}, names=USERS, top_models_limit=100)
        assert [u["user_id"] for u in by_id["top_users"]] == [102]
        assert by_id["top_users"][0]["email"] == "bob@example.com"

        by_email = await admin(filter_email="ADA@example.com")  # e-mails compare case-insensitively
        assert by_email == expected(loaded, since, until, users={101}, names=USERS, top_models_limit=100)

        both = await admin(filter_user_id=101, filter_email="ada@example.com")
        assert both == by_email
        mismatch = await admin(filter_user_id=102, filter_email="ada@example.com")
        assert mismatch["totals"] == {"events": 0, "manifests": 0, "files_list": 0, "downloads": 0}
        assert mismatch["top_users"] == [] and mismatch["last_seen_ts"] is None
        unknown = await admin(filter_email="nobody@example.com")
        assert unknown["totals"]["events"] == 0 and unknown["distinct_models"] == 0

        limited = await admin(top_users_limit=2, top_models_limit=1)
        full = expected(loaded, since, until, names=USERS, top_models_limit=1, top_users_limit=2)
        assert limited == full and len(limited["top_users"]) == 2 and len(limited["top_models"]) == 1
        # A user the analytics never saw a registration for has no e-mail or name.
        no_name = await admin(filter_user_id=104)
        assert no_name["top_users"][0]["email"] is None and no_name["top_users"][0]["name"] is None

        resp = await http.get("/v1/usage/users/101", params={"since": since, "until": until, "top_models_limit": 2})
        assert resp.json()["top_models"] == expected(loaded, since, until, users={101})["top_models"][:2]

        counts = (await http.get("/v1/usage/downloads", params={"since_ts": since})).json()
        dl = Counter(e.repo_id for e in loaded if e.kind == "download")
        assert counts == {"items": [{"repo_id": r, "downloads": dl[r]} for r in sorted(dl)]}


async def test_duplicates_and_redeliveries_never_count_twice(svc, loaded):
    async with httpx.AsyncClient(base_url=svc.url, timeout=10) as http:
        before = (await http.get("/v1/usage/admin", params=WIDE)).json()
        # Redeliver a third of the events (same CloudEvent ids) twice, plus fresh ones with in-batch copies.
        rng = random.Random(7)
        fresh = make_events(rng, 50, [101, 103], MODELS, START, 5)
        again = [e.encoded() for e in rng.sample(loaded, len(loaded) // 3)]
        msgs = again + [e.encoded() for e in fresh] * 2 + again
        rng.shuffle(msgs)
        await publish(svc.bootstrap, svc.access_topic, msgs)
        sentinel = Access(str(uuid.uuid4()), 103, "download", "org/gamma", START + 4 * DAY + 1)
        await publish(svc.bootstrap, svc.access_topic, [sentinel.encoded()])
        total = len(loaded) + len(fresh) + 1
        after = await wait_for_total(http, WIDE, total)
        await asyncio.sleep(1)  # anything still in flight would have landed by now
        after = (await http.get("/v1/usage/admin", params=WIDE)).json()
        everything = [*loaded, *fresh, sentinel]
        assert after == expected(everything, WIDE["since"], WIDE["until"], names=USERS, top_models_limit=100)
        assert after["totals"]["events"] == before["totals"]["events"] + len(fresh) + 1
        health = (await http.get("/healthz")).json()
        assert health["loader"]["duplicates"] >= len(again) * 2 + len(fresh)


async def test_defaults_window_and_validation(svc):
    now = time.time()
    recent = [Access(str(uuid.uuid4()), 555, "download", "acme/alpha", now - 3600 * h) for h in (1, 2, 24 * 29)]
    old = Access(str(uuid.uuid4()), 555, "download", "acme/alpha", now - 31 * DAY)
    await publish(svc.bootstrap, svc.access_topic, [e.encoded() for e in [*recent, old]])
    async with httpx.AsyncClient(base_url=svc.url, timeout=10) as http:
        async with asyncio.timeout(30):
            while True:
                body = (await http.get("/v1/usage/users/555")).json()
                if body["totals"]["events"] == 3:
                    break
                await asyncio.sleep(0.2)
        until = body["window"]["until"]
        assert abs(until - time.time()) < 30 and body["window"]["since"] == until - 30 * DAY
        assert body["totals"]["downloads"] == 3 and body["top_models"] == [{"repo_id": "acme/alpha", "downloads": 3}]
        assert set(body) == {"window", "totals", "last_seen_ts", "distinct_models", "top_models", "timeseries_daily"}
        admin = (await http.get("/v1/usage/admin", params={"filter_user_id": 555})).json()
        assert admin["totals"]["events"] == 3
        assert set(admin) == {*body, "top_users"}

        bad = [
            ("/v1/usage/users/555", {"since": 200, "until": 100}),
            ("/v1/usage/users/555", {"since": "yesterday"}),
            ("/v1/usage/users/555", {"top_models_limit": 0}),
            ("/v1/usage/users/555", {"top_models_limit": 201}),
            ("/v1/usage/users/555", {"until": -1}),
            ("/v1/usage/users/abc", {}),
            ("/v1/usage/admin", {"since": 10, "until": 9}),
            ("/v1/usage/admin", {"top_users_limit": 501}),
            ("/v1/usage/admin", {"top_users_limit": 0}),
            ("/v1/usage/admin", {"top_models_limit": 1001}),
            ("/v1/usage/admin", {"filter_user_id": "x"}),
            ("/v1/usage/admin", {"since": 1.5}),
            ("/v1/usage/downloads", {"since_ts": "soon"}),
        ]
        for path, params in bad:
            resp = await http.get(path, params=params)
            assert resp.status_code == 422, (path, params, resp.text)
            detail = resp.json()["detail"]
            assert isinstance(detail, str) and detail, (path, params, detail)
        resp = await http.get("/v1/usage/users/555", params={"since": 200, "until": 100})
        assert "since" in resp.json()["detail"] and "until" in resp.json()["detail"]
        ok = await http.get("/v1/usage/admin", params={"top_users_limit": 500, "top_models_limit": 1000})
        assert ok.status_code == 200
        ok = await http.get("/v1/usage/users/555", params={"top_models_limit": 200, "since": 5, "until": 5})
        assert ok.status_code == 200 and ok.json()["totals"]["events"] == 0


async def test_invalid_events_are_dead_lettered_not_counted(svc, loaded):
    from aiokafka import AIOKafkaConsumer

    good = Access(str(uuid.uuid4()), 777, "download", "acme/beta", START + DAY)
    bad_kind = make_event(FileAccessed(user_id=777, kind="download", ts=START + DAY), source="/test")
    bad = bad_kind.model_copy(update={"data": {**bad_kind.data, "kind": "teleport"}})
    await publish(svc.bootstrap, svc.access_topic, [(None, b"not json"), (None, encode_event(bad)), good.encoded()])
    async with httpx.AsyncClient(base_url=svc.url, timeout=10) as http:
        async with asyncio.timeout(30):
            while (await http.get("/v1/usage/users/777", params=WIDE)).json()["totals"]["events"] != 1:
                await asyncio.sleep(0.2)
    consumer = AIOKafkaConsumer(svc.dlq_topic, bootstrap_servers=svc.bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    got = []
    try:
        async with asyncio.timeout(20):
            while len(got) < 2:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    got.extend(records)
    finally:
        await consumer.stop()
    assert sorted(r.value for r in got) == sorted([b"not json", encode_event(bad)])


# ---------------------------------------------------------------- SIGKILL in the middle of a batch
async def test_sigkill_mid_batch_loses_and_doubles_nothing(tmp_path, kafka_settings):
    tag = uuid.uuid4().hex[:10]
    svc = AnalyticsProcess(tmp_path, tag, kafka_settings.kafka_bootstrap_servers)
    svc.env["ANALYTICS_BATCH_MAX_EVENTS"] = "20000"
    await svc.create_topics()
    rng = random.Random(11)
    users = list(range(1, 41))
    models = [f"org/m{i}" for i in range(30)]
    events = make_events(rng, 150_000, users, models, START, 4)
    # Redelivered copies spread through the stream as well.
    copies = rng.sample(events, 5_000)
    messages = [e.encoded() for e in events] + [e.encoded() for e in copies]
    rng.shuffle(messages)
    try:
        await publish(svc.bootstrap, svc.access_topic, messages)
        kills = replays = 0
        async with httpx.AsyncClient(base_url=svc.url, timeout=10) as http:
            # Kill while a batch is being inserted (its manifest written, its offsets not committed yet),
            # until a restart has had to replay one: at least twice, at most five times.
            while kills < 2 or (replays == 0 and kills < 5):
                await svc.start()
                replays += (await http.get("/healthz")).json()["loader"]["replayed"]
                async with asyncio.timeout(60):
                    while (await http.get("/healthz")).json()["loader"]["phase"] != "inserting":
                        await asyncio.sleep(0.005)
                svc.kill()
                kills += 1
            await svc.start()
            replays += (await http.get("/healthz")).json()["loader"]["replayed"]
            assert replays >= 1, "no kill landed inside a batch"
            wide = {"since": int(START) - DAY, "until": int(START) + 10 * DAY}
            await wait_for_total(http, wide, len(events), limit=90)
            await asyncio.sleep(1)
            admin = (await http.get("/v1/usage/admin", params={**wide, "top_users_limit": 500})).json()
            assert admin == expected(
                events, wide["since"], wide["until"], names={}, top_models_limit=100, top_users_limit=500
            )
            # Rollup only (whole days) and raw only (inside one day) agree with the events too.
            for since, until in [(int(START), int(START) + 2 * DAY - 1), (int(START) + 3600, int(START) + 80_000)]:
                for uid in (1, 17, 40):
                    body = (await http.get(f"/v1/usage/users/{uid}", params={"since": since, "until": until})).json()
                    assert body == expected(events, since, until, users={uid})
    finally:
        svc.stop()
        await svc.delete_topics()
