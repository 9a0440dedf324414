"""SQL of catalog reads. Every query filters by the caller's visibility (catalog.visibility)."""

from __future__ import annotations

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


async def list_models(
    conn: psycopg.AsyncConnection,
    vis: dict,
    q: str | None,
    updated_since: int | None,
    limit: int,
    offset: int,
) -> list[dict]:
    """Visible models matching `q` (substring of repo_id, model_name or author), newest change first."""
    params = {**vis, "q": None, "since": updated_since, "limit": limit, "offset": offset}
    where = [VISIBLE]
    if q:
        params["q"] = "%" + q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        where.append("(m.repo_id ilike %(q)s or m.model_name ilike %(q)s or m.author ilike %(q)s)")
    if updated_since is not None:
        where.append("m.last_update_ts > %(since)s")
    sql = (
        f"select {MODEL_COLUMNS} from models m where {' and '.join(where)}"
        " order by m.last_update_ts desc, m.id desc limit %(limit)s offset %(offset)s"
    )
    cur = await conn.execute(sql, params)
    return await cur.fetchall()


async def get_model(conn: psycopg.AsyncConnection, vis: dict, repo_id: str) -> dict | None:
    """One visible model, or None. `repo_id` in any case (models_repo_id_lower); the row has its own spelling."""
    cur = await conn.execute(
        f"select {MODEL_COLUMNS} from models m where lower(m.repo_id) = lower(%(repo_id)s) and {VISIBLE}",
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
        " case when %(see_all)s or m.visibility = 'public' or m.owner_id = %(uid)s then null"
        "  else (select max(coalesce(g.permitted_until_ts, 4102444800)) from grants g"
        "        where g.model_id = m.id and g.platform_user_id = %(uid)s and g.revoked_ts is null"
        "          and g.permitted_from_ts <= %(now)s"
        "          and (g.permitted_until_ts is null or g.permitted_until_ts > %(now)s)) end as access_until"
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
