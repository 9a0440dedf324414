"""Horizontal scale (README "Operate it → Scaling"), against the real stack: the seed's flows run through two
api processes (requests alternate between them), two ingest processes and two notifier processes, and

- every verdict is produced once and applied once (one verdict event, one `upload.verdict` audit row per
  upload), every webhook is delivered once (a real HTTP receiver counts deliveries by event id);
- a key rotated on one api is refused by the other at once (Postgres NOTIFY evicts its cached key);
- usage is exact: the analytics usage endpoints and the catalog's downloads counter (which every api process
  runs, in one consumer group) count each download once;
- the replicas of each consumer group split the partitions: each owns some and handles messages.

The test starts its own processes, with the stack's environment, on the replica ports of slots 8 and 9
(`<SERVICE>_PORT + 10*k`; `make up` replicas use slots 1, 2, ...), and stops only those, by PID:
- two api processes (consumers and relay on, as the stack's: they join the stack's api in its verdict and
  downloads groups); their webhook check allows this run's loopback receiver (WEBHOOK_ALLOW_PRIVATE_TARGETS);
- one ingest process beside the stack's (the same group, prefix and topics: two ingest replicas);
- two notifiers in a consumer group and deployment of their own that may reach this run's loopback address
  only (the stack's notifier, without that allowlist, leaves our subscriptions alone; test_notifier.py).
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
from aiokafka.partitioner import DefaultPartitioner
from notifier_helpers import LOOPBACK, Receiver, read_topic, receiver, wait_for
from prometheus_client.parser import text_string_to_metric_families

from registry_shared.devstack import TOPIC_PARTITIONS
from registry_shared.events import Topics, decode_event
from registry_shared.settings import PostgresSettings

ADMIN = {"x-admin-token": os.environ.get("REGISTRY_ADMIN_TOKEN", "changeme")}
SLOTS = (8, 9)
REPO_COUNT = 6  # two models on each partition of the registry's topics (key = repo_id)
DOWNLOADS_EACH = 3

PORTS = {"api": ("API_PORT", 8081), "ingest": ("INGEST_PORT", 8082), "notifier": ("NOTIFIER_PORT", 8084)}
MODULES = {"api": "registry_api.main", "ingest": "registry_ingest.main", "notifier": "registry_notifier.main"}


def replica_port(service: str, slot: int) -> int:
    """The port of replica `slot` of `service`: <SERVICE>_PORT + 10 * slot (deploy/local/stack.sh)."""
    var, default = PORTS[service]
    return int(os.environ.get(var, default)) + 10 * slot


class Replica:
    """One service process this test starts (the stack's environment, `env` on top) and stops, by PID."""

    def __init__(self, service: str, slot: int, env: dict[str, str]) -> None:
        self.service, self.slot, self.port = service, slot, replica_port(service, slot)
        self.name = f"{service}.{slot}"
        self.url = f"http://127.0.0.1:{self.port}"
        log_dir = Path(os.environ.get("LOG_DIR", tempfile.gettempdir()))
        self.log_path = log_dir / f"itest-replica-{self.name}.log"
        self._env = {**os.environ, **env, PORTS[service][0]: str(self.port)}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Replica:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", self.port)) == 0:
                pytest.fail(f"port {self.port} of {self.name} is taken (a replica of `make up` on slot {self.slot}?)")
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", f"from {MODULES[self.service]} import main; main()"],
                env=self._env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        wait_for(self._healthy, 90, f"{self.name} to answer /healthz", interval=0.3)
        return self

    def _healthy(self) -> dict | None:
        assert self.proc is not None and self.proc.poll() is None, f"{self.name} exited:\n{self.tail()}"
        try:
            r = httpx.get(f"{self.url}/healthz", timeout=2)
        except httpx.HTTPError:
            return None
        return r.json() if r.status_code == 200 else None

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM to our PID, SIGKILL after 20 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


# ---------------------------------------------------------------- what a process says in /metrics
def samples(url: str) -> list:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def owned(url: str, group: str, topic: str) -> set[int]:
    """Partitions of `topic` this process owns in consumer `group` (its registry_consumer_lag series)."""
    return {
        int(s.labels["partition"])
        for s in samples(url)
        if s.name == "registry_consumer_lag" and s.labels["group"] == group and s.labels["topic"] == topic
    }


def handled(url: str, group: str) -> float:
    """Messages this process's consumers of `group` handled so far."""
    return sum(
        s.value
        for s in samples(url)
        if s.name == "registry_consumer_messages_total"
        and s.labels["group"] == group
        and s.labels["outcome"] == "handled"
    )


def split_between(urls: list[str], group: str, topic: str) -> dict[str, set[int]]:
    """Wait until the processes at `urls` together own every partition of `topic` in `group`, each some."""
    want = set(range(TOPIC_PARTITIONS[topic]))

    def settled() -> dict[str, set[int]] | None:
        parts = {u: owned(u, group, topic) for u in urls}
        together = set().union(*parts.values())
        return parts if together == want and all(parts.values()) else None

    return wait_for(settled, 60, f"{group} to split {topic} between {urls}", interval=0.5)  # type: ignore[return-value]


# ---------------------------------------------------------------- the processes
@pytest.fixture(scope="module")
def tag() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture(scope="module")
def replicas(tag: str) -> Iterator[dict[str, list[Replica]]]:
    stack = {s: f"http://127.0.0.1:{replica_port(s, 0)}" for s in PORTS}
    for service, url in stack.items():
        try:
            httpx.get(f"{url}/healthz", timeout=5).raise_for_status()
        except httpx.HTTPError as exc:
            pytest.fail(f"the stack's {service} does not answer at {url} ({exc}): `make up` first")
    api_env = {"WEBHOOK_ALLOW_PRIVATE_TARGETS": f"{LOOPBACK}/32", "DB_POOL_MIN": "1", "DB_POOL_MAX": "8"}
    notifier_env = {
        "NOTIFIER_GROUP_ID": f"itest-replicas-{tag}",
        "NOTIFIER_DEPLOYMENT": f"itest-replicas-{tag}",
        "NOTIFIER_AUTO_OFFSET_RESET": "latest",
        "WEBHOOK_ALLOW_PRIVATE_TARGETS": f"{LOOPBACK}/32",
        "NOTIFIER_POLL_INTERVAL_S": "0.1",
        "SMTP_HOST": "",
        "DB_POOL_MIN": "1",
        "DB_POOL_MAX": "8",
    }
    started: dict[str, list[Replica]] = {"api": [], "ingest": [], "notifier": []}
    try:
        for slot in SLOTS:
            started["notifier"].append(Replica("notifier", slot, notifier_env).start())
        started["ingest"].append(Replica("ingest", SLOTS[0], {}).start())
        for slot in SLOTS:
            started["api"].append(Replica("api", slot, api_env).start())
        # Both notifiers own partitions and know where they start: events from now on reach the group.
        wait_for(
            lambda: all(httpx.get(f"{n.url}/healthz").json().get("consumer_ready") for n in started["notifier"]),
            60,
            "both notifiers' consumers",
        )
        yield started
    finally:
        for group in started.values():
            for replica in group:
                replica.stop()


def repo_ids(n: int) -> list[str]:
    """`n` repo ids (message keys) spread evenly over the partitions of the registry's 3-partition topics."""
    partitions = list(range(TOPIC_PARTITIONS[Topics.CATALOG]))
    by_partition: dict[int, list[str]] = {p: [] for p in partitions}
    while min(len(v) for v in by_partition.values()) < n // len(partitions):
        repo = f"ns{uuid.uuid4().hex[:10]}/scale-{uuid.uuid4().hex[:6]}"
        by_partition[DefaultPartitioner()(repo.encode(), partitions, partitions)].append(repo)
    return [r for p in partitions for r in by_partition[p][: n // len(partitions)]]


class Alternating:
    """Requests to the api processes in turn (each call goes to the next one)."""

    def __init__(self, urls: list[str]) -> None:
        self.clients = [httpx.Client(base_url=u, timeout=30) for u in urls]
        self.calls = 0
        self.per_client = Counter[int]()

    def next(self) -> httpx.Client:
        i = self.calls % len(self.clients)
        self.calls += 1
        self.per_client[i] += 1
        return self.clients[i]

    def __getattr__(self, method: str):  # get, post, put, delete
        return lambda *a, **kw: getattr(self.next(), method)(*a, **kw)

    def close(self) -> None:
        for c in self.clients:
            c.close()


# ---------------------------------------------------------------- the flows
def test_the_seed_flows_through_two_of_each(replicas: dict[str, list[Replica]], tag: str) -> None:
    apis = [r.url for r in replicas["api"]]
    ingests = [f"http://127.0.0.1:{replica_port('ingest', 0)}"] + [r.url for r in replicas["ingest"]]
    notifiers = [r.url for r in replicas["notifier"]]
    notifier_group = f"itest-replicas-{tag}"
    http = Alternating(apis)

    # Each group split between the replicas: the api's two (with the stack's api), ingest's, the notifiers'.
    api_all = [f"http://127.0.0.1:{replica_port('api', 0)}", *apis]
    for group, topic in (("registry-api-verdicts", Topics.VERDICTS), ("registry-api-downloads", Topics.ACCESS)):
        split_between(api_all, group, topic)
    for topic in (Topics.UPLOADS, Topics.MINIO_EVENTS):
        split_between(ingests, os.environ.get("INGEST_GROUP_ID", "registry-ingest"), topic)
    for topic in (Topics.CATALOG, Topics.VERDICTS):
        split_between(notifiers, notifier_group, topic)
    ingest_before = [handled(u, os.environ.get("INGEST_GROUP_ID", "registry-ingest")) for u in ingests]
    notifier_before = [handled(u, notifier_group) for u in notifiers]

    try:
        with receiver() as dev_hooks, receiver() as plat_hooks:
            _flows(http, dev_hooks, plat_hooks)
    finally:
        http.close()

    # Both ingest and both notifier processes handled messages (every partition carried some).
    ingest_after = [handled(u, os.environ.get("INGEST_GROUP_ID", "registry-ingest")) for u in ingests]
    assert all(a > b for a, b in zip(ingest_after, ingest_before, strict=True)), (ingest_before, ingest_after)
    notifier_after = [handled(u, notifier_group) for u in notifiers]
    assert all(a > b for a, b in zip(notifier_after, notifier_before, strict=True)), (notifier_before, notifier_after)


def _flows(http: Alternating, dev_hooks: Receiver, plat_hooks: Receiver) -> None:
    # Accounts and subscriptions (a developer and a platform user, each with a webhook).
    r = http.post("/v1/users/register", json={"email": f"dev-{uuid.uuid4().hex[:10]}@example.com", "name": "Dev"})
    assert r.status_code == 200, r.text
    dev_key = r.json()["api_key"]
    plat_email = f"plat-{uuid.uuid4().hex[:10]}@partner.example"
    r = http.post("/v1/admin/users", headers=ADMIN, json={"email": plat_email, "name": "Plat", "role": "platform"})
    assert r.status_code == 200, r.text
    plat_id, plat_key = r.json()["user_id"], r.json()["api_key"]
    dev_types = ["upload.verified", "upload.rejected", "version.created", "user.key_rotated"]
    r = http.post("/v1/webhooks", headers={"x-api-key": dev_key}, json={"url": dev_hooks.url, "event_types": dev_types})
    assert r.status_code == 201, r.text
    dev_hook = r.json()["id"]
    plat_types = ["grant.created", "version.created"]
    r = http.post(
        "/v1/webhooks", headers={"x-api-key": plat_key}, json={"url": plat_hooks.url, "event_types": plat_types}
    )
    assert r.status_code == 201, r.text
    plat_hook = r.json()["id"]

    # Models on every partition, a version each, a good and a bad upload each (initiate, PUT, complete: the
    # steps alternate between the api processes).
    repos = repo_ids(REPO_COUNT)
    dev = {"x-api-key": dev_key}
    uploads: dict[int, tuple[str, bool]] = {}
    for repo in repos:
        body = {"repo_id": repo, "model_name": f"Model {repo}", "visibility": "private"}
        assert http.post("/v1/dev/models", headers=dev, json=body).status_code == 201
        assert http.post(f"/v1/dev/models/{repo}/versions", headers=dev, json={"version": "v1"}).status_code == 201
        for name, good in (("weights.bin", True), ("broken.bin", False)):
            data = f"{repo}/{name}/".encode() * 64
            r = http.post(
                f"/v1/dev/models/{repo}/versions/v1/uploads/initiate",
                params={"filename": name, "expires": 900},
                headers=dev,
            )
            assert r.status_code == 200, r.text
            assert httpx.put(r.json()["url"], content=data, timeout=60).status_code == 200
            sha = hashlib.sha256(data).hexdigest() if good else "0" * 64
            done = http.post(
                f"/v1/dev/models/{repo}/versions/v1/uploads/complete",
                headers=dev,
                json={"rfilename": name, "size": len(data), "sha256": sha},
            )
            assert done.status_code == 200, done.text
            uploads[done.json()["upload_id"]] = (repo, good)

    def verdicts_applied() -> bool:
        states = [http.get(f"/v1/dev/uploads/{u}", headers=dev).json() for u in uploads]
        return all(s["status"] not in ("initiated", "pending_verification") for s in states)

    wait_for(verdicts_applied, 90, "every verdict", interval=0.3)
    for upload_id, (_repo, good) in uploads.items():
        state = http.get(f"/v1/dev/uploads/{upload_id}", headers=dev).json()
        assert state["status"] == ("available" if good else "rejected"), state

    # Grants, then a second version each: the platform user hears of v2 only.
    plat = {"x-api-key": plat_key}
    for repo in repos:
        body = {"platform_user_id": plat_id, "repo_id": repo, "permitted_from_ts": int(time.time()) - 60}
        assert http.post("/v1/admin/grants", headers=ADMIN, json=body).status_code == 201
    for repo in repos:
        assert http.post(f"/v1/dev/models/{repo}/versions", headers=dev, json={"version": "v2"}).status_code == 201

    # Downloads, alternating.
    t0 = time.time()
    for repo in repos:
        for _ in range(DOWNLOADS_EACH):
            r = http.get(f"/v1/files/{repo}/weights.bin/download", headers=plat, params={"version": "v1"})
            assert r.status_code == 200, r.text

    # A key rotated on one api is refused by the other at once, and the new key works there at once; the other
    # process has the old key cached (it served it just before).
    keys = {"dev": dev_key}
    rotations = 0
    for i in range(4):
        here, there = http.clients[i % 2], http.clients[(i + 1) % 2]
        old = keys["dev"]
        assert there.get("/v1/users/me", headers={"x-api-key": old}).status_code == 200
        r = here.post("/v1/users/rotate-key", headers={"x-api-key": old})
        assert r.status_code == 200, r.text
        rotations += 1
        keys["dev"] = r.json()["api_key"]
        refused = there.get("/v1/users/me", headers={"x-api-key": old})
        assert refused.status_code == 401, f"rotation {i}: the old key still works on the other api: {refused.text}"
        assert there.get("/v1/users/me", headers={"x-api-key": keys["dev"]}).status_code == 200
    dev = {"x-api-key": keys["dev"]}

    # Every webhook once: developer — per repo a verified, a rejected and two versions, and each rotation;
    # platform user — per repo a grant and v2.
    want_dev = {
        "registry.upload.verified.v1": REPO_COUNT,
        "registry.upload.rejected.v1": REPO_COUNT,
        "registry.version.created.v1": 2 * REPO_COUNT,
        "registry.user.key_rotated.v1": rotations,
    }
    want_plat = {"registry.grant.created.v1": REPO_COUNT, "registry.version.created.v1": REPO_COUNT}

    def arrived(hooks: Receiver, want: dict[str, int]) -> bool:
        return len(hooks.events()) >= sum(want.values())

    wait_for(lambda: arrived(dev_hooks, want_dev) and arrived(plat_hooks, want_plat), 90, "the webhooks", interval=0.3)
    time.sleep(3)  # a duplicate would have come by now (both notifiers poll every 0.1 s)
    for hooks, want in ((dev_hooks, want_dev), (plat_hooks, want_plat)):
        ids = Counter(hooks.event_ids())
        twice = [
            (x.event["type"], x.event["id"], x.headers.get("webhook-id"))
            for x in hooks.events()
            if ids[x.event["id"]] > 1
        ]
        assert twice == [], f"webhooks delivered more than once: {twice}"
        assert Counter(x.event["type"] for x in hooks.events()) == want
    for user_headers, hook_id in ((dev, dev_hook), (plat, plat_hook)):
        log = http.get(f"/v1/webhooks/{hook_id}/deliveries", headers=user_headers, params={"limit": 500}).json()
        assert all(d["status"] == "delivered" for d in log["items"])
        assert len({d["event_id"] for d in log["items"]}) == len(log["items"])

    # Every verdict produced once (one event per upload on the verdicts topic) and applied once (one audit row).
    verdict_events = Counter(
        decode_event(rec.value).data["upload_id"]
        for rec in read_topic(Topics.VERDICTS, lambda rec: rec.key is not None and rec.key.decode() in repos)
    )
    assert verdict_events == Counter(dict.fromkeys(uploads, 1))
    with psycopg.connect(PostgresSettings().database_url) as conn:
        rows = conn.execute(
            "select target_id, count(*) from audit_log where action = 'upload.verdict' and target_id = any(%s)"
            " group by target_id",
            [[str(u) for u in uploads]],
        ).fetchall()
        files = conn.execute(
            "select m.repo_id, count(*) from files f join models m on m.id = f.model_id where m.repo_id = any(%s)"
            " group by m.repo_id",
            [repos],
        ).fetchall()
    assert dict(rows) == {str(u): 1 for u in uploads}
    assert dict(files) == dict.fromkeys(repos, 1)

    # Usage exact: the analytics service's numbers and the catalog's downloads counter.
    total = DOWNLOADS_EACH * REPO_COUNT

    def usage() -> dict | None:
        body = http.get("/v1/users/me/usage", headers=plat).json()
        return body if body.get("totals", {}).get("downloads") == total else None

    me = wait_for(usage, 60, f"{total} downloads in the usage", interval=0.5)
    assert me["totals"]["downloads"] == total and me["last_seen_ts"] >= int(t0)  # type: ignore[index]
    admin = http.get("/v1/admin/usage", params={"filter_user_id": plat_id}, headers=ADMIN).json()
    assert admin["totals"]["downloads"] == total

    def counters() -> dict[str, int]:
        return {repo: http.get(f"/v1/models/{repo}", headers=dev).json()["downloads"] for repo in repos}

    wait_for(lambda: counters() == dict.fromkeys(repos, DOWNLOADS_EACH), 60, "the catalog's downloads counters")
    time.sleep(2)  # another api's download counter would have added its own count by now
    assert counters() == dict.fromkeys(repos, DOWNLOADS_EACH)
    assert min(http.per_client.values()) >= http.calls // 2 - 1  # both api processes took half of the requests
