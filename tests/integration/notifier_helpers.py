"""Real things the webhook and notifier tests run: an api and a notifier process of their own, an HTTP
receiver and an SMTP server on loopback, and a Kafka producer for the verdict events."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path

import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiosmtpd.controller import Controller
from ingest_helpers import topic_partitions

from registry_shared.events import EVENT_TYPES, EventData, encode_event, make_event
from registry_shared.settings import KafkaSettings

ADMIN_TOKEN = os.environ.get("REGISTRY_ADMIN_TOKEN", "changeme")

#: The loopback address of this test run's receivers, and the only private target its notifier may reach.
#: Two runs at once (two engineers, or CI beside a developer) pick different addresses, so neither
#: notifier queues the other's deliveries; the stack's notifier, without an allowlist, queues none.
LOOPBACK = f"127.0.0.{random.randint(2, 250)}"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.1) -> object:
    """Poll `predicate` until it returns something truthy; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# ---------------------------------------------------------------- service processes


class ServiceProcess:
    """A service of this repository run as its own process on a free port (stopped by `stop`)."""

    def __init__(self, module: str, port_env: str, env: dict[str, str], name: str) -> None:
        self.port = free_port()
        self.name = name
        self.log_path = Path(tempfile.gettempdir()) / f"{name}-{self.port}.log"
        self._env = {**os.environ, **env, port_env: str(self.port), "LOG_LEVEL": "warning"}
        self._module = module
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> ServiceProcess:
        """Start and wait until GET /healthz answers."""
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", f"from {self._module} import main; main()"],
            env=self._env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()

        def healthy() -> dict | None:
            assert self.proc is not None and self.proc.poll() is None, f"{self.name} exited: {self.tail()}"
            try:
                r = httpx.get(f"{self.url}/healthz", timeout=2)
                return r.json() if r.status_code == 200 else None
            except httpx.HTTPError:
                return None

        wait_for(healthy, timeout, f"{self.name} to answer /healthz", interval=0.2)
        return self

    def health(self) -> dict:
        return httpx.get(f"{self.url}/healthz", timeout=5).json()

    def tail(self, n: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        return ""

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 15 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)


def api_process(allow_private: str, relay: bool = False) -> ServiceProcess:
    """An api of our own, without consumers. With `relay`, it also runs the outbox relay: only one relay of
    the shared outbox publishes at a time (advisory lock), so it takes over only if the stack's api is not
    relaying, and the tests do not depend on the stack's api being up."""
    return ServiceProcess(
        "registry_api.main",
        "API_PORT",
        {
            "OUTBOX_RELAY": "true" if relay else "false",
            "API_CONSUME_EVENTS": "false",
            "WEBHOOK_ALLOW_PRIVATE_TARGETS": allow_private,
            "REGISTRY_ADMIN_TOKEN": ADMIN_TOKEN,
            "REGISTRATION_POLICY": "open",
            "DB_POOL_MIN": "1",
            "DB_POOL_MAX": "5",
        },
        "test-api",
    )


def notifier_process(group: str, deployment: str, smtp_port: int | None, **extra: str) -> ServiceProcess:
    """A notifier of our own in its own consumer group, starting at the end of the topics."""
    env = {
        "NOTIFIER_GROUP_ID": group,
        "NOTIFIER_AUTO_OFFSET_RESET": "latest",
        "NOTIFIER_DEPLOYMENT": deployment,
        "WEBHOOK_ALLOW_PRIVATE_TARGETS": f"{LOOPBACK}/32",
        "NOTIFIER_POLL_INTERVAL_S": "0.1",
        "DB_POOL_MIN": "1",
        "DB_POOL_MAX": "10",
        "SMTP_HOST": "127.0.0.1" if smtp_port else "",
        "SMTP_PORT": str(smtp_port or 25),
        **extra,
    }
    return ServiceProcess("registry_notifier.main", "NOTIFIER_PORT", env, "test-notifier")


def wait_consumer_ready(notifier: ServiceProcess, timeout: float = 30.0) -> None:
    """Wait until the notifier has its partitions and knows where it starts (events after this reach it)."""
    wait_for(lambda: notifier.health().get("consumer_ready"), timeout, "the notifier's consumer", interval=0.2)


# ---------------------------------------------------------------- the api over HTTP


