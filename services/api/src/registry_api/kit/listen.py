"""A supervised Postgres LISTEN loop: calls a handler for each notification on its channels.

The api's caches (verified keys, download lookups) rely on it to hear every invalidation, so it must not
die silently: connection failures are retried with bounded backoff, any other error restarts it the same
way (and the background-task supervisor restarts `run()` should it ever end), and its state is on /readyz.
`on_connect` runs once the channels are listened to (after a reconnect anything may have changed);
`on_disconnect` runs as soon as the connection is lost, before any retry.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping

import psycopg

from registry_api.kit.db_monitor import DatabaseMonitor
from registry_shared.background import BackgroundTask
from registry_shared.backoff import Backoff
from registry_shared.consumer_policy import describe

log = logging.getLogger(__name__)


class PgListener(BackgroundTask):
    """LISTEN on `handlers`' channels over one dedicated connection (TCP keepalives on)."""

    name = "invalidation-listener"
    retry_backoff = Backoff(initial=0.1, factor=2.0, cap=2.0)

    def __init__(
        self,
        database_url: str,
        handlers: Mapping[str, Callable[[str], None]],
        on_connect: Callable[[], None],
        on_disconnect: Callable[[], None],
        monitor: DatabaseMonitor | None = None,
    ) -> None:
        self._url = database_url
        self._handlers = dict(handlers)
        self._on_connect = on_connect
        self._on_disconnect = on_disconnect
        self._monitor = monitor
        self.connected = False
        self.connections = 0
        self.reason: str | None = "not connected yet"
        self.since = time.time()

    async def run(self) -> None:
        """Listen until cancelled, reconnecting with bounded backoff."""
        failures = 0
        try:
            while True:
                try:
                    await self._listen()
                    raise ConnectionError("notification stream ended")
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self._lost(describe(exc))
                    failures += 1
                    if failures == 1 or failures % 20 == 0:
                        log.warning("invalidation listener reconnecting (attempt %d): %s", failures, exc)
                    if self._monitor is not None and isinstance(exc, psycopg.OperationalError):
                        self._monitor.suspect(exc)
                    await asyncio.sleep(self.retry_backoff.delay(failures))
        finally:
            self._lost("stopped")

    async def _listen(self) -> None:
        async with await psycopg.AsyncConnection.connect(
            self._url,
            autocommit=True,
            connect_timeout=2,
            keepalives=1,
            keepalives_idle=5,
            keepalives_interval=2,
            keepalives_count=2,
        ) as conn:
            for channel in self._handlers:
                await conn.execute(f"listen {channel}")
            self._on_connect()
            self.connected, self.reason, self.since = True, None, time.time()
            self.connections += 1
            if self.health is not None:
                self.health.ok()
            async for note in conn.notifies():
                handler = self._handlers.get(note.channel)
                if handler is not None:
                    handler(note.payload)

    def _lost(self, reason: str) -> None:
        if self.connected:
            self.since = time.time()
        self.connected, self.reason = False, reason
        if self.health is not None and reason != "stopped":
            self.health.retrying(reason)
        try:
            self._on_disconnect()
        except Exception:
            log.exception("invalidation listener: on_disconnect failed")

    def as_dict(self) -> dict[str, object]:
        """The listener as /readyz shows it."""
        return {
            "ok": self.connected,
            "status": "listening" if self.connected else "reconnecting",
            "reason": self.reason,
            "since": int(self.since),
            "connections": self.connections,
        }
