"""SQL of catalog reads. Every query filters by the caller's visibility (catalog.visibility)."""

from __future__ import annotations

import time
import uuid

import psycopg

from registry_api.catalog.visibility import VISIBLE

MODEL_COLUMNS = """m.id, m.repo_id, m.owner_id, m.visibility, m.canonical_url, m.model_name, m.author,
    m.pipeline_tag, m.license, m.parameters, m.downloads, m.likes, m.created_at, m.last_modified,
    m.languages, m.tags, m.last_update_ts, m.file_count, m.has_safetensors, m.has_bin"""

# For each rfilename, the file of the newest version (an unversioned file counts as the oldest).
CURRENT_FILES = """
    select distinct on (f.rfilename) f.rfilename, f.size, f.sha256, f.object_key, f.updated_ts, v.version
    from files f left join versions v on v.id = f.version_id
    where f.model_id = %(model_id)s
    order by f.rfilename, coalesce(f.version_id, 0) desc
"""


# When the caller's access to model `m` ends (the end of the grant that allows it; null: no end). With VISIBLE's
# parameters; callers that cache an answer about `m` keep it no longer than this.
ACCESS_UNTIL = """case when %(see_all)s or m.visibility = 'public' or m.owner_id = %(uid)s then null
    else (select max(coalesce(g.permitted_until_ts, 4102444800)) from grants g
        where g.model_id = m.id and g.platform_user_id = %(uid)s and g.revoked_ts is null
          and g.permitted_from_ts <= %(now)s
          and (g.permitted_until_ts is null or g.permitted_until_ts > %(now)s)) end"""


async def list_models(
    conn: psycopg.AsyncConnection,
    vis: dict,
    q: str | None,
    updated_since: int | None,
    limit: int,
    offset: int,
    namespace: str | None = None,
) -> list[dict]:
    """Visible models matching `q` (substring of repo_id, model_name or author), newest change first;
    only those of `namespace` (the part of repo_id before '/') if given."""
    params = {**vis, "q": None, "since": updated_since, "limit": limit, "offset": offset, "ns": namespace}
    where = [VISIBLE]
    if q:
        params["q"] = "%" + q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        where.append("(m.repo_id ilike %(q)s or m.model_name ilike %(q)s or m.author ilike %(q)s)")
    if updated_since is not None:
        where.append("m.last_update_ts > %(since)s")
    if namespace is not None:
        where.append("split_part(m.repo_id, '/', 1) = %(ns)s")
    sql = (
        f"select {MODEL_COLUMNS} from models m where {' and '.join(where)}"
        " order by m.last_update_ts desc, m.id desc limit %(limit)s offset %(offset)s"
    )
    cur = await conn.execute(sql, params)
    return await cur.fetchall()


async def get_model(conn: psycopg.AsyncConnection, vis: dict, repo_id: str) -> dict | None:
    """One visible model, or None; with `access_until` (see ACCESS_UNTIL). `repo_id` in any case
    (models_repo_id_lower); the row has its own spelling."""
    cur = await conn.execute(
        f"select {MODEL_COLUMNS}, {ACCESS_UNTIL} as access_until from models m"
        f" where lower(m.repo_id) = lower(%(repo_id)s) and {VISIBLE}",
        {**vis, "repo_id": repo_id},
    )
    return await cur.fetchone()


async def current_files(conn: psycopg.AsyncConnection, model_id: int) -> list[dict]:
    """The model's current files, by name."""
    cur = await conn.execute(CURRENT_FILES, {"model_id": model_id})
    return await cur.fetchall()


