"""Rules of the Hugging Face–compatible surface.

A model's versions are its commits: each has a stable 40-hex commit id (`commit_sha`), and `main` is the
newest version that is complete (it has verified files and none of its files is still waiting for, or
failed, verification). Files of the 0.3.0 catalog without a version form one more commit, used as `main`
when the model has no complete version. Only verified files are ever listed or served.

Who may see a model is the catalog's rule (catalog.repository.get_model); who may change it is the
developer API's (dev.service.own_model); a commit creates a version through the developer API's
repository and its new files go through the same upload life cycle (UploadInitiated/UploadCompleted,
then ingest's verdict) as every upload.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote, urlsplit

import orjson
import psycopg
from minio import Minio
from minio.commonconfig import CopySource
from minio.error import S3Error
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from registry_api.auth import Principal
from registry_api.catalog import repository as catalog_repository
from registry_api.catalog.cache import download_cache, notify_catalog_changed
from registry_api.catalog.service import refresh_model_files
from registry_api.catalog.visibility import visibility_params
from registry_api.dev import repository as dev_repository
from registry_api.dev import service as dev_service
from registry_api.errors import ApiError, Conflict, NotFound
from registry_api.hf import repository
from registry_api.kit.outbox import write_event
from registry_api.kit.validate import check_repo_id, check_rfilename
from registry_api.uploads.service import plan_parts
from registry_api.uploads.storage import MultipartStorage, PartsRejected, UploadGone
from registry_shared.events import UploadCompleted, UploadInitiated
from registry_shared.storage import HF_LFS_PREFIX, minio_client, upload_object_key

log = logging.getLogger(__name__)

#: Where LFS objects wait, outside ingest's upload prefix, until a commit names them.
LFS_PREFIX = HF_LFS_PREFIX
_SHA256_LEN = 64
_HEX = frozenset("0123456789abcdef")


class HfSettings(BaseSettings):
    """Settings of the /hf surface (environment variables HF_*)."""

    model_config = SettingsConfigDict(env_prefix="HF_", env_file=None, extra="ignore")
    commit_wait_seconds: float = Field(
        120.0, ge=0, le=3600, description="How long a commit waits for ingest's verdicts on its new files."
    )
    commit_max_bytes: int = Field(
        16 * 1024 * 1024, ge=1024, description="Largest ndjson commit body accepted (inline files included)."
    )
    multipart_threshold: int = Field(
        16 * 1024 * 1024, ge=5 * 1024 * 1024, description="LFS objects larger than this are sent in parts."
    )
    multipart_chunk: int = Field(8 * 1024 * 1024, ge=5 * 1024 * 1024, description="Size of one part.")
    url_expires: int = Field(3600, ge=60, le=86400, description="Lifetime of presigned URLs handed out.")


class HfError(ApiError):
    """An error of the Hub's contract: a status, an `X-Error-Code` and a message."""

    def __init__(
        self, status: int, code: str, detail: str, commit: str | None = None, body: dict | None = None
    ) -> None:
        super().__init__(detail)
        self.status_code = status
        self.code = code
        self.commit = commit
        self.body = body or {}


def repo_not_found() -> HfError:
    return HfError(404, "RepoNotFound", "Repository not found")


def error_headers(exc: ApiError) -> dict[str, str]:
    """`X-Error-Code` / `X-Error-Message` for an error answered on /hf."""
    code = getattr(exc, "code", None)
    if code is None:
        code = {401: "Unauthorized", 403: "Forbidden", 404: "RepoNotFound", 409: "Conflict"}.get(
            exc.status_code, "BadRequest"
        )
    message = " ".join(exc.detail.encode("ascii", "replace").decode().split())[:500]  # one printable line
    headers = {"X-Error-Code": code, "X-Error-Message": message}
    commit = getattr(exc, "commit", None)
    if commit:
        headers["X-Repo-Commit"] = commit
    return headers


# ---------------------------------------------------------------- commits and revisions


