"""Benchmark: 10,000 events to 10 webhook subscribers on loopback, through Kafka, Postgres and a notifier
of our own. Prints deliveries/s and the latency from publishing an event to its receipt (p50/p95/p99).

Run: uv run --no-sync pytest tests/bench/test_bench_notifier.py -m bench -s
Ten developers each own five models and subscribe to `version.created`; the 10,000 events (1,000 per
subscriber, spread over its models) are published to Kafka at a steady rate, so every event is one
delivery. Deliveries of one model to one subscriber go one at a time, in order (checked).
The receivers are minimal asyncio HTTP/1.1 servers (keep-alive, 204) so that they are not what is measured.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
import uuid
from pathlib import Path

import psycopg
import pytest
from aiokafka import AIOKafkaProducer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))

from notifier_helpers import LOOPBACK, Api, api_process, free_port, notifier_process, wait_consumer_ready, wait_for

from registry_shared.events import Topics, VersionCreated, encode_event, make_event
from registry_shared.settings import KafkaSettings, PostgresSettings

EVENTS = int(os.environ.get("NOTIFIER_BENCH_EVENTS", "10000"))
SUBSCRIBERS = 10
#: Events offered per second (steady); NOTIFIER_BENCH_RATE overrides it to find where latency gives way.
RATE = int(os.environ.get("NOTIFIER_BENCH_RATE", "200"))
MODELS_PER_SUBSCRIBER = 5
TARGET_P95_MS = 500


class FastReceiver:
    """A minimal HTTP/1.1 server on its own event loop (thread): records (event id, version, repo, time).

    `stop` closes it cleanly: the server, then every connection (their tasks cancelled and awaited), then
    the loop, so no task is left pending when the loop goes away."""

    def __init__(self) -> None:
        self.port = free_port(LOOPBACK)
        self.received: list[tuple[str, str, str, float]] = []
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait(5)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._serve, LOOPBACK, self.port))
        self._ready.set()
        try:
            self._loop.run_forever()
            self._loop.run_until_complete(self._close())
        finally:
            self._loop.close()

    async def _close(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._connections:
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = await reader.readexactly(length)
                at = time.time()
                ev = json.loads(body)
                self.received.append((ev["id"], ev["data"]["version"], ev["data"]["repo_id"], at))
                writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the notifier closed the connection
        finally:
            self._connections.discard(task)
            writer.close()

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}/hook"

    def stop(self) -> None:
        """Close the server and its connections, then end the loop and its thread."""
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)


async def _publish(users: list, published: dict[str, float]) -> float:
    producer = AIOKafkaProducer(bootstrap_servers=KafkaSettings().kafka_bootstrap_servers, acks="all", linger_ms=5)
    await producer.start()
    t0 = time.time()
    try:
        tick = 0.05
        per_tick = max(1, int(RATE * tick))
        sent = 0
        while sent < EVENTS:
            n = min(per_tick, EVENTS - sent)
            futures = []
            for i in range(sent, sent + n):
                u, repos = users[i % SUBSCRIBERS]
                repo = repos[(i // SUBSCRIBERS) % len(repos)]
                ev = make_event(
                    VersionCreated(repo_id=repo, version=f"v{i:06d}", owner_id=u.user_id), source="/bench/notifier"
                )
                published[ev.id] = time.time()
                futures.append(await producer.send(Topics.CATALOG, encode_event(ev), key=ev.key))
            await asyncio.gather(*futures)
            sent += n
            delay = t0 + sent / RATE - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
    finally:
        await producer.stop()
    return t0


@pytest.mark.bench
def test_bench_notifier_10k_events_to_10_subscribers() -> None:
    api_proc = api_process(allow_private=f"{LOOPBACK}/32").start()
    token = uuid.uuid4().hex[:8]
    notifier = notifier_process(
        f"bench-notifier-{token}", f"bench-{token}", None, NOTIFIER_DELIVERY_CONCURRENCY="64", LOG_LEVEL="warning"
    ).start()
    api = Api(api_proc.url)
    receivers = [FastReceiver() for _ in range(SUBSCRIBERS)]
    users, hooks = [], []
    try:
        wait_consumer_ready(notifier)
        for r in receivers:
            u = api.register("Bench")
            users.append((u, [api.create_model(u) for _ in range(MODELS_PER_SUBSCRIBER)]))
            hooks.append(api.subscribe(u, r.url, ["version.created"])["id"])
        published: dict[str, float] = {}
        t0 = asyncio.run(_publish(users, published))
        t_pub = time.time() - t0
        wait_for(lambda: sum(len(r.received) for r in receivers) >= EVENTS, 300, "every delivery", interval=0.5)
        received = [x for r in receivers for x in r.received]
        t_end = max(x[3] for x in received)
        lat = sorted((x[3] - published[x[0]]) * 1000 for x in received)
        ids = [x[0] for x in received]
        assert len(ids) == EVENTS and len(set(ids)) == EVENTS
        for r in receivers:  # in order per subscriber and model
            for repo in {x[2] for x in r.received}:
                versions = [x[1] for x in r.received if x[2] == repo]
                assert versions == sorted(versions)

        def pct(p: float) -> float:
            return lat[min(len(lat) - 1, int(len(lat) * p))]

        rate = EVENTS / (t_end - t0)
        print(
            f"\nnotifier bench: {EVENTS} events → {SUBSCRIBERS} subscribers ({MODELS_PER_SUBSCRIBER} models each), "
            f"offered {RATE}/s "
            f"(published in {t_pub:.1f}s)\n"
            f"  deliveries/s: {rate:.0f} (first publish → last receipt {t_end - t0:.1f}s)\n"
            f"  latency publish→receipt ms: p50 {pct(0.5):.0f}  p95 {pct(0.95):.0f}  p99 {pct(0.99):.0f}  "
            f"max {lat[-1]:.0f}\n"
            f"  target p95 ≤ {TARGET_P95_MS} ms: {'met' if pct(0.95) <= TARGET_P95_MS else 'NOT met'}"
        )
        # Where the time goes: Kafka → row stored (routing), row stored → delivered (sending).
        with psycopg.connect(PostgresSettings().database_url) as conn:
            stages = conn.execute(
                "select percentile_cont(array[0.5, 0.95]) within group (order by extract(epoch from created_at - event_time)),"
                " percentile_cont(array[0.5, 0.95]) within group (order by extract(epoch from delivered_at - created_at))"
                " from webhook_deliveries where webhook_id = any(%s)",
                [hooks],
            ).fetchone()
        print(
            f"  stages ms: event→stored p50 {stages[0][0] * 1000:.0f} p95 {stages[0][1] * 1000:.0f}; "
            f"stored→delivered p50 {stages[1][0] * 1000:.0f} p95 {stages[1][1] * 1000:.0f}"
        )
        assert pct(0.95) > 0
    finally:
        for (u, _), h in zip(users, hooks, strict=False):
            api.unsubscribe(u, h)
        for r in receivers:
            r.stop()
        api.close()
        notifier.stop()
        api_proc.stop()
