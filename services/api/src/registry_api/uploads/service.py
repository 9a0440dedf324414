"""Rules of multipart uploads: cutting a file into parts, signing part URLs, resuming, completing, aborting.

A multipart upload is an `uploads` row like a single PUT's (same events, same verification by ingest),
with an S3 multipart upload behind it. The functions take explicit arguments (a connection, the storage,
the presigner, the caller) so other entry points (the Hugging Face LFS `multipart` transfer) reuse them.

Life cycle: initiated → (parts PUT by the client, any order, re-signed at will) → complete →
pending_verification → available | rejected; or aborted (by the developer), or expired (ingest aborts
the S3 upload once it is older than INGEST_MULTIPART_TTL_SECONDS and rejects the upload as expired).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time

import psycopg

from registry_api.audit import service as audit
from registry_api.auth import Principal
from registry_api.dev import repository as dev_repository
from registry_api.dev.service import own_model
from registry_api.errors import Conflict, NotFound, Unprocessable
from registry_api.kit.outbox import write_event
from registry_api.kit.presign import Presigner
from registry_api.kit.validate import check_rfilename, check_version
from registry_api.uploads import repository
from registry_api.uploads.schemas import MIB, OBJECT_SIZE_MAX, PART_SIZE_MAX, PART_SIZE_MIN, PARTS_MAX
from registry_api.uploads.storage import MultipartStorage, PartsRejected, UploadGone, multipart_etag, normalize_etag
from registry_shared.events import UploadCompleted, UploadInitiated
from registry_shared.storage import upload_object_key

log = logging.getLogger(__name__)

#: The part size when the client does not choose one (larger when the file needs it to fit 10,000 parts).
DEFAULT_PART_SIZE = 64 * MIB
#: `expires_ts` of a multipart upload row: nominal; ingest expires it (INGEST_MULTIPART_TTL_SECONDS).
MULTIPART_LIFETIME_SECONDS = 86400


def plan_parts(size: int, part_size: int | None = None) -> tuple[int, int]:
    """(part_size, part_count) for a file of `size` bytes under S3's rules; Unprocessable if impossible."""
    if not 1 <= size <= OBJECT_SIZE_MAX:
        raise Unprocessable(f"size must be 1 to {OBJECT_SIZE_MAX} bytes (5 TiB)")
    if part_size is None:
        needed = math.ceil(size / PARTS_MAX)
        part_size = max(DEFAULT_PART_SIZE, math.ceil(needed / MIB) * MIB)
    elif not PART_SIZE_MIN <= part_size <= PART_SIZE_MAX:
        raise Unprocessable(f"part_size must be {PART_SIZE_MIN} (5 MiB) to {PART_SIZE_MAX} (5 GiB) bytes")
    count = math.ceil(size / part_size)
    if count > PARTS_MAX:
        least = math.ceil(size / PARTS_MAX)
        raise Unprocessable(
            f"a size of {size} bytes in parts of {part_size} bytes needs {count} parts; at most {PARTS_MAX}"
            f" are allowed: use a part_size of at least {least} bytes"
        )
    return part_size, count


def part_length(row: dict, part_number: int) -> int:
    """Bytes of part `part_number` of the upload: part_size, the last one what remains."""
    if part_number < row["part_count"]:
        return row["part_size"]
    return row["size"] - row["part_size"] * (row["part_count"] - 1)


def describe(row: dict) -> dict:
    """The MultipartOut of a row."""
    return {
        "upload_id": row["upload_id"],
        "repo_id": row["repo_id"],
        "version": row["version"],
        "rfilename": row["rfilename"],
        "object_key": row["object_key"],
        "status": row["status"],
        "size": row["size"],
        "part_size": row["part_size"],
        "part_count": row["part_count"],
        "last_part_size": part_length(row, row["part_count"]),
        "created_ts": row["created_ts"],
    }


