"""The async connection pool of the api process, watched by the database monitor (kit.db_monitor)."""

from __future__ import annotations

import time

from psycopg import AsyncConnection
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from registry_api.kit.db_monitor import DatabaseMonitor
from registry_api.settings import ApiSettings

#: A request waiting for a connection looks at the monitor this often: when the database goes away while it
#: waits, it fails within this time instead of at the end of the pool's timeout.
WAIT_SLICE_S = 0.25


class MonitoredPool(AsyncConnectionPool):
    """A pool that answers `DatabaseUnavailable` at once while the monitor says the database is down.

    A connection that is ready costs one attribute check more than the plain pool. A request that has to
    wait does so in slices of WAIT_SLICE_S: after each, it fails if the database has been marked down
    meanwhile, and asks the monitor to probe (all connections busy for that long may mean Postgres is
    away); otherwise it waits on, up to the pool's timeout.
    """

    monitor: DatabaseMonitor | None = None

    async def getconn(self, timeout: float | None = None) -> AsyncConnection:  # noqa: ASYNC109 (the pool's API)
        monitor = self.monitor
        if monitor is None:
            return await super().getconn(timeout)
        if monitor.down:
            raise monitor.unavailable()
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            remaining = deadline - time.monotonic()
            try:
                return await super().getconn(min(WAIT_SLICE_S, max(remaining, 0.001)))
            except PoolTimeout:
                if monitor.down:
                    raise monitor.unavailable() from None
                if remaining <= WAIT_SLICE_S:
                    raise
                monitor.suspect()


def make_pool(settings: ApiSettings, monitor: DatabaseMonitor | None = None) -> MonitoredPool:
    """A pool of autocommit connections returning dicts; writes open `conn.transaction()` explicitly.

    Connection attempts that fail are retried by the pool for `reconnect_timeout` only (then it grows
    again on demand): after an outage the pool does not sit on attempts scheduled minutes apart.
    """
    pool = MonitoredPool(
        settings.database_url,
        min_size=settings.db_pool_min,
        max_size=settings.db_pool_max,
        kwargs={"row_factory": dict_row, "autocommit": True, "prepare_threshold": 2, "connect_timeout": 2},
        open=False,
        timeout=10.0,
        reconnect_timeout=5.0,
    )
    pool.monitor = monitor
    return pool
