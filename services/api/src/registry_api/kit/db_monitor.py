"""Whether Postgres is reachable, known without waiting on it.

Without this, every request made while Postgres is away waits for the pool's timeout before it fails.
The monitor turns that into one plain attribute, `down`, that the pool (db.pool.MonitoredPool) reads
before it hands out a connection: while it is set, a request that needs the database fails at once with
`DatabaseUnavailable` (503 `database unavailable`, `Retry-After`).

- Anything that sees a connection-level failure (a request's query, a waiting request, the LISTEN loop,
  the access-event flusher) calls `suspect()`. That does not mark the database down by itself: it starts
  a probe (a fresh connection and `select 1`, bounded by `probe_timeout`), and only a failed probe marks
  it down. A query error that is not about the connection (a lock timeout, a cancelled statement) leaves
  the database up.
- While down, the probe repeats with bounded backoff; the first one that works checks the pool's idle
  connections (dropping the broken ones), then marks the database up and runs the `on_up` callbacks
  (the access-event buffer flushes at once).
- `/readyz` calls `check()`, which probes once when the database is believed up, so readiness is right
  even when no request has touched the database since it went away.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable

import psycopg
from psycopg_pool import PoolTimeout

from registry_shared.backoff import Backoff
from registry_shared.consumer_policy import describe

log = logging.getLogger(__name__)

#: Probes while the database is away: 0.1 s, 0.2 s, ... at most 2 s apart.
PROBE_BACKOFF = Backoff(initial=0.1, factor=2.0, cap=2.0, jitter=0.2)


class DatabaseUnavailable(PoolTimeout):
    """The database is known to be away: answered at once as 503 `database unavailable` with `Retry-After`.

    A `PoolTimeout` (so an `OperationalError`): code that already treats a pool timeout as a transient
    failure (the consumers, the access-event flusher) treats this one the same way.
    """

    def __init__(self, retry_after: int, reason: str | None = None) -> None:
        super().__init__("database unavailable" + (f": {reason}" if reason else ""))
        self.retry_after = retry_after


class DatabaseMonitor:
    """Postgres up or down, as last seen; probes in the background while it is down."""

    def __init__(
        self,
        database_url: str,
        probe_timeout: float = 0.8,
        backoff: Backoff = PROBE_BACKOFF,
    ) -> None:
        self.down = False  # read on every request that needs the database: a plain attribute
        self.reason: str | None = None
        self.since = time.time()
        self.outages = 0
        self._url = database_url
        self._probe_timeout = probe_timeout
        self._backoff = backoff
        self._task: asyncio.Task[None] | None = None
        self._on_recover: list[Callable[[], Awaitable[None]]] = []
        self._on_up: list[Callable[[], None]] = []
        self._on_down: list[Callable[[], None]] = []

    @property
    def retry_after(self) -> int:
        """What `Retry-After` says while the database is away: the longest wait between two probes."""
        return max(1, math.ceil(self._backoff.cap))

    def unavailable(self) -> DatabaseUnavailable:
        """The error a request gets while the database is down."""
        return DatabaseUnavailable(self.retry_after, self.reason)

    def on_recover(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Await `callback` (bounded, errors logged) each time the database is back, before `down` clears."""
        self._on_recover.append(callback)

    def on_up(self, callback: Callable[[], None]) -> None:
        """Run `callback` (synchronously) each time the database is back, once `down` has cleared."""
        self._on_up.append(callback)

    def on_down(self, callback: Callable[[], None]) -> None:
        """Run `callback` (synchronously) each time the database is marked down."""
        self._on_down.append(callback)

    def suspect(self, exc: BaseException | None = None) -> None:
        """A connection-level failure was seen: probe now, in the background (no-op while a probe runs)."""
        if self._task is not None and not self._task.done():
            return
        with contextlib.suppress(RuntimeError):  # no running loop: nothing to probe from
            self._task = asyncio.get_running_loop().create_task(self._watch(exc), name="db-monitor")

    async def check(self) -> bool:
        """Probe once now (bounded by `probe_timeout`) unless already known down; True if the database is up."""
        if self.down:
            return False
        try:
            await self._probe()
        except Exception as exc:
            self._mark_down(describe(exc))
            self.suspect(exc)
            return False
        return True

    def as_dict(self) -> dict[str, object]:
        """The database as /readyz shows it."""
        return {
            "ok": not self.down,
            "status": "down" if self.down else "up",
            "reason": self.reason,
            "since": int(self.since),
            "outages": self.outages,
        }

    async def stop(self) -> None:
        """Stop probing (shutdown)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None

    async def _probe(self) -> None:
        async with asyncio.timeout(self._probe_timeout):
            try:
                conn = await psycopg.AsyncConnection.connect(self._url, autocommit=True, connect_timeout=2)
            except psycopg.OperationalError as exc:
                if _server_full(exc):  # it answered: up, only busy (the pool's connections still work)
                    return
                raise
            try:
                await conn.execute("select 1")
            finally:
                await conn.close()

    def _mark_down(self, reason: str) -> None:
        if self.down:
            return
        self.down, self.reason, self.since = True, reason, time.time()
        self.outages += 1
        log.error("database unavailable: %s; answering 503 until a probe reaches it", reason)
        _run_all(self._on_down)

    async def _watch(self, first: BaseException | None) -> None:
        attempt = 0
        while True:
            try:
                await self._probe()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._mark_down(describe(exc))
                attempt += 1
                await asyncio.sleep(self._backoff.delay(attempt))
                continue
            if self.down:
                await self._recovered()
            elif first is not None:
                log.info("database reachable after %s", describe(first))
            return

    async def _recovered(self) -> None:
        for callback in self._on_recover:
            try:
                async with asyncio.timeout(5):
                    await callback()
            except Exception:
                log.exception("database monitor: on_recover callback failed")
        log.warning("database reachable again after %.1f s", time.time() - self.since)
        self.down, self.reason, self.since = False, None, time.time()
        _run_all(self._on_up)


def _server_full(exc: psycopg.OperationalError) -> bool:
    """Postgres refused a new connection because all its slots are taken (SQLSTATE 53300)."""
    text = str(exc)
    return getattr(exc, "sqlstate", None) == "53300" or "too many clients" in text or "slots are reserved" in text


def _run_all(callbacks: list[Callable[[], None]]) -> None:
    for callback in callbacks:
        try:
            callback()
        except Exception:
            log.exception("database monitor: callback failed")