async def initiate_multipart(
    conn: psycopg.AsyncConnection,
    storage: MultipartStorage,
    principal: Principal,
    repo_id: str,
    version: str,
    rfilename: str,
    size: int,
    part_size: int | None = None,
) -> dict:
    """Open a multipart upload of `rfilename` (`size` bytes) to `version`; returns its MultipartOut."""
    check_rfilename(rfilename)
    check_version(version)
    part_size, part_count = plan_parts(size, part_size)
    s3_upload_id: str | None = None
    try:
        async with conn.transaction():
            model = await own_model(conn, principal, repo_id)
            ver = await dev_repository.get_version(conn, model["id"], version)
            if ver is None:
                raise NotFound("version not found")
            if await dev_repository.file_exists(conn, ver["id"], rfilename):
                raise Conflict("file already published in this version; create a new version to change it")
            object_key = upload_object_key(repo_id, version, rfilename)
            s3_upload_id = await asyncio.to_thread(storage.create, object_key)
            expires_ts = int(time.time()) + MULTIPART_LIFETIME_SECONDS
            row = await repository.insert_multipart(
                conn,
                model_id=model["id"],
                version_id=ver["id"],
                rfilename=rfilename,
                object_key=object_key,
                developer_id=principal.user_id,
                expires_ts=expires_ts,
                s3_upload_id=s3_upload_id,
                size=size,
                part_size=part_size,
                part_count=part_count,
            )
            await write_event(
                conn,
                UploadInitiated(
                    upload_id=row["id"],
                    repo_id=repo_id,
                    version=version,
                    rfilename=rfilename,
                    object_key=object_key,
                    developer_id=principal.user_id,
                    expires_ts=expires_ts,
                    multipart_upload_id=s3_upload_id,
                ),
            )
    except BaseException:
        if s3_upload_id is not None:  # nothing was recorded: leave no parts behind
            with contextlib.suppress(Exception):
                await asyncio.to_thread(storage.abort, upload_object_key(repo_id, version, rfilename), s3_upload_id)
        raise
    return describe(
        {
            "upload_id": row["id"],
            "repo_id": repo_id,
            "version": version,
            "rfilename": rfilename,
            "object_key": object_key,
            "status": "initiated",
            "size": size,
            "part_size": part_size,
            "part_count": part_count,
            "created_ts": row["created_ts"],
        }
    )


async def _mine(conn: psycopg.AsyncConnection, principal: Principal, upload_id: int, lock: bool = False) -> dict:
    """The caller's multipart upload; 404 for anyone else's (or a single-PUT upload)."""
    row = await repository.get_multipart(conn, upload_id, for_update=lock)
    if row is None or (row["developer_id"] != principal.user_id and not principal.sees_everything):
        raise NotFound("multipart upload not found")
    return row


def _still_open(row: dict) -> None:
    if row["status"] != "initiated":
        raise Conflict(f"upload is {row['status']}; initiate a new upload to try again")


async def get_multipart(conn: psycopg.AsyncConnection, principal: Principal, upload_id: int) -> dict:
    """The caller's multipart upload, as MultipartOut."""
    return describe(await _mine(conn, principal, upload_id))


async def sign_parts(
    conn: psycopg.AsyncConnection,
    presigner: Presigner,
    principal: Principal,
    upload_id: int,
    part_numbers: list[int],
    expires: int,
) -> dict:
    """Presigned PUT URLs of the given parts (any of them, again as often as needed)."""
    row = await _mine(conn, principal, upload_id)
    _still_open(row)
    bad = [n for n in part_numbers if not 1 <= n <= row["part_count"]]
    if bad:
        raise Unprocessable(f"part numbers must be 1 to {row['part_count']}: got {bad[0]}")
    if len(set(part_numbers)) != len(part_numbers):
        raise Unprocessable("part numbers must be distinct")
    return {
        "upload_id": upload_id,
        "expires_in": expires,
        "parts": [
            {
                "part_number": n,
                "size": part_length(row, n),
                "method": "PUT",
                "url": presigner.part_url(row["object_key"], row["multipart_upload_id"], n, expires),
            }
            for n in part_numbers
        ],
    }


async def list_parts(
    conn: psycopg.AsyncConnection, storage: MultipartStorage, principal: Principal, upload_id: int
) -> dict:
    """The parts object storage holds for the upload (for resuming); none once it is no longer open."""
    row = await _mine(conn, principal, upload_id)
    parts: list[dict] = []
    if row["status"] == "initiated":
        try:
            stored = await asyncio.to_thread(storage.list_parts, row["object_key"], row["multipart_upload_id"])
        except UploadGone:
            raise Conflict("the multipart upload no longer exists in object storage (expired?)") from None
        parts = [p.__dict__ for p in stored]
    return {
        "upload_id": upload_id,
        "status": row["status"],
        "size": row["size"],
        "part_size": row["part_size"],
        "part_count": row["part_count"],
        "parts": parts,
    }


