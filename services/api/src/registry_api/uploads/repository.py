"""SQL of multipart uploads (rows of `uploads` with an S3 multipart upload behind them)."""

from __future__ import annotations

import psycopg

MULTIPART_COLUMNS = """u.id as upload_id, m.repo_id, v.version, u.rfilename, u.object_key, u.status,
    u.multipart_upload_id, u.multipart_size as size, u.part_size, u.part_count, u.developer_id, u.model_id,
    u.version_id, u.created_ts, u.completed_ts, u.declared_size, u.declared_sha256"""


async def insert_multipart(
    conn: psycopg.AsyncConnection,
    *,
    model_id: int,
    version_id: int,
    rfilename: str,
    object_key: str,
    developer_id: int,
    expires_ts: int,
    s3_upload_id: str,
    size: int,
    part_size: int,
    part_count: int,
) -> dict:
    cur = await conn.execute(
        "insert into uploads (model_id, version_id, rfilename, object_key, developer_id, expires_ts,"
        " multipart_upload_id, multipart_size, part_size, part_count)"
        " values (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) returning id, created_ts",
        [
            model_id,
            version_id,
            rfilename,
            object_key,
            developer_id,
            expires_ts,
            s3_upload_id,
            size,
            part_size,
            part_count,
        ],
    )
    row = await cur.fetchone()
    assert row is not None
    return row


async def get_multipart(conn: psycopg.AsyncConnection, upload_id: int, for_update: bool = False) -> dict | None:
    """A multipart upload by id (None if absent or a single-PUT upload)."""
    lock = " for update of u" if for_update else ""
    cur = await conn.execute(
        f"select {MULTIPART_COLUMNS} from uploads u join models m on m.id = u.model_id"
        f" join versions v on v.id = u.version_id where u.id = %s and u.multipart_upload_id is not null{lock}",
        [upload_id],
    )
    return await cur.fetchone()


async def is_multipart(conn: psycopg.AsyncConnection, upload_id: int) -> bool:
    """Whether an upload row stands for a multipart upload."""
    cur = await conn.execute("select multipart_upload_id is not null as mp from uploads where id = %s", [upload_id])
    row = await cur.fetchone()
    return bool(row and row["mp"])


async def mark_completed(conn: psycopg.AsyncConnection, upload_id: int, size: int, sha256: str, now: int) -> None:
    await conn.execute(
        "update uploads set status = 'pending_verification', declared_size = %s, declared_sha256 = %s,"
        " completed_ts = %s where id = %s",
        [size, sha256, now, upload_id],
    )


async def mark_aborted(conn: psycopg.AsyncConnection, upload_id: int, now: int) -> None:
    await conn.execute(
        "update uploads set status = 'aborted', reason = 'aborted', detail = 'aborted by the developer',"
        " verdict_ts = %s where id = %s",
        [now, upload_id],
    )
