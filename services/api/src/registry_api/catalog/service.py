"""Rules of the catalog: who may download what, and counting reads.

Endpoints (catalog.endpoints, platform.endpoints) and the download hot path (catalog.fast_download) call
these; SQL lives in catalog.repository.
"""

from __future__ import annotations

import time
from typing import Any

from registry_api.auth import Principal
from registry_api.catalog import repository
from registry_api.catalog.cache import download_cache
from registry_api.catalog.visibility import visibility_params
from registry_api.errors import NotFound
from registry_api.kit.validate import check_repo_id, check_rfilename, check_version
from registry_shared.events import AccessKind, FileAccessed

# ---------------------------------------------------------------- downloads and access recording
# (the download rule, served from the caches while Postgres is away, and the counted reads)


def record_access(app: Any, principal: Principal, kind: AccessKind, **fields: object) -> None:
    """Count a read for the usage endpoints (buffered, written to the outbox in batches).

    Raises AccessBufferFull (503) when the buffer is full: the read is then refused, not served uncounted.
    """
    app.state.access.record(FileAccessed(user_id=principal.user_id, kind=kind, ts=time.time(), **fields))


def split_file_path(path: str) -> tuple[str, str]:
    """`{namespace}/{name}/{rfilename}` → (repo_id, rfilename), checked; 404 when it has no file name."""
    parts = path.split("/", 2)
    if len(parts) < 3:
        raise NotFound("file not found")
    return check_repo_id(f"{parts[0]}/{parts[1]}"), check_rfilename(parts[2])


async def download_answer(
    app: Any, principal: Principal, file_path: str, expires: int, version: str | None
) -> dict[str, object]:
    """The download rule: visible file → presigned GET + a counted access event.

    The hottest path of the registry: lookups are cached (catalog.cache), the URL is signed locally
    (and reused within the second it was signed in), and the access event is buffered. While Postgres is
    away a cached lookup is still answered (and counted: the event waits in the buffer); one that is not
    cached fails with DatabaseUnavailable (503, Retry-After).
    """
    state = app.state
    cache_key = (principal.user_id, principal.role, file_path, version)
    row = download_cache.get(cache_key)
    if row is None:
        repo_id, rfilename = split_file_path(file_path)
        if version is not None:
            check_version(version)
        generation = download_cache.generation
        async with state.pool.connection() as conn:
            row = await repository.find_download(conn, visibility_params(principal), repo_id, rfilename, version)
        if row is None:
            raise NotFound("file not found")
        download_cache.put(cache_key, row, row["access_until"], generation)
    try:
        url = state.presigner.get_url(row["object_key"], expires)
    except Exception as exc:
        raise NotFound(f"object not accessible: {row['object_key']}") from exc
    state.access.record_download(principal.user_id, row["repo_id"], row["version"], row["rfilename"], row["size"])
    return {
        "repo_id": row["repo_id"],
        "rfilename": row["rfilename"],
        "version": row["version"],
        "size": row["size"],
        "sha256": row["sha256"],
        "object_key": row["object_key"],
        "url": url,
        "expires_in": expires,
    }


# ---------------------------------------------------------------- end of downloads and access recording
