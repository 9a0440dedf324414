"""An in-process cache of download lookups (caller × file → the row and how long access lasts).

A download is the hottest read of the registry: caching the visibility + file lookup saves a Postgres
round trip per request. Every write that can change the answer (grants, files, visibility) sends
`NOTIFY registry_catalog_changed` in its transaction; every api process clears its cache when it hears
it (and when its listener reconnects). A generation counter keeps a lookup that raced with a change
from being stored. Entries also expire at the end of the grant window that allowed them, and after
CACHE_TTL seconds at most.
"""

from __future__ import annotations

import time

import psycopg

CATALOG_CHANNEL = "registry_catalog_changed"
CACHE_TTL = 30.0


class DownloadCache:
    """(user, role, repo, file, version) → (row, expires at epoch seconds)."""

    def __init__(self) -> None:
        self._items: dict[tuple, tuple[dict, float]] = {}
        self.generation = 0

    def get(self, key: tuple) -> dict | None:
        item = self._items.get(key)
        if item is None:
            return None
        if item[1] <= time.time():
            self._items.pop(key, None)
            return None
        return item[0]

    def put(self, key: tuple, row: dict, access_until: int | None, generation: int) -> None:
        """Store unless the catalog changed since the lookup began (`generation`)."""
        if generation != self.generation:
            return
        if len(self._items) > 200_000:
            self._items.clear()
        expires = time.time() + CACHE_TTL
        if access_until is not None:
            expires = min(expires, float(access_until))
        self._items[key] = (row, expires)

    def clear(self) -> None:
        self.generation += 1
        self._items.clear()


download_cache = DownloadCache()


async def notify_catalog_changed(conn: psycopg.AsyncConnection, repo_id: str) -> None:
    """Tell every api process (at commit) that answers about `repo_id` may have changed."""
    await conn.execute("select pg_notify(%s, %s)", [CATALOG_CHANNEL, repo_id])