@dataclass
class User:
    user_id: int
    api_key: str
    email: str

    @property
    def headers(self) -> dict[str, str]:
        return {"x-api-key": self.api_key}


class Api:
    """A small client of the api for these tests."""

    def __init__(self, base_url: str) -> None:
        self.http = httpx.Client(base_url=base_url, timeout=30)
        self.admin = {"x-admin-token": ADMIN_TOKEN}

    def close(self) -> None:
        self.http.close()

    def register(self, name: str = "Dev") -> User:
        email = f"{name.lower()}-{uuid.uuid4().hex[:12]}@example.com"
        r = self.http.post("/v1/users/register", json={"email": email, "name": name})
        assert r.status_code == 200, r.text
        return User(r.json()["user_id"], r.json()["api_key"], email)

    def create_platform_user(self, name: str = "Plat") -> User:
        email = f"plat-{uuid.uuid4().hex[:12]}@partner.example"
        r = self.http.post(
            "/v1/admin/users", headers=self.admin, json={"email": email, "name": name, "role": "platform"}
        )
        assert r.status_code == 200, r.text
        return User(r.json()["user_id"], r.json()["api_key"], email)

    def create_model(self, dev: User, visibility: str = "private") -> str:
        repo_id = f"ns{uuid.uuid4().hex[:10]}/model-{uuid.uuid4().hex[:6]}"
        r = self.http.post(
            "/v1/dev/models",
            headers=dev.headers,
            json={"repo_id": repo_id, "model_name": f"Model {repo_id}", "visibility": visibility},
        )
        assert r.status_code == 201, r.text
        return repo_id

    def create_version(self, dev: User, repo_id: str, version: str) -> None:
        r = self.http.post(f"/v1/dev/models/{repo_id}/versions", headers=dev.headers, json={"version": version})
        assert r.status_code == 201, r.text

    def initiate_upload(self, dev: User, repo_id: str, version: str, filename: str) -> dict:
        r = self.http.post(
            f"/v1/dev/models/{repo_id}/versions/{version}/uploads/initiate",
            params={"filename": filename, "expires": 900},
            headers=dev.headers,
        )
        assert r.status_code == 200, r.text
        return r.json()

    def grant(self, platform: User, repo_id: str) -> dict:
        body = {"platform_user_id": platform.user_id, "repo_id": repo_id, "permitted_from_ts": int(time.time()) - 60}
        r = self.http.post("/v1/admin/grants", headers=self.admin, json=body)
        assert r.status_code == 201, r.text
        return r.json()

    def revoke(self, grant_id: int) -> None:
        r = self.http.delete(f"/v1/admin/grants/{grant_id}", headers=self.admin)
        assert r.status_code == 200, r.text

    def rotate_key(self, user: User) -> None:
        r = self.http.post("/v1/users/rotate-key", headers=user.headers)
        assert r.status_code == 200, r.text
        user.api_key = r.json()["api_key"]

    def subscribe(self, user: User, url: str, event_types: list[str], **extra: object) -> dict:
        r = self.http.post("/v1/webhooks", headers=user.headers, json={"url": url, "event_types": event_types, **extra})
        assert r.status_code == 201, r.text
        return r.json()

    def webhook(self, user: User, webhook_id: int) -> dict:
        r = self.http.get(f"/v1/webhooks/{webhook_id}", headers=user.headers)
        assert r.status_code == 200, r.text
        return r.json()

    def deliveries(self, user: User, webhook_id: int) -> list[dict]:
        r = self.http.get(f"/v1/webhooks/{webhook_id}/deliveries", headers=user.headers, params={"limit": 500})
        assert r.status_code == 200, r.text
        return r.json()["items"]

    def unsubscribe(self, user: User, webhook_id: int) -> None:
        self.http.delete(f"/v1/webhooks/{webhook_id}", headers=user.headers)


# ---------------------------------------------------------------- an HTTP receiver


@dataclass
class Received:
    """One POST as the receiver saw it."""

    headers: dict[str, str]
    body: bytes
    at: float

    @property
    def event(self) -> dict:
        return json.loads(self.body)