def commit_sha(model_id: int, version_id: int | None) -> str:
    """The stable 40-hex commit id of a version (None: the unversioned files)."""
    return hashlib.sha256(f"model-registry:{model_id}:{version_id or 0}".encode()).hexdigest()[:40]


@dataclass(frozen=True, slots=True)
class Revision:
    """One commit of a model: a version (or the unversioned files)."""

    version_id: int | None
    version: str | None
    sha: str
    created_ts: int


def _is_commit_id(rev: str) -> bool:
    return len(rev) == 40 and set(rev) <= _HEX


async def model_for(conn: psycopg.AsyncConnection, principal: Principal, repo_id: str) -> dict:
    """The model if the caller may see it (the catalog's rule), else RepoNotFound."""
    try:
        check_repo_id(repo_id)
    except ApiError:
        raise repo_not_found() from None
    model = await catalog_repository.get_model(conn, visibility_params(principal), repo_id)
    if model is None:
        raise repo_not_found()
    return model


async def main_revision(conn: psycopg.AsyncConnection, model_id: int) -> Revision | None:
    """The newest complete version; else the unversioned files; else None (nothing to serve yet)."""
    for v in await repository.versions(conn, model_id):
        if v["has_files"] and not v["incomplete"]:
            return Revision(v["id"], v["version"], commit_sha(model_id, v["id"]), v["created_ts"])
    if await repository.has_unversioned_files(conn, model_id):
        return Revision(None, None, commit_sha(model_id, None), 0)
    return None


async def resolve_revision(conn: psycopg.AsyncConnection, model: dict, revision: str) -> Revision:
    """`main`, `refs/heads/main`, a version name (or `refs/tags/<name>`), or a commit id; else RevisionNotFound."""
    rev = revision.removeprefix("refs/heads/").removeprefix("refs/tags/")
    if rev == "main":
        found = await main_revision(conn, model["id"])
        if found is not None:
            return found
    elif rev:
        commit = rev.lower() if _is_commit_id(rev.lower()) else None
        if commit is not None and commit == commit_sha(model["id"], None):
            if await repository.has_unversioned_files(conn, model["id"]):
                return Revision(None, None, commit, 0)
        for v in await repository.versions(conn, model["id"]):
            if v["version"] == rev or (commit is not None and commit_sha(model["id"], v["id"]) == commit):
                return Revision(v["id"], v["version"], commit_sha(model["id"], v["id"]), v["created_ts"])
    raise HfError(404, "RevisionNotFound", f"Invalid rev id: {revision}")


def check_path(path: str) -> str:
    """A file path in a repo (the catalog's rule), as a Hub error."""
    try:
        return check_rfilename(path)
    except ApiError as exc:
        raise HfError(400, "InvalidPath", exc.detail) from None


# ---------------------------------------------------------------- the download side


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def blob_id(sha256: str, size: int) -> str:
    """The git blob id of the file's LFS pointer (what a git checkout of the repo would hold)."""
    pointer = lfs_pointer(sha256, size)
    return hashlib.sha1(b"blob %d\0" % len(pointer) + pointer, usedforsecurity=False).hexdigest()


def file_entry(f: dict) -> dict[str, Any]:
    """A tree / paths-info entry of a file: every file is stored as an LFS object."""
    return {
        "type": "file",
        "oid": blob_id(f["sha256"], f["size"]),
        "size": f["size"],
        "path": f["rfilename"],
        "lfs": {"oid": f["sha256"], "size": f["size"], "pointerSize": len(lfs_pointer(f["sha256"], f["size"]))},
    }


def folder_entry(path: str, sha: str) -> dict[str, Any]:
    return {
        "type": "directory",
        "oid": hashlib.sha1(f"{sha}:{path}".encode(), usedforsecurity=False).hexdigest(),
        "path": path,
    }