def _check_part_list(row: dict, parts: list[tuple[int, str]], size: int) -> None:
    if size != row["size"]:
        raise Unprocessable(f"size {size} differs from the {row['size']} bytes declared at initiate")
    numbers = [n for n, _ in parts]
    if numbers != list(range(1, row["part_count"] + 1)):
        seen = set(numbers)
        missing = [n for n in range(1, row["part_count"] + 1) if n not in seen]
        if missing:
            raise Unprocessable(f"parts must be 1 to {row['part_count']}, each once: part {missing[0]} is missing")
        raise Unprocessable(f"parts must be 1 to {row['part_count']}, each once and in order")


def _match_stored(row: dict, parts: list[tuple[int, str]], stored: list) -> None:
    by_number = {p.part_number: p for p in stored}
    for n, etag in parts:
        p = by_number.get(n)
        if p is None:
            raise Conflict(f"part {n} is not stored; upload it (GET .../parts lists the stored ones)")
        if p.etag != normalize_etag(etag):
            raise Conflict(f"part {n}: ETag {normalize_etag(etag)} is not the stored part's ({p.etag})")
        if p.size != part_length(row, n):
            raise Conflict(f"part {n} holds {p.size} bytes; {part_length(row, n)} expected: upload it again")


async def complete_multipart(
    conn: psycopg.AsyncConnection,
    storage: MultipartStorage,
    principal: Principal,
    upload_id: int,
    parts: list[tuple[int, str]],
    size: int,
    sha256: str,
) -> dict:
    """Assemble the parts into the object and declare its size and sha256; ingest then verifies it."""
    sha256 = sha256.lower()
    async with conn.transaction():
        row = await _mine(conn, principal, upload_id, lock=True)
        _still_open(row)
        _check_part_list(row, parts, size)
        key, s3_id = row["object_key"], row["multipart_upload_id"]
        try:
            stored = await asyncio.to_thread(storage.list_parts, key, s3_id)
        except UploadGone:
            stored = None
        if stored is None:
            # Completed in object storage by an earlier call whose transaction did not commit? Then the
            # object is there with the ETag of exactly these parts; otherwise the upload is gone.
            expected = multipart_etag([e for _, e in parts])
            if expected is None or await asyncio.to_thread(storage.object_etag, key) != expected:
                raise Conflict("the multipart upload no longer exists in object storage (expired?)")
        else:
            _match_stored(row, parts, stored)
            try:
                await asyncio.to_thread(storage.complete, key, s3_id, parts)
            except PartsRejected as exc:
                raise Conflict(f"object storage refused the parts: {exc.message}") from None
            except UploadGone:
                raise Conflict("the multipart upload no longer exists in object storage (expired?)") from None
        now = int(time.time())
        await repository.mark_completed(conn, upload_id, size, sha256, now)
        await write_event(
            conn,
            UploadCompleted(
                upload_id=upload_id,
                repo_id=row["repo_id"],
                version=row["version"],
                rfilename=row["rfilename"],
                object_key=key,
                developer_id=row["developer_id"],
                size=size,
                sha256=sha256,
            ),
        )
        after = {"status": "pending_verification", "rfilename": row["rfilename"], "size": size, "sha256": sha256}
        await audit.record(
            conn,
            "upload.complete",
            "upload",
            upload_id,
            repo_id=row["repo_id"],
            before={"status": row["status"]},
            after=after,
        )
    return describe({**row, "status": "pending_verification"})


async def abort_multipart(
    conn: psycopg.AsyncConnection, storage: MultipartStorage, principal: Principal, upload_id: int
) -> dict:
    """Abort an open multipart upload: object storage deletes its parts; the upload becomes `aborted`."""
    async with conn.transaction():
        row = await _mine(conn, principal, upload_id, lock=True)
        _still_open(row)
        await asyncio.to_thread(storage.abort, row["object_key"], row["multipart_upload_id"])
        await repository.mark_aborted(conn, upload_id, int(time.time()))
    return describe({**row, "status": "aborted"})