@dataclass
class Receiver:
    """A webhook receiver on loopback (a thread): records every POST, answers `status`; can go down."""

    host: str = LOOPBACK
    status: int = 204
    port: int = 0
    received: list[Received] = field(default_factory=list)
    _server: http.server.ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> Receiver:
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                with owner._lock:
                    owner.received.append(Received({k.lower(): v for k, v in self.headers.items()}, body, time.time()))
                self.send_response(owner.status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer((self.host, self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
        return self

    def stop(self) -> None:
        """Go down: the port refuses connections until `start` again."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/hook"

    def events(self, event_type: str | None = None) -> list[Received]:
        with self._lock:
            items = list(self.received)
        return [r for r in items if event_type is None or r.event["type"] == event_type]

    def event_ids(self) -> list[str]:
        return [r.event["id"] for r in self.events()]


@contextlib.contextmanager
def receiver(**kwargs: object) -> Iterator[Receiver]:
    r = Receiver(**kwargs).start()  # type: ignore[arg-type]
    try:
        yield r
    finally:
        r.stop()


# ---------------------------------------------------------------- an SMTP server


class SmtpSink:
    """aiosmtpd on loopback, keeping every message."""

    def __init__(self) -> None:
        self.messages: list[EmailMessage] = []
        self._lock = threading.Lock()
        sink = self

        class Handler:
            async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
                with sink._lock:
                    sink.messages.append(message_from_bytes(envelope.content, policy=policy.default))  # type: ignore[attr-defined]
                return "250 OK"

        self.port = free_port()
        self.controller = Controller(Handler(), hostname="127.0.0.1", port=self.port)

    def start(self) -> SmtpSink:
        self.controller.start()
        return self

    def stop(self) -> None:
        self.controller.stop()

    def to(self, address: str) -> list[EmailMessage]:
        with self._lock:
            return [m for m in self.messages if m["To"] == address]


# ---------------------------------------------------------------- Kafka


def publish(
    *payloads: EventData,
    source: str = "/tests/notifier",
    events: list | None = None,
    headers: list[tuple[str, bytes]] | None = None,
) -> list:
    """Publish events to their topics (key = subject, with `headers` if given) and wait for the acks;
    returns the CloudEvents."""
    cloud = list(events or []) + [make_event(p, source=source) for p in payloads]

    async def _send() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=KafkaSettings().kafka_bootstrap_servers, acks="all")
        await producer.start()
        try:
            for ev in cloud:
                await producer.send_and_wait(EVENT_TYPES[ev.type].topic, encode_event(ev), key=ev.key, headers=headers)
        finally:
            await producer.stop()

    asyncio.run(_send())
    return cloud


def publish_raw(topic: str, records: list[tuple[bytes, bytes | None]]) -> list[tuple[int, int]]:
    """Publish (value, key) records as they are, in order; returns their (partition, offset)."""

    async def _send() -> list[tuple[int, int]]:
        producer = AIOKafkaProducer(bootstrap_servers=KafkaSettings().kafka_bootstrap_servers, acks="all")
        await producer.start()
        try:
            out = []
            for value, key in records:
                meta = await producer.send_and_wait(topic, value, key=key)
                out.append((meta.partition, meta.offset))
            return out
        finally:
            await producer.stop()

    return asyncio.run(_send())


def read_topic(topic: str, keep: Callable[[ConsumerRecord], bool]) -> list[ConsumerRecord]:
    """The records of `topic`, from its beginning to its current end, that `keep` accepts."""

    async def _read() -> list[ConsumerRecord]:
        consumer = AIOKafkaConsumer(bootstrap_servers=KafkaSettings().kafka_bootstrap_servers, enable_auto_commit=False)
        await consumer.start()
        try:
            tps = await topic_partitions(consumer, topic)
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            ends = await consumer.end_offsets(tps)
            out: list[ConsumerRecord] = []
            while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    out.extend(r for r in records if keep(r))
            return out
        finally:
            await consumer.stop()

    return asyncio.run(_read())


def committed_offset(group: str, topic: str, partition: int) -> int:
    """The offset `group` committed on a partition (-1 if none)."""

    async def _committed() -> int:
        admin = AIOKafkaAdminClient(bootstrap_servers=KafkaSettings().kafka_bootstrap_servers)
        await admin.start()
        try:
            tp = TopicPartition(topic, partition)
            offsets = await admin.list_consumer_group_offsets(group, partitions=[tp])
            return offsets[tp].offset if tp in offsets else -1
        finally:
            await admin.close()

    return asyncio.run(_committed())
