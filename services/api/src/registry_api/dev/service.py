"""Rules of publishing: namespaces, ownership, immutable versions, the upload life cycle."""

from __future__ import annotations

import time

import psycopg

from registry_api.audit import service as audit
from registry_api.auth import Principal
from registry_api.catalog.cache import download_cache, notify_catalog_changed
from registry_api.dev import repository
from registry_api.dev.schemas import CompleteIn, ModelIn, ModelUpdate
from registry_api.errors import Conflict, Forbidden, NotFound
from registry_api.kit.outbox import write_event
from registry_api.kit.validate import check_object_key, check_repo_id, check_rfilename, check_version
from registry_api.uploads import repository as uploads_repository
from registry_shared.events import ModelCreated, UploadCompleted, UploadInitiated, VersionCreated
from registry_shared.storage import upload_object_key


async def create_model(conn: psycopg.AsyncConnection, principal: Principal, body: ModelIn) -> dict:
    """Create a model owned by the caller; the namespace must be free or theirs.

    Namespaces and repo ids are case-insensitive: `Acme/x` is refused beside someone else's `acme/y`, and
    beside `acme/x` of anyone. The model keeps the case it is created with.
    """
    check_repo_id(body.repo_id)
    namespace = body.repo_id.split("/", 1)[0]
    fields = body.model_dump()
    fields["author"] = fields["author"] or namespace
    async with conn.transaction():
        owner = await repository.claim_namespace(conn, namespace, principal.user_id)
        if owner != principal.user_id and not principal.sees_everything:
            raise Forbidden(f"namespace '{namespace}' belongs to another developer")
        row = await repository.insert_model(conn, principal.user_id, fields)
        if row is None:
            raise Conflict("model already exists")
        await write_event(
            conn, ModelCreated(repo_id=body.repo_id, owner_id=principal.user_id, visibility=body.visibility)
        )
        await audit.record(conn, "model.create", "model", row["repo_id"], repo_id=row["repo_id"], after=row)
    return row


async def own_model(conn: psycopg.AsyncConnection, principal: Principal, repo_id: str, lock: bool = False) -> dict:
    """The caller's model (`repo_id` in any case; the row has its own spelling): 404 if they cannot see it,
    403 if they can but do not own it."""
    check_repo_id(repo_id)
    row = await repository.owned_model(conn, repo_id, for_update=lock)
    if row is None:
        raise NotFound("model not found")
    if row["owner_id"] != principal.user_id and not principal.sees_everything:
        if row["visibility"] == "public":
            raise Forbidden("only the model's owner may change it")
        raise NotFound("model not found")
    return row


async def update_model(conn: psycopg.AsyncConnection, principal: Principal, repo_id: str, body: ModelUpdate) -> dict:
    """Change a model's metadata."""
    fields = body.model_dump(exclude_unset=True)
    async with conn.transaction():
        model = await own_model(conn, principal, repo_id, lock=True)
        if not fields:
            return model
        row = await repository.update_model(conn, model["id"], fields)
        await notify_catalog_changed(conn, model["repo_id"])
        await audit.record(
            conn, "model.update", "model", model["repo_id"], repo_id=model["repo_id"], before=model, after=row
        )
    download_cache.clear()
    return row


async def create_version(conn: psycopg.AsyncConnection, principal: Principal, repo_id: str, version: str) -> dict:
    """Add a version; versions are immutable once their files are verified."""
    check_version(version)
    async with conn.transaction():
        model = await own_model(conn, principal, repo_id, lock=True)
        row = await repository.insert_version(conn, model["id"], version)
        if row is None:
            raise Conflict("version already exists")
        await repository.touch_model(conn, model["id"])
        await write_event(
            conn, VersionCreated(repo_id=model["repo_id"], version=version, owner_id=model["owner_id"] or 0)
        )
        await audit.record(conn, "version.create", "version", f"{model['repo_id']}@{version}", repo_id=model["repo_id"])
    return {"repo_id": model["repo_id"], "version": row["version"], "created_ts": row["created_ts"]}