def tree_entries(files: list[dict], sha: str, under: str, recursive: bool) -> list[dict]:
    """The entries below folder `under` ('' for the root), folders first at each level as git lists them."""
    prefix = f"{under}/" if under else ""
    out: dict[str, dict] = {}
    for f in files:
        name = f["rfilename"]
        if not name.startswith(prefix):
            continue
        rest = name[len(prefix) :].split("/")
        for depth in range(1, len(rest)):
            folder = prefix + "/".join(rest[:depth])
            if folder not in out:
                out[folder] = folder_entry(folder, sha)
            if not recursive:
                break
        if recursive or len(rest) == 1:
            out[name] = file_entry(f)
    return sorted(out.values(), key=lambda e: e["path"])


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def model_json(model: dict, rev: Revision | None, files: list[dict] | None, blobs: bool = False) -> dict:
    """The Hub's model document for a model (and a revision's files as siblings)."""
    tags = [t.strip() for t in (model.get("tags") or "").split(",") if t.strip()]
    doc: dict[str, Any] = {
        "_id": str(model["id"]),
        "id": model["repo_id"],
        "modelId": model["repo_id"],
        "author": model["repo_id"].split("/", 1)[0],
        "private": model["visibility"] == "private",
        "gated": False,
        "disabled": False,
        "downloads": model["downloads"],
        "likes": model["likes"],
        "tags": tags,
        "pipeline_tag": model.get("pipeline_tag"),
        "createdAt": iso(model["created_at"].timestamp()),
        "lastModified": iso(rev.created_ts if rev and rev.created_ts else model["last_modified"].timestamp()),
    }
    if rev is not None:
        doc["sha"] = rev.sha
    if files is not None:
        siblings = []
        for f in files:
            s: dict[str, Any] = {"rfilename": f["rfilename"]}
            if blobs:
                e = file_entry(f)
                s.update(size=f["size"], blobId=e["oid"], lfs={**e["lfs"], "sha256": f["sha256"]})
            siblings.append(s)
        doc["siblings"] = siblings
    return doc


async def resolve_file(app: Any, principal: Principal, raw_tail: str) -> dict:
    """The verified file a resolve names (`raw_tail`: `{namespace}/{name}/resolve/{revision}/{path}` as sent):
    {repo_id, rfilename, version, size, sha256, object_key, commit}.

    Answers are cached like the native download's (catalog.cache: cleared on every catalog change, kept no
    longer than the grant that allows them); the path is parsed and checked only on a miss."""
    cache_key = (principal.user_id, principal.role, "hf", raw_tail, None)  # 5 items: never a /v1 download's key
    row = download_cache.get(cache_key)
    if row is not None:
        return row
    repo_id, revision, path = parse_resolve_path(raw_tail)
    generation = download_cache.generation
    async with app.state.pool.connection() as conn:
        model = await model_for(conn, principal, repo_id)
        rev = await resolve_revision(conn, model, revision)
        f = await repository.revision_file(conn, model["id"], rev.version_id, path)
    if f is None:
        raise HfError(404, "EntryNotFound", f'{path} does not exist on "{revision}"', commit=rev.sha)
    row = {
        "repo_id": model["repo_id"],  # the model's own spelling (repo ids are case-insensitive, issue 11)
        "rfilename": f["rfilename"],
        "version": rev.version,
        "size": f["size"],
        "sha256": f["sha256"],
        "object_key": f["object_key"],
        "commit": rev.sha,
        "etag": f'"{f["sha256"]}"'.encode(),
        "fixed_headers": [
            (b"x-repo-commit", rev.sha.encode()),
            (b"x-linked-etag", f'"{f["sha256"]}"'.encode()),
            (b"x-linked-size", str(f["size"]).encode()),
            (b"etag", f'"{f["sha256"]}"'.encode()),
            (b"accept-ranges", b"bytes"),
        ],
    }
    download_cache.put(cache_key, row, model["access_until"], generation)
    return row