async def find_download(
    conn: psycopg.AsyncConnection, vis: dict, repo_id: str, rfilename: str, version: str | None
) -> dict | None:
    """The file to download (of `version` if given, else of the newest version that has it), with
    `access_until`: when the caller's access ends (the end of the grant that allows it; null: no end).
    `repo_id` in any case; the row has the model's own spelling."""
    cur = await conn.execute(
        "select m.repo_id, f.rfilename, f.size, f.sha256, f.object_key, v.version,"
        f" {ACCESS_UNTIL} as access_until"
        " from models m join files f on f.model_id = m.id left join versions v on v.id = f.version_id"
        " where lower(m.repo_id) = lower(%(repo_id)s) and f.rfilename = %(rfilename)s"
        " and (%(version)s::text is null or v.version = %(version)s)"
        f" and {VISIBLE} order by coalesce(f.version_id, 0) desc limit 1",
        {**vis, "repo_id": repo_id, "rfilename": rfilename, "version": version},
    )
    return await cur.fetchone()


async def changes(conn: psycopg.AsyncConnection, vis: dict, since: int, limit: int) -> list[dict]:
    """Visible models with last_update_ts > since, oldest first."""
    cur = await conn.execute(
        f"select m.repo_id, m.last_update_ts from models m where m.last_update_ts > %(since)s and {VISIBLE}"
        " order by m.last_update_ts, m.id limit %(limit)s",
        {**vis, "since": since, "limit": limit},
    )
    return await cur.fetchall()


# ---------------------------------------------------------------- verdicts and download counts (catalog.service)
async def first_time(conn: psycopg.AsyncConnection, event_id: uuid.UUID) -> bool:
    """Record that an event is being applied; False if it was applied before (consumed_events)."""
    cur = await conn.execute("insert into consumed_events (event_id) values (%s) on conflict do nothing", [event_id])
    return cur.rowcount == 1


async def lock_upload(conn: psycopg.AsyncConnection, upload_id: int) -> dict | None:
    """An upload and what it declared, locked until the end of the transaction."""
    cur = await conn.execute(
        "select id, model_id, version_id, rfilename, object_key, declared_size, declared_sha256, status"
        " from uploads where id = %s for update",
        [upload_id],
    )
    return await cur.fetchone()


async def make_available(conn: psycopg.AsyncConnection, upload: dict, verified: dict, now: int) -> None:
    """Mark a verified upload available and publish its file (the current file of its name and version)."""
    await conn.execute("update uploads set status = 'available', verdict_ts = %s where id = %s", [now, upload["id"]])
    await conn.execute(
        "insert into files (model_id, version_id, rfilename, size, sha256, object_key, file_format, is_pickle, updated_ts)"
        " values (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
        " on conflict (model_id, version_id, rfilename) do update set size = excluded.size, sha256 = excluded.sha256,"
        " object_key = excluded.object_key, file_format = excluded.file_format, is_pickle = excluded.is_pickle,"
        " updated_ts = excluded.updated_ts",
        [
            upload["model_id"],
            upload["version_id"],
            upload["rfilename"],
            verified["size"],
            verified["sha256"],
            verified["object_key"],
            verified["file_format"],
            verified["is_pickle"],
            now,
        ],
    )


async def reject_upload(
    conn: psycopg.AsyncConnection, upload_id: int, status: str, reason: str, detail: str, quarantine_key: str | None
) -> bool:
    """Record a verdict refusing an upload still waiting for one; False if it was not waiting."""
    cur = await conn.execute(
        "update uploads set status = %s, reason = %s, detail = %s, quarantine_key = %s, verdict_ts = %s"
        " where id = %s and status in ('initiated', 'pending_verification')",
        [status, reason, detail, quarantine_key, int(time.time()), upload_id],
    )
    return cur.rowcount == 1


async def upload_exists(conn: psycopg.AsyncConnection, upload_id: int) -> bool:
    cur = await conn.execute("select 1 from uploads where id = %s", [upload_id])
    return await cur.fetchone() is not None


async def current_file_names(conn: psycopg.AsyncConnection, model_id: int) -> list[str]:
    cur = await conn.execute(CURRENT_FILES, {"model_id": model_id})
    return [r["rfilename"] for r in await cur.fetchall()]


