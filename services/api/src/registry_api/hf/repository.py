"""SQL of the Hugging Face–compatible surface: a model's versions as commits, a revision's files.

Who may see a model is decided by the catalog (catalog.repository.get_model with the caller's visibility);
these queries take a model the caller may already see (or own) by id.
"""

from __future__ import annotations

import psycopg

# A version, newest first, with whether it has verified files and whether any of its files is still waiting
# for (or failed) verification: for each file name, the newest upload counts.
VERSIONS = """
    select v.id, v.version, v.created_ts,
        exists (select 1 from files f where f.version_id = v.id) as has_files,
        exists (
            select 1 from (
                select distinct on (u.rfilename) u.status from uploads u
                where u.version_id = v.id order by u.rfilename, u.id desc
            ) latest where latest.status <> 'available'
        ) as incomplete
    from versions v where v.model_id = %s order by v.id desc
"""

FILE_COLUMNS = "f.rfilename, f.size, f.sha256, f.object_key, f.file_format, f.is_pickle, f.updated_ts"


async def versions(conn: psycopg.AsyncConnection, model_id: int) -> list[dict]:
    """The model's versions, newest first, with `has_files` and `incomplete`."""
    cur = await conn.execute(VERSIONS, [model_id])
    return await cur.fetchall()


async def has_unversioned_files(conn: psycopg.AsyncConnection, model_id: int) -> bool:
    """Whether the model has files of the 0.3.0 catalog (no version)."""
    cur = await conn.execute("select 1 from files where model_id = %s and version_id is null limit 1", [model_id])
    return await cur.fetchone() is not None


async def revision_files(conn: psycopg.AsyncConnection, model_id: int, version_id: int | None) -> list[dict]:
    """Every verified file of one version (None: the unversioned files), by name."""
    cur = await conn.execute(
        f"select {FILE_COLUMNS} from files f where f.model_id = %s and f.version_id is not distinct from %s"
        " order by f.rfilename",
        [model_id, version_id],
    )
    return await cur.fetchall()


async def revision_file(
    conn: psycopg.AsyncConnection, model_id: int, version_id: int | None, rfilename: str
) -> dict | None:
    """One verified file of a version, or None."""
    cur = await conn.execute(
        f"select {FILE_COLUMNS} from files f where f.model_id = %s and f.version_id is not distinct from %s"
        " and f.rfilename = %s",
        [model_id, version_id, rfilename],
    )
    return await cur.fetchone()


async def verified_blob(conn: psycopg.AsyncConnection, model_id: int, sha256: str) -> dict | None:
    """A verified file of the model with this content (any version), or None."""
    cur = await conn.execute(
        f"select {FILE_COLUMNS} from files f where f.model_id = %s and f.sha256 = %s order by f.id desc limit 1",
        [model_id, sha256],
    )
    return await cur.fetchone()


async def insert_file(conn: psycopg.AsyncConnection, model_id: int, version_id: int, row: dict, now: int) -> None:
    """Put an already verified object into a version under `row['rfilename']`."""
    await conn.execute(
        "insert into files (model_id, version_id, rfilename, size, sha256, object_key, file_format, is_pickle,"
        " updated_ts) values (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
        [
            model_id,
            version_id,
            row["rfilename"],
            row["size"],
            row["sha256"],
            row["object_key"],
            row["file_format"],
            row["is_pickle"],
            now,
        ],
    )


async def version_names(conn: psycopg.AsyncConnection, model_id: int) -> set[str]:
    cur = await conn.execute("select version from versions where model_id = %s", [model_id])
    return {r["version"] for r in await cur.fetchall()}


async def upload_statuses(conn: psycopg.AsyncConnection, upload_ids: list[int]) -> list[dict]:
    """Status and reason of each upload."""
    cur = await conn.execute(
        "select id, rfilename, status, reason, detail from uploads where id = any(%s) order by id", [upload_ids]
    )
    return await cur.fetchall()