def parse_resolve_path(raw: str) -> tuple[str, str, str]:
    """`{namespace}/{name}/resolve/{revision}/{path}` from the raw (still encoded) request path.

    The revision is one segment (`%2F` in it is a '/'), the file path's segments may not hide a '/'."""
    parts = raw.split("/")
    if len(parts) < 5 or parts[2] != "resolve":
        raise repo_not_found()
    repo_id = f"{unquote(parts[0])}/{unquote(parts[1])}"
    revision = unquote(parts[3])
    segments = [unquote(p) for p in parts[4:]]
    if any("/" in s for s in segments):
        raise HfError(400, "InvalidPath", "encoded '/' in the file path")
    return repo_id, revision, check_path("/".join(segments))


# ---------------------------------------------------------------- the upload side


def _hf_settings(app: Any) -> HfSettings:
    settings = getattr(app.state, "hf_settings", None)
    if settings is None:
        settings = app.state.hf_settings = HfSettings()
    return settings


def store(app: Any) -> Minio:
    """A MinIO client on the internal endpoint (object writes of the commit)."""
    client = getattr(app.state, "hf_minio", None)
    if client is None:
        client = app.state.hf_minio = minio_client(app.state.settings)
    return client


def lfs_key(repo_id: str, oid: str) -> str:
    return f"{LFS_PREFIX}{repo_id}/{oid}"


def check_oid(oid: object) -> str:
    if not isinstance(oid, str) or len(oid) != _SHA256_LEN or not set(oid) <= _HEX:
        raise HfError(400, "InvalidOid", "oid must be a lowercase hex sha256")
    return oid


def _stat_size(client: Minio, bucket: str, key: str) -> int | None:
    try:
        return client.stat_object(bucket, key).size
    except S3Error as exc:
        if exc.code in ("NoSuchKey", "NoSuchObject", "NotFound"):
            return None
        raise


async def owned_model(conn: psycopg.AsyncConnection, principal: Principal, repo_id: str, lock: bool = False) -> dict:
    """The caller's model to write to (the developer API's rule), as Hub errors."""
    if principal.role not in ("developer", "admin"):
        raise HfError(403, "Forbidden", "developer role required")
    try:
        return await dev_service.own_model(conn, principal, repo_id, lock=lock)
    except NotFound:
        raise repo_not_found() from None
    except ApiError as exc:
        if exc.status_code == 422:
            raise repo_not_found() from None
        raise HfError(exc.status_code, "Forbidden" if exc.status_code == 403 else "BadRequest", exc.detail) from None


def _sign(app: Any, payload: bytes) -> str:
    secret = hashlib.sha256(b"hf-lfs:" + app.state.settings.minio_root_password.get_secret_value().encode()).digest()
    return hmac.new(secret, payload, hashlib.sha256).hexdigest()


def signed_token(app: Any, fields: dict) -> str:
    """A self-authorizing token (LFS multipart completion URLs carry no auth header)."""
    body = base64.urlsafe_b64encode(orjson.dumps(fields)).decode().rstrip("=")
    return f"{body}.{_sign(app, body.encode())}"


def open_token(app: Any, token: str) -> dict:
    body, _, sig = token.partition(".")
    if not sig or not hmac.compare_digest(sig, _sign(app, body.encode())):
        raise HfError(403, "InvalidSignature", "invalid or tampered completion URL")
    try:
        fields = orjson.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    except (ValueError, binascii.Error):
        raise HfError(403, "InvalidSignature", "invalid completion URL") from None
    if fields.get("exp", 0) < time.time():
        raise HfError(403, "Expired", "completion URL expired")
    return fields


