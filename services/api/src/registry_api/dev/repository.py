"""SQL of the developer's writes: models, versions, uploads."""

from __future__ import annotations

import psycopg

from registry_api.catalog.repository import MODEL_COLUMNS

UPLOAD_COLUMNS = """u.id as upload_id, m.repo_id, v.version, u.rfilename, u.object_key, u.status,
    u.declared_size as size, u.declared_sha256 as sha256, u.reason, u.detail, u.created_ts, u.completed_ts,
    u.verdict_ts, u.developer_id, u.model_id, u.version_id, u.expires_ts"""


async def claim_namespace(conn: psycopg.AsyncConnection, namespace: str, user_id: int) -> int:
    """The owner of `namespace` (case-insensitive): the caller if it was free, who claimed it first otherwise.

    Inside the caller's transaction: a concurrent claim of the same namespace waits for this one to commit
    or roll back (the primary key on lower(name)), so exactly one developer ever owns it.
    """
    await conn.execute(
        "insert into namespaces (name_key, name, owner_id) values (lower(%(ns)s), %(ns)s, %(uid)s)"
        " on conflict (name_key) do nothing",
        {"ns": namespace, "uid": user_id},
    )
    cur = await conn.execute("select owner_id from namespaces where name_key = lower(%s)", [namespace])
    return (await cur.fetchone())["owner_id"]


async def insert_model(conn: psycopg.AsyncConnection, owner_id: int, fields: dict) -> dict | None:
    """Insert a model; None if its repo_id exists in any case."""
    cols = ", ".join(fields)
    vals = ", ".join(f"%({k})s" for k in fields)
    cur = await conn.execute(
        f"insert into models (owner_id, {cols}) values (%(owner_id)s, {vals})"
        f" on conflict do nothing returning {MODEL_COLUMNS.replace('m.', '')}",
        {**fields, "owner_id": owner_id},
    )
    return await cur.fetchone()


async def owned_model(conn: psycopg.AsyncConnection, repo_id: str, for_update: bool = False) -> dict | None:
    """The model row (any owner); `repo_id` in any case."""
    lock = " for update" if for_update else ""
    cur = await conn.execute(
        f"select {MODEL_COLUMNS} from models m where lower(m.repo_id) = lower(%s){lock}", [repo_id]
    )
    return await cur.fetchone()


async def update_model(conn: psycopg.AsyncConnection, model_id: int, fields: dict) -> dict:
    """Change metadata; bumps last_modified and last_update_ts."""
    sets = ", ".join(f"{k} = %({k})s" for k in fields)
    cur = await conn.execute(
        f"update models m set {sets}, last_modified = now(),"
        " last_update_ts = greatest(m.last_update_ts + 1, extract(epoch from now())::bigint)"
        f" where id = %(id)s returning {MODEL_COLUMNS}",
        {**fields, "id": model_id},
    )
    return await cur.fetchone()


async def touch_model(conn: psycopg.AsyncConnection, model_id: int) -> None:
    """Mark the model changed now (the change feed's cursor moves)."""
    await conn.execute(
        "update models set last_modified = now(),"
        " last_update_ts = greatest(last_update_ts, extract(epoch from now())::bigint) where id = %s",
        [model_id],
    )


async def insert_version(conn: psycopg.AsyncConnection, model_id: int, version: str) -> dict | None:
    cur = await conn.execute(
        "insert into versions (model_id, version) values (%s, %s) on conflict do nothing returning id, version, created_ts",
        [model_id, version],
    )
    return await cur.fetchone()


async def get_version(conn: psycopg.AsyncConnection, model_id: int, version: str) -> dict | None:
    cur = await conn.execute(
        "select id, version, created_ts from versions where model_id = %s and version = %s", [model_id, version]
    )
    return await cur.fetchone()


async def list_versions(conn: psycopg.AsyncConnection, model_id: int) -> list[dict]:
    cur = await conn.execute("select id, version, created_ts from versions where model_id = %s order by id", [model_id])
    return await cur.fetchall()


async def file_exists(conn: psycopg.AsyncConnection, version_id: int, rfilename: str) -> bool:
    cur = await conn.execute("select 1 from files where version_id = %s and rfilename = %s", [version_id, rfilename])
    return await cur.fetchone() is not None


async def insert_upload(
    conn: psycopg.AsyncConnection,
    model_id: int,
    version_id: int,
    rfilename: str,
    object_key: str,
    developer_id: int,
    expires_ts: int,
) -> dict:
    cur = await conn.execute(
        "insert into uploads (model_id, version_id, rfilename, object_key, developer_id, expires_ts)"
        " values (%s, %s, %s, %s, %s, %s) returning id, created_ts",
        [model_id, version_id, rfilename, object_key, developer_id, expires_ts],
    )
    return await cur.fetchone()


async def latest_upload(
    conn: psycopg.AsyncConnection, version_id: int, rfilename: str, for_update: bool = False
) -> dict | None:
    lock = " for update of u" if for_update else ""
    cur = await conn.execute(
        f"select {UPLOAD_COLUMNS} from uploads u join models m on m.id = u.model_id join versions v on v.id = u.version_id"
        f" where u.version_id = %s and u.rfilename = %s order by u.id desc limit 1{lock}",
        [version_id, rfilename],
    )
    return await cur.fetchone()


async def mark_completed(conn: psycopg.AsyncConnection, upload_id: int, size: int, sha256: str, now: int) -> None:
    await conn.execute(
        "update uploads set status = 'pending_verification', declared_size = %s, declared_sha256 = %s, completed_ts = %s"
        " where id = %s",
        [size, sha256, now, upload_id],
    )


async def list_uploads(conn: psycopg.AsyncConnection, version_id: int) -> list[dict]:
    cur = await conn.execute(
        f"select {UPLOAD_COLUMNS} from uploads u join models m on m.id = u.model_id join versions v on v.id = u.version_id"
        " where u.version_id = %s order by u.id",
        [version_id],
    )
    return await cur.fetchall()


async def get_upload(conn: psycopg.AsyncConnection, upload_id: int) -> dict | None:
    cur = await conn.execute(
        f"select {UPLOAD_COLUMNS} from uploads u join models m on m.id = u.model_id join versions v on v.id = u.version_id"
        " where u.id = %s",
        [upload_id],
    )
    return await cur.fetchone()


async def models_of(conn: psycopg.AsyncConnection, owner_id: int) -> list[dict]:
    cur = await conn.execute(f"select {MODEL_COLUMNS} from models m where m.owner_id = %s order by m.id", [owner_id])
    return await cur.fetchall()
