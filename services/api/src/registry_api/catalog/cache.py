"""An in-process cache of download lookups (caller × file → the row and how long access lasts).

A download is the hottest read of the registry: caching the visibility + file lookup saves a Postgres
round trip per request. Every write that can change the answer (grants, files, visibility) sends
`NOTIFY registry_catalog_changed` in its transaction; every api process clears its cache when it hears
it (and when its listener reconnects). A generation counter keeps a lookup that raced with a change
from being stored. Entries also expire at the end of the grant window that allowed them, and after
CACHE_TTL seconds at most; while Postgres is away they are served past CACHE_TTL (never past the grant's
end): see kit.cache for what an entry may be trusted for.
"""

from __future__ import annotations

import psycopg

from registry_api.kit.cache import InvalidatedCache

CATALOG_CHANNEL = "registry_catalog_changed"
CACHE_TTL = 30.0

#: (user, role, file path, version) → the download row (with `access_until`).
download_cache: InvalidatedCache[dict] = InvalidatedCache(ttl=CACHE_TTL, max_items=200_000)


async def notify_catalog_changed(conn: psycopg.AsyncConnection, repo_id: str) -> None:
    """Tell every api process (at commit) that answers about `repo_id` may have changed."""
    await conn.execute("select pg_notify(%s, %s)", [CATALOG_CHANNEL, repo_id])