async def lfs_batch(app: Any, principal: Principal, repo_id: str, body: dict, base: str) -> dict:
    """The LFS batch API (upload): for each object, nothing if the model already has it verified or it is
    staged with its size, else a presigned PUT (basic) or presigned part PUTs and a signed completion URL."""
    if body.get("operation") != "upload":
        raise HfError(400, "BadRequest", "only the upload operation is supported")
    objects = body.get("objects")
    if not isinstance(objects, list) or not objects or len(objects) > 1000:
        raise HfError(400, "BadRequest", "objects: a list of 1 to 1000 {oid, size}")
    wanted: list[tuple[str, int]] = []
    for o in objects:
        if not isinstance(o, dict) or not isinstance(o.get("size"), int) or o["size"] < 0:
            raise HfError(400, "BadRequest", "each object needs an oid and a size")
        wanted.append((check_oid(o.get("oid")), o["size"]))
    settings = _hf_settings(app)
    async with app.state.pool.connection() as conn:
        model = await owned_model(conn, principal, repo_id)
        known = {oid: await repository.verified_blob(conn, model["id"], oid) for oid, _ in wanted}
    repo_id = model["repo_id"]  # the model's own spelling: staged objects are keyed by it
    client, bucket = store(app), app.state.settings.minio_bucket
    transfers = body.get("transfers") or ["basic"]
    out, chosen = [], "basic"
    for oid, size in wanted:
        blob = known[oid]
        if blob is not None:
            if blob["size"] != size:
                out.append({"oid": oid, "size": size, "error": {"code": 422, "message": "size does not match oid"}})
            else:
                out.append({"oid": oid, "size": size})
            continue
        key = lfs_key(repo_id, oid)
        if await asyncio.to_thread(_stat_size, client, bucket, key) == size:
            out.append({"oid": oid, "size": size})
            continue
        if size > settings.multipart_threshold and "multipart" in transfers:
            chosen = "multipart"
            out.append(
                {
                    "oid": oid,
                    "size": size,
                    "authenticated": True,
                    "actions": {"upload": await _multipart(app, repo_id, oid, size, base)},
                }
            )
        else:
            url = app.state.presigner.put_url(key, settings.url_expires)
            out.append(
                {
                    "oid": oid,
                    "size": size,
                    "authenticated": True,
                    "actions": {"upload": {"href": url, "expires_in": settings.url_expires}},
                }
            )
    return {"transfer": chosen, "objects": out, "hash_algo": "sha256"}


def _multipart_storage(app: Any) -> MultipartStorage:
    storage = getattr(app.state, "hf_multipart", None)
    if storage is None:
        storage = app.state.hf_multipart = MultipartStorage(app.state.settings, store(app))
    return storage


async def _multipart(app: Any, repo_id: str, oid: str, size: int, base: str) -> dict:
    """Start an S3 multipart upload of the staged object (the uploads domain's storage and part signer):
    presigned part URLs and a signed completion href."""
    settings = _hf_settings(app)
    try:
        chunk, parts = plan_parts(size, settings.multipart_chunk)
    except ApiError as exc:
        raise HfError(422, "BadRequest", exc.detail) from None
    key = lfs_key(repo_id, oid)
    upload_id = await asyncio.to_thread(_multipart_storage(app).create, key)
    presigner = app.state.presigner
    header: dict[str, str] = {"chunk_size": str(chunk)}
    for n in range(1, parts + 1):
        header[f"{n:05d}"] = presigner.part_url(key, upload_id, n, settings.url_expires)
    token = signed_token(
        app,
        {
            "repo": repo_id,
            "oid": oid,
            "size": size,
            "uid": upload_id,
            "n": parts,
            "exp": int(time.time()) + settings.url_expires,
        },
    )
    return {"href": f"{base}/api/lfs/complete/{token}", "header": header, "expires_in": settings.url_expires}