async def _version(conn: psycopg.AsyncConnection, model: dict, version: str) -> dict:
    check_version(version)
    row = await repository.get_version(conn, model["id"], version)
    if row is None:
        raise NotFound("version not found")
    return row


async def list_versions(conn: psycopg.AsyncConnection, principal: Principal, repo_id: str) -> list[dict]:
    model = await own_model(conn, principal, repo_id)
    return [
        {"repo_id": model["repo_id"], "version": v["version"], "created_ts": v["created_ts"]}
        for v in await repository.list_versions(conn, model["id"])
    ]


async def initiate_upload(
    conn: psycopg.AsyncConnection, principal: Principal, repo_id: str, version: str, filename: str, expires: int
) -> dict:
    """Open an upload of `filename` to `version`; returns the row data for a presigned PUT."""
    check_rfilename(filename)
    async with conn.transaction():
        model = await own_model(conn, principal, repo_id)
        ver = await _version(conn, model, version)
        if await repository.file_exists(conn, ver["id"], filename):
            raise Conflict("file already published in this version; create a new version to change it")
        repo_id = model["repo_id"]
        object_key = check_object_key(upload_object_key(repo_id, version, filename))
        expires_ts = int(time.time()) + expires
        row = await repository.insert_upload(
            conn, model["id"], ver["id"], filename, object_key, principal.user_id, expires_ts
        )
        await write_event(
            conn,
            UploadInitiated(
                upload_id=row["id"],
                repo_id=repo_id,
                version=version,
                rfilename=filename,
                object_key=object_key,
                developer_id=principal.user_id,
                expires_ts=expires_ts,
            ),
        )
    return {
        "upload_id": row["id"],
        "repo_id": repo_id,
        "version": version,
        "rfilename": filename,
        "object_key": object_key,
    }


async def complete_upload(
    conn: psycopg.AsyncConnection, principal: Principal, repo_id: str, version: str, body: CompleteIn
) -> dict:
    """Declare size and sha256; the file waits in pending_verification for ingest's verdict."""
    check_rfilename(body.rfilename)
    sha256 = body.sha256.lower()
    async with conn.transaction():
        model = await own_model(conn, principal, repo_id)
        ver = await _version(conn, model, version)
        upload = await repository.latest_upload(conn, ver["id"], body.rfilename, for_update=True)
        if upload is None:
            raise NotFound("no upload initiated for this file")
        if upload["status"] != "initiated":
            raise Conflict(f"upload is already {upload['status']}; initiate a new upload to try again")
        if await uploads_repository.is_multipart(conn, upload["upload_id"]):
            raise Conflict(f"upload {upload['upload_id']} is multipart: POST /v1/dev/uploads/{{upload_id}}/complete")
        now = int(time.time())
        repo_id = model["repo_id"]
        await repository.mark_completed(conn, upload["upload_id"], body.size, sha256, now)
        await write_event(
            conn,
            UploadCompleted(
                upload_id=upload["upload_id"],
                repo_id=repo_id,
                version=version,
                rfilename=body.rfilename,
                object_key=upload["object_key"],
                developer_id=principal.user_id,
                size=body.size,
                sha256=sha256,
            ),
        )
        after = {"status": "pending_verification", "rfilename": body.rfilename, "size": body.size, "sha256": sha256}
        await audit.record(
            conn,
            "upload.complete",
            "upload",
            upload["upload_id"],
            repo_id=repo_id,
            before={"status": upload["status"]},
            after=after,
        )
    return {**upload, "status": "pending_verification", "size": body.size, "sha256": sha256, "completed_ts": now}


async def list_uploads(conn: psycopg.AsyncConnection, principal: Principal, repo_id: str, version: str) -> list[dict]:
    model = await own_model(conn, principal, repo_id)
    ver = await _version(conn, model, version)
    return await repository.list_uploads(conn, ver["id"])


async def get_upload(conn: psycopg.AsyncConnection, principal: Principal, upload_id: int) -> dict:
    row = await repository.get_upload(conn, upload_id)
    if row is None or (row["developer_id"] != principal.user_id and not principal.sees_everything):
        raise NotFound("upload not found")
    return row
