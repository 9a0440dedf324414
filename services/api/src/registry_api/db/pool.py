"""The async connection pool of the api process."""

from __future__ import annotations

from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from registry_api.settings import ApiSettings


def make_pool(settings: ApiSettings) -> AsyncConnectionPool:
    """A pool of autocommit connections returning dicts; writes open `conn.transaction()` explicitly."""
    return AsyncConnectionPool(
        settings.database_url,
        min_size=settings.db_pool_min,
        max_size=settings.db_pool_max,
        kwargs={"row_factory": dict_row, "autocommit": True, "prepare_threshold": 2},
        open=False,
        timeout=10,
    )