async def complete_multipart(app: Any, token: str, body: dict) -> dict:
    """Finish a multipart upload (the URL authorizes itself). The part list must be every part handed out,
    in order, with the ETags the store gave; otherwise the upload is aborted and nothing is kept."""
    fields = open_token(app, token)
    storage = _multipart_storage(app)
    key = lfs_key(fields["repo"], fields["oid"])
    parts = body.get("parts")
    problem = None
    if body.get("oid") != fields["oid"]:
        problem = "oid does not match this upload"
    elif (
        not isinstance(parts, list)
        or len(parts) != fields["n"]
        or any(
            not isinstance(p, dict)
            or p.get("partNumber") != i + 1
            or not isinstance(p.get("etag"), str)
            or not p["etag"]
            for i, p in enumerate(parts)
        )
    ):
        problem = f"expected parts 1..{fields['n']}, each with its etag, in order"
    if problem is None:
        try:
            await asyncio.to_thread(storage.complete, key, fields["uid"], [(p["partNumber"], p["etag"]) for p in parts])
        except PartsRejected as exc:
            problem = f"object store refused the parts: {exc.code}"
        except UploadGone:
            raise HfError(404, "UploadNotFound", "this multipart upload was completed or aborted") from None
    if problem is not None:
        await asyncio.to_thread(storage.abort, key, fields["uid"])
        raise HfError(400, "PartsMismatch", problem + "; the upload was aborted")
    client, bucket = store(app), app.state.settings.minio_bucket
    size = await asyncio.to_thread(_stat_size, client, bucket, key)
    if size != fields["size"]:
        await asyncio.to_thread(client.remove_object, bucket, key)
        raise HfError(400, "SizeMismatch", f"uploaded {size} bytes, declared {fields['size']}")
    return {"oid": fields["oid"], "size": size}


# ---------------------------------------------------------------- commits


@dataclass
class _Change:
    path: str
    kind: str  # "reuse" (a verified object), "staged" (an LFS object to copy), "inline" (bytes of the commit)
    size: int
    sha256: str
    blob: dict | None = None
    data: bytes | None = None


