"""The pieces that keep the api answering while Postgres is away: what the caches may be trusted for, the
bounded access-event buffer, and the database monitor (against a port nobody listens on)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator

import pytest

from registry_api.kit import cache as cache_module
from registry_api.kit.cache import InvalidatedCache
from registry_api.kit.db_monitor import DatabaseMonitor, DatabaseUnavailable
from registry_api.kit.outbox import AccessBufferFull, AccessRecorder
from registry_shared.backoff import Backoff


def test_nothing_is_cached_until_the_listener_is_connected():
    c: InvalidatedCache[str] = InvalidatedCache(ttl=30, max_items=10)
    c.put("k", "v")
    assert c.get("k") is None
    c.listener_up()
    c.put("k", "v")
    assert c.get("k") == "v"


def test_entries_are_trusted_only_briefly_once_the_listener_is_down(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(cache_module.time, "time", lambda: now[0])
    c: InvalidatedCache[str] = InvalidatedCache(ttl=30, max_items=10)
    c.listener_up()
    c.put("k", "v")
    c.listener_down()
    c.put("other", "x")  # not stored: it could miss an invalidation
    assert c.get("k") == "v" and c.get("other") is None
    now[0] += cache_module.UNTRUSTED_S + 0.01
    assert c.get("k") is None, "a key rotated meanwhile would still work"
    c.listener_up()  # reconnected: everything is forgotten, and trusted again from now on
    assert c.get("k") is None
    c.put("k", "v2")
    assert c.get("k") == "v2"


def test_while_the_database_is_down_entries_are_served_past_their_expiry_but_not_past_their_bound(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(cache_module.time, "time", lambda: now[0])
    c: InvalidatedCache[str] = InvalidatedCache(ttl=30, max_items=10)
    c.listener_up()
    c.put("grant-ends-soon", "a", bound=1100.0)
    c.put("no-end", "b")
    c.listener_down()  # the database went away: so did the listener
    c.outage = True
    now[0] += 60  # past the TTL and the listener's short trust
    assert c.get("grant-ends-soon") == "a" and c.get("no-end") == "b"
    now[0] += 50  # 1110: past the grant's end
    assert c.get("grant-ends-soon") is None and c.get("no-end") == "b"
    now[0] = 1000.0 + cache_module.OUTAGE_GRACE_S
    assert c.get("no-end") is None
    c.outage = False
    now[0] = 1040.0
    assert c.get("no-end") is None  # back up, listener still away: the database answers, not the cache


def test_a_lookup_that_raced_with_an_invalidation_is_not_stored():
    c: InvalidatedCache[str] = InvalidatedCache(ttl=30, max_items=10)
    c.listener_up()
    generation = c.generation
    c.evict("k")  # a rotation heard while the lookup was in flight
    c.put("k", "old", generation=generation)
    assert c.get("k") is None


class _DownPool:
    """A pool whose database is away: every connection attempt fails."""

    def __init__(self) -> None:
        self.up = False
        self.rows: list[tuple] = []

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[_DownPool]:
        if not self.up:
            raise DatabaseUnavailable(2)
        yield self

    def cursor(self) -> _DownPool:
        return self

    async def __aenter__(self) -> _DownPool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    @contextlib.asynccontextmanager
    async def copy(self, _: str) -> AsyncIterator[_DownPool]:
        yield self

    async def write_row(self, row: tuple) -> None:
        self.rows.append(row)


async def test_the_access_buffer_is_bounded_and_keeps_its_events_in_order_until_written():
    pool = _DownPool()
    recorder = AccessRecorder(pool, flush_ms=20, on_flush=asyncio.Event(), max_buffered=100)  # type: ignore[arg-type]
    for i in range(100):
        recorder.record_download(i, "acme/bert", None, "model.bin", 1)
    with pytest.raises(AccessBufferFull) as full:
        recorder.record_download(100, "acme/bert", None, "model.bin", 1)
    assert full.value.status_code == 503 and full.value.retry_after >= 1 and recorder.refused == 1
    with pytest.raises(DatabaseUnavailable):
        await recorder.flush()
    assert recorder.buffered == 100, "a failed flush lost events"
    pool.up = True
    assert await recorder.flush() == 100
    assert [json.loads(r[3])["data"]["user_id"] for r in pool.rows] == list(range(100))  # once each, in order
    assert recorder.buffered == 0
    recorder.record_download(1, "acme/bert", None, "model.bin", 1)  # room again
    assert recorder.buffered == 1


async def test_the_monitor_marks_an_unreachable_database_down_at_once_and_probes_until_it_is_back():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nobody listens there once the socket is closed
    monitor = DatabaseMonitor(
        f"postgresql://u:p@127.0.0.1:{port}/db", probe_timeout=0.5, backoff=Backoff(initial=0.05, cap=0.1)
    )
    ups: list[bool] = []
    monitor.on_down(lambda: ups.append(False))
    t0 = time.monotonic()
    assert await monitor.check() is False
    assert time.monotonic() - t0 < 1.0
    assert monitor.down and monitor.reason and ups == [False]
    assert isinstance(monitor.unavailable(), DatabaseUnavailable) and monitor.unavailable().retry_after == 1
    body = monitor.as_dict()
    assert body["ok"] is False and body["status"] == "down" and body["outages"] == 1
    await asyncio.sleep(0.3)
    assert monitor.down  # still probing, still down
    await monitor.stop()
