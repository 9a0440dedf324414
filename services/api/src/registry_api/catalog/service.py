"""Rules of the catalog: who may download what, counting reads, and what a verdict does to an upload.

Endpoints (catalog.endpoints, platform.endpoints), the download hot path (catalog.fast_download) and the
api's consumers (consumers.py) call these; SQL lives in catalog.repository.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, get_args

import orjson
import psycopg

from registry_api.audit import service as audit
from registry_api.auth import Principal
from registry_api.catalog import repository
from registry_api.catalog.cache import CATALOG_CHANNEL, download_cache
from registry_api.catalog.visibility import visibility_params
from registry_api.errors import NotFound
from registry_api.kit.validate import check_repo_id, check_rfilename, check_version
from registry_shared.consumer_policy import MissingReference, PermanentError, decode_cloud_event
from registry_shared.events import (
    AccessKind,
    CloudEvent,
    EventData,
    FileAccessed,
    UploadRejected,
    UploadVerified,
)

log = logging.getLogger(__name__)


# ================================================================ verdicts and download counting
# (the api's consumers of registry.verdicts.v1 and registry.access.v1 call these; consumers.py holds only
# their Kafka loops)

#: Ids the database can hold (bigint): a larger one names no row.
_MAX_ID = 2**63 - 1


async def refresh_model_files(conn: psycopg.AsyncConnection, model_id: int) -> None:
    """Recompute file_count / has_safetensors / has_bin from the current files; bump last_update_ts."""
    names = await repository.current_file_names(conn, model_id)
    await repository.set_model_files(
        conn,
        model_id,
        len(names),
        any(n.endswith(".safetensors") for n in names),
        any(n.endswith(".bin") for n in names),
    )


async def _upload_or_missing(conn: psycopg.AsyncConnection, upload_id: int) -> None:
    if not 0 < upload_id <= _MAX_ID or not await repository.upload_exists(conn, upload_id):
        raise MissingReference(f"no upload {upload_id}")


async def apply_verified(conn: psycopg.AsyncConnection, v: UploadVerified) -> bool:
    """Publish the verified file; False if the upload was not waiting for a verdict (applied already).

    Raises MissingReference if there is no such upload, PermanentError if the verdict is not about what the
    upload declared (size, sha256, object key): neither can ever apply.
    """
    if not 0 < v.upload_id <= _MAX_ID:
        raise MissingReference(f"no upload {v.upload_id}")
    up = await repository.lock_upload(conn, v.upload_id)
    if up is None:
        raise MissingReference(f"no upload {v.upload_id}")
    if up["status"] != "pending_verification":
        return False
    if (up["declared_size"], up["declared_sha256"], up["object_key"]) != (v.size, v.sha256, v.object_key):
        raise PermanentError(f"the verdict does not match upload {v.upload_id}'s declaration")
    await repository.make_available(conn, up, v.model_dump(), int(time.time()))
    await refresh_model_files(conn, up["model_id"])
    await repository.notify_model_changed(conn, up["model_id"], CATALOG_CHANNEL)
    return True


async def apply_rejected(conn: psycopg.AsyncConnection, r: UploadRejected) -> bool:
    """Record why the upload was refused (the file is never served); False if it was not waiting for a verdict.

    Raises MissingReference if there is no such upload."""
    status = "expired" if r.reason == "expired" else "rejected"
    if 0 < r.upload_id <= _MAX_ID and await repository.reject_upload(
        conn, r.upload_id, status, r.reason, r.detail, r.quarantine_key
    ):
        return True
    await _upload_or_missing(conn, r.upload_id)
    return False


async def apply_verdict(conn: psycopg.AsyncConnection, event: CloudEvent, payload: EventData) -> bool:
    """Apply one verdict event once (consumed_events), in the caller's transaction; False if it changed nothing
    (applied before, or not a verdict the api acts on: quarantined stray objects)."""
    if not isinstance(payload, UploadVerified | UploadRejected):
        return False
    if not await repository.first_time(conn, uuid.UUID(event.id)):
        return False
    if isinstance(payload, UploadVerified):
        applied = await apply_verified(conn, payload)
    else:
        applied = await apply_rejected(conn, payload)
    if applied:
        await audit.record(
            conn, "upload.verdict", "upload", payload.upload_id, repo_id=payload.repo_id, after=payload.model_dump()
        )
    return applied


ACCESS_TYPE = FileAccessed.event_type
_KINDS = frozenset(get_args(AccessKind))
_ACCESS_KEYS = frozenset(FileAccessed.model_fields)
_OPT_STR = (str, type(None))


@dataclass
class DownloadTally:
    """What a batch of raw access-event messages adds to the counters, and the messages that are not events."""

    counts: Counter[str] = field(default_factory=Counter)
    #: index in the batch -> why that message is not a valid event (it is dead-lettered)
    invalid: dict[int, str] = field(default_factory=dict)


def _fast_access(value: bytes | None) -> tuple[str, str | None] | None:
    """(kind, repo_id) of a well-formed access event in its usual encoding, by plain type checks; None: ask the
    shared decoder."""
    try:
        doc = orjson.loads(value)  # type: ignore[arg-type]
    except (orjson.JSONDecodeError, TypeError):
        return None
    if type(doc) is not dict or doc.get("type") != ACCESS_TYPE or doc.get("specversion") != "1.0":
        return None
    data, eid = doc.get("data"), doc.get("id")
    if type(data) is not dict or type(eid) is not str or type(doc.get("source")) is not str:
        return None
    if doc.get("datacontenttype", "application/json") != "application/json" or not data.keys() <= _ACCESS_KEYS:
        return None
    kind, repo = data.get("kind"), data.get("repo_id")
    if (
        type(data.get("user_id")) is not int
        or kind not in _KINDS
        or type(data.get("ts")) not in (int, float)
        or type(data.get("bytes", 0)) is not int
        or type(repo) not in _OPT_STR
        or type(data.get("version")) not in _OPT_STR
        or type(data.get("rfilename")) not in _OPT_STR
    ):
        return None
    try:
        uuid.UUID(eid)
    except ValueError:
        return None
    return kind, repo


def _download_repo(value: bytes | None) -> str | None:
    """The repo_id a message counts a download for (None: not a countable download); PermanentError if the
    message is not a valid event."""
    fast = _fast_access(value)
    if fast is not None:
        kind, repo = fast
    else:
        _, payload = decode_cloud_event(value)  # the last word: raises PermanentError
        if not isinstance(payload, FileAccessed):
            return None  # another event of the contract: nothing to count
        kind, repo = payload.kind, payload.repo_id
    if kind != "download" or not repo:
        return None
    if "\x00" in repo:
        raise PermanentError("repo_id holds a NUL character")
    return repo


def tally_downloads(values: Sequence[bytes | None]) -> DownloadTally:
    """Downloads per repo_id in raw access-event messages, and the messages that are not valid events.

    Every access event passes here: a message in the usual encoding is checked with plain type checks (no
    pydantic), anything else by the shared decoder (registry_shared.consumer_policy.decode_cloud_event)."""
    tally = DownloadTally()
    counts = tally.counts
    for i, value in enumerate(values):
        try:
            repo = _download_repo(value)
        except PermanentError as exc:
            tally.invalid[i] = f"{type(exc).__name__}: {exc}"
            continue
        if repo is not None:
            counts[repo] += 1
    return tally


def count_downloads(values: Sequence[bytes | None]) -> Counter[str]:
    """Downloads per repo_id in raw access-event messages (invalid messages are not counted)."""
    return tally_downloads(values).counts


def downloads_of(values: Sequence[bytes | None], repo_ids: set[str]) -> dict[int, str]:
    """The messages counting a download of one of `repo_ids`: index in `values` -> repo_id."""
    out = {}
    for i, value in enumerate(values):
        try:
            repo = _download_repo(value)
        except PermanentError:
            continue
        if repo in repo_ids:
            out[i] = repo
    return out


async def unknown_models(conn: psycopg.AsyncConnection, repo_ids: Sequence[str]) -> set[str]:
    """The repo_ids among these that name no model (their downloads are dead-lettered, not counted)."""
    if not repo_ids:
        return set()
    return set(repo_ids) - await repository.existing_repo_ids(conn, list(repo_ids))


async def add_downloads(conn: psycopg.AsyncConnection, counts: Counter[str]) -> set[str]:
    """Add the counts to the models' downloads counters (in repo_id order: no deadlock between two counters);
    the repo_ids that name no model."""
    missing = set()
    for repo_id, n in sorted(counts.items()):
        if not await repository.add_downloads(conn, repo_id, n):
            missing.add(repo_id)
    return missing


# ================================================================ end of verdicts and download counting


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