async def set_model_files(
    conn: psycopg.AsyncConnection, model_id: int, count: int, has_safetensors: bool, has_bin: bool
) -> None:
    """Store a model's file summary and bump last_modified / last_update_ts."""
    await conn.execute(
        "update models set file_count = %s, has_safetensors = %s, has_bin = %s, last_modified = now(),"
        " last_update_ts = greatest(last_update_ts, extract(epoch from now())::bigint) where id = %s",
        [count, has_safetensors, has_bin, model_id],
    )


async def notify_model_changed(conn: psycopg.AsyncConnection, model_id: int, channel: str) -> None:
    """Tell the api processes (LISTEN `channel`) that a model's catalog entry changed, at commit."""
    await conn.execute("select pg_notify(%s, m.repo_id) from models m where m.id = %s", [channel, model_id])


async def existing_repo_ids(conn: psycopg.AsyncConnection, repo_ids: list[str]) -> set[str]:
    """Which of these repo_ids are models."""
    cur = await conn.execute("select repo_id from models where repo_id = any(%s)", [repo_ids])
    return {r["repo_id"] for r in await cur.fetchall()}


async def add_downloads(conn: psycopg.AsyncConnection, repo_id: str, n: int) -> bool:
    """Add `n` to a model's downloads counter; False if there is no such model."""
    cur = await conn.execute("update models set downloads = downloads + %s where repo_id = %s", [n, repo_id])
    return cur.rowcount == 1


async def stored_offsets(conn: psycopg.AsyncConnection, group_id: str, topic: str) -> dict[int, int]:
    """The next offset to read of each partition of `topic`, as a consumer group stored it beside its counts."""
    cur = await conn.execute(
        "select partition, next_offset from consumer_offsets where group_id = %s and topic = %s", [group_id, topic]
    )
    return {r["partition"]: r["next_offset"] for r in await cur.fetchall()}


async def advance_offset(
    conn: psycopg.AsyncConnection, group_id: str, topic: str, partition: int, expected: int | None, next_offset: int
) -> bool:
    """Store `next_offset` for a partition if the stored one is still `expected` (None: none stored yet);
    False if another consumer of the group moved it meanwhile (nothing is changed then)."""
    if expected is None:
        cur = await conn.execute(
            "insert into consumer_offsets (group_id, topic, partition, next_offset) values (%s, %s, %s, %s)"
            " on conflict (group_id, topic, partition) do nothing",
            [group_id, topic, partition, next_offset],
        )
    else:
        cur = await conn.execute(
            "update consumer_offsets set next_offset = %s"
            " where group_id = %s and topic = %s and partition = %s and next_offset = %s",
            [next_offset, group_id, topic, partition, expected],
        )
    return cur.rowcount == 1


# What is granted to a platform user and in force at `now`: one row per (model, version, file).
GRANTED_FILES = """
with granted as (
    select g.model_id, min(g.permitted_from_ts) as permitted_from_ts,
           case when bool_or(g.permitted_until_ts is null) then null else max(g.permitted_until_ts) end
             as permitted_until_ts
    from grants g
    where g.platform_user_id = %(uid)s and g.revoked_ts is null and g.permitted_from_ts <= %(now)s
      and (g.permitted_until_ts is null or g.permitted_until_ts > %(now)s)
    group by g.model_id
)
select m.repo_id, m.model_name, m.author, m.pipeline_tag, m.license, m.last_update_ts,
       gr.permitted_from_ts, gr.permitted_until_ts,
       v.version, v.created_ts as version_created_ts,
       f.rfilename, f.size, f.sha256, f.object_key
from granted gr
join models m on m.id = gr.model_id
left join versions v on v.model_id = m.id
left join files f on f.version_id = v.id
order by m.repo_id, v.id, f.rfilename
"""


async def granted_files(conn: psycopg.AsyncConnection, platform_user_id: int, now: int) -> list[dict]:
    """Every model granted to `platform_user_id` and in force at `now`, with its grant window, versions and
    files: one row per file (version and file columns null for a model without them), by repo_id, version."""
    cur = await conn.execute(GRANTED_FILES, {"uid": platform_user_id, "now": now})
    return await cur.fetchall()