def parse_commit(body: bytes) -> tuple[dict, list[_Change | tuple[str, str]]]:
    """The ndjson commit: a header, then files, LFS files and deletions. Returns (header, operations) where a
    deletion is ("file"|"folder", path); LFS oids are checked against the store later."""
    header: dict | None = None
    ops: list[_Change | tuple[str, str]] = []
    for n, line in enumerate(body.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = orjson.loads(line)
        except orjson.JSONDecodeError:
            raise HfError(400, "BadRequest", f"line {n}: not JSON") from None
        if not isinstance(item, dict) or not isinstance(item.get("value"), dict):
            raise HfError(400, "BadRequest", f"line {n}: expected {{key, value}}")
        key, value = item.get("key"), item["value"]
        if key == "header":
            header = value
        elif key == "file":
            path = check_path(value.get("path") or "")
            if value.get("encoding") != "base64" or not isinstance(value.get("content"), str):
                raise HfError(400, "BadRequest", f"line {n}: file content must be base64")
            try:
                data = base64.b64decode(value["content"], validate=True)
            except (binascii.Error, ValueError):
                raise HfError(400, "BadRequest", f"line {n}: invalid base64") from None
            ops.append(_Change(path, "inline", len(data), hashlib.sha256(data).hexdigest(), data=data))
        elif key == "lfsFile":
            path = check_path(value.get("path") or "")
            if value.get("algo", "sha256") != "sha256":
                raise HfError(400, "BadRequest", f"line {n}: only sha256 LFS objects")
            size = value.get("size")
            if size is not None and (not isinstance(size, int) or size < 0):
                raise HfError(400, "BadRequest", f"line {n}: size must be a non-negative integer")
            ops.append(_Change(path, "lfs", -1 if size is None else size, check_oid(value.get("oid"))))
        elif key in ("deletedFile", "deletedFolder"):
            path = (value.get("path") or "").rstrip("/")
            ops.append(("folder" if key == "deletedFolder" else "file", check_path(path)))
        else:
            raise HfError(400, "BadRequest", f"line {n}: unknown key {key!r}")
    if header is None:
        raise HfError(400, "BadRequest", "the commit has no header line")
    if not ops:
        raise HfError(400, "BadRequest", "the commit changes nothing")
    return header, ops


async def _next_version_name(conn: psycopg.AsyncConnection, model_id: int) -> str:
    names = await repository.version_names(conn, model_id)
    n = len(names) + 1
    while f"hf-{n}" in names:
        n += 1
    return f"hf-{n}"


async def commit(app: Any, principal: Principal, repo_id: str, revision: str, body: bytes, base: str) -> dict:
    """Create a new version: the parent's (main's) files, changed by the commit. New objects are uploads
    like any other: served once ingest verified them against the declared oid and size. Waits (bounded)
    for those verdicts. Everything is checked before anything is written."""
    if revision.removeprefix("refs/heads/") != "main":
        raise HfError(404, "RevisionNotFound", "commits go to main (each commit creates a new version)")
    header, ops = parse_commit(body)
    settings = _hf_settings(app)
    client, bucket = store(app), app.state.settings.minio_bucket
    async with app.state.pool.connection() as conn:
        model = await owned_model(conn, principal, repo_id)
        repo_id = model["repo_id"]  # the model's own spelling (repo ids are case-insensitive, issue 11)
        parent = await main_revision(conn, model["id"])
        parent_commit = header.get("parentCommit")
        if parent_commit and (parent is None or parent_commit != parent.sha):
            raise HfError(412, "ParentCommitMismatch", "parentCommit is not the current head of main")
        for op in ops:
            if isinstance(op, _Change) and op.kind == "lfs":
                blob = await repository.verified_blob(conn, model["id"], op.sha256)
                if blob is not None and op.size in (-1, blob["size"]):
                    op.kind, op.blob, op.size = "reuse", blob, blob["size"]
                    continue
                staged = await asyncio.to_thread(_stat_size, client, bucket, lfs_key(repo_id, op.sha256))
                if staged is None:
                    raise HfError(422, "LfsObjectNotFound", f"{op.path}: LFS object {op.sha256} was never uploaded")
                if op.size not in (-1, staged):
                    raise HfError(422, "SizeMismatch", f"{op.path}: declared {op.size} bytes, uploaded {staged}")
                op.kind, op.size = "staged", staged
        parent_files = await repository.revision_files(conn, model["id"], parent.version_id) if parent else []
    files = {f["rfilename"]: f for f in parent_files}
    changes: dict[str, _Change] = {}
    for op in ops:
        if isinstance(op, tuple):
            what, path = op
            gone = [p for p in files if p == path or (what == "folder" and p.startswith(path + "/"))]
            gone += [p for p in changes if p == path or (what == "folder" and p.startswith(path + "/"))]
            if not gone:
                raise HfError(404, "EntryNotFound", f"A file with this name doesn't exist: {path}")
            for p in gone:
                files.pop(p, None)
                changes.pop(p, None)
        else:
            files.pop(op.path, None)
            changes[op.path] = op
    now = int(time.time())
    uploads: list[tuple[int, _Change, str]] = []
    async with app.state.pool.connection() as conn, conn.transaction():
        model = await owned_model(conn, principal, repo_id, lock=True)
        name = await _next_version_name(conn, model["id"])
        ver = await dev_repository.insert_version(conn, model["id"], name)
        if ver is None:
            raise HfError(409, "Conflict", "a concurrent commit created the same version; retry")
        for f in files.values():
            await repository.insert_file(conn, model["id"], ver["id"], f, now)
        for path, ch in changes.items():
            if ch.kind == "reuse":
                await repository.insert_file(conn, model["id"], ver["id"], {**ch.blob, "rfilename": path}, now)
                continue
            key = upload_object_key(repo_id, name, path)
            up = await dev_repository.insert_upload(
                conn, model["id"], ver["id"], path, key, principal.user_id, now + settings.url_expires
            )
            await write_event(
                conn,
                UploadInitiated(
                    upload_id=up["id"],
                    repo_id=repo_id,
                    version=name,
                    rfilename=path,
                    object_key=key,
                    developer_id=principal.user_id,
                    expires_ts=now + settings.url_expires,
                ),
            )
            await dev_repository.mark_completed(conn, up["id"], ch.size, ch.sha256, now)
            await write_event(
                conn,
                UploadCompleted(
                    upload_id=up["id"],
                    repo_id=repo_id,
                    version=name,
                    rfilename=path,
                    object_key=key,
                    developer_id=principal.user_id,
                    size=ch.size,
                    sha256=ch.sha256,
                ),
            )
            uploads.append((up["id"], ch, key))
        await dev_repository.touch_model(conn, model["id"])
        if not uploads:
            await refresh_model_files(conn, model["id"])
            await notify_catalog_changed(conn, repo_id)
    if not uploads:
        download_cache.clear()
    await _store_objects(app, repo_id, uploads)
    sha = commit_sha(model["id"], ver["id"])
    try:
        await _await_verdicts(app, [u[0] for u in uploads], settings.commit_wait_seconds)
    finally:
        await _drop_staged(app, repo_id, uploads)
    return {
        "success": True,
        "commitOid": sha,
        "commitUrl": f"{base}/{repo_id}/commit/{sha}",
        "hookOutput": "",
        "pullRequestUrl": None,
        "version": name,
    }


async def _store_objects(app: Any, repo_id: str, uploads: list[tuple[int, _Change, str]]) -> None:
    """Put each new object at its upload key: a server-side copy of the staged LFS object, or the inline bytes."""
    import io

    client, bucket = store(app), app.state.settings.minio_bucket

    def work() -> None:
        for _, ch, key in uploads:
            if ch.kind == "staged":
                client.copy_object(bucket, key, CopySource(bucket, lfs_key(repo_id, ch.sha256)))
            else:
                client.put_object(bucket, key, io.BytesIO(ch.data or b""), len(ch.data or b""))

    try:
        await asyncio.to_thread(work)
    except S3Error as exc:
        # The version exists but its uploads never get their object: ingest expires them and the version
        # never becomes main. The client may retry the whole commit.
        raise HfError(
            409, "LfsObjectNotFound", f"an LFS object of the commit vanished before it was stored ({exc.code}); retry"
        ) from None


async def _drop_staged(app: Any, repo_id: str, uploads: list[tuple[int, _Change, str]]) -> None:
    """Delete the staged LFS objects whose copy has been judged: a verified one is now a blob of the model
    (the next batch for it answers "already there"), a refused one must be uploaded again anyway. Objects
    still waiting for a verdict are kept."""
    staged = {u[0]: u[1].sha256 for u in uploads if u[1].kind == "staged"}
    if not staged:
        return
    async with app.state.pool.connection() as conn:
        rows = await repository.upload_statuses(conn, list(staged))
    keys = [lfs_key(repo_id, staged[r["id"]]) for r in rows if r["status"] in ("available", "rejected", "expired")]
    client, bucket = store(app), app.state.settings.minio_bucket

    def work() -> None:
        for key in keys:
            client.remove_object(bucket, key)

    try:
        await asyncio.to_thread(work)
    except S3Error as exc:  # a leftover staged object costs space only, never correctness
        log.warning("staged LFS objects not deleted: %s", exc)


async def _await_verdicts(app: Any, upload_ids: list[int], wait_s: float) -> None:
    """Wait until ingest judged every upload (or `timeout`); a rejection fails the commit."""
    if not upload_ids:
        return
    deadline = time.monotonic() + wait_s
    while True:
        async with app.state.pool.connection() as conn:
            rows = await repository.upload_statuses(conn, upload_ids)
        bad = [r for r in rows if r["status"] in ("rejected", "expired")]
        if bad:
            r = bad[0]
            raise HfError(
                422,
                "UploadRejected",
                f"{r['rfilename']}: rejected by verification ({r['reason']}: {r['detail'] or ''}); the commit's version is never served as main",
            )
        if all(r["status"] == "available" for r in rows) or time.monotonic() > deadline:
            return
        await asyncio.sleep(0.1)


def store_host(app: Any) -> str:
    """The host name in presigned URLs (MINIO_PUBLIC_ENDPOINT, else MINIO_ENDPOINT), lower case."""
    host = getattr(app.state, "hf_store_host", None)
    if host is None:
        settings = app.state.settings
        endpoint = settings.minio_public_endpoint or settings.minio_endpoint
        host = app.state.hf_store_host = (urlsplit(f"//{endpoint}").hostname or "").lower()
    return host


__all__ = ["Conflict", "HfError", "HfSettings", "Revision"]
