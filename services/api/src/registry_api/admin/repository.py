"""SQL of users and grants as admins manage them."""

from __future__ import annotations

import time

import psycopg

GRANT_COLUMNS = """g.id as grant_id, g.platform_user_id, m.repo_id, g.permitted_from_ts, g.permitted_until_ts,
    g.revoked_ts, g.created_ts, g.updated_ts, g.model_id,
    (g.revoked_ts is null and g.permitted_from_ts <= %(now)s
     and (g.permitted_until_ts is null or g.permitted_until_ts > %(now)s)) as active"""


async def list_users(
    conn: psycopg.AsyncConnection, role: str | None, email: str | None, limit: int, offset: int
) -> list[dict]:
    cur = await conn.execute(
        "select id as user_id, email, name, role, created_ts from users"
        " where (%(role)s::text is null or role = %(role)s) and (%(email)s::text is null or lower(email) = lower(%(email)s))"
        " order by id limit %(limit)s offset %(offset)s",
        {"role": role, "email": email, "limit": limit, "offset": offset},
    )
    return await cur.fetchall()


async def user_role(conn: psycopg.AsyncConnection, user_id: int) -> str | None:
    cur = await conn.execute("select role from users where id = %s", [user_id])
    row = await cur.fetchone()
    return row["role"] if row else None


async def model_id(conn: psycopg.AsyncConnection, repo_id: str) -> int | None:
    """The id of the model `repo_id` (in any case)."""
    cur = await conn.execute("select id from models where lower(repo_id) = lower(%s)", [repo_id])
    row = await cur.fetchone()
    return row["id"] if row else None


async def upsert_grant(
    conn: psycopg.AsyncConnection, user_id: int, model: int, from_ts: int, until_ts: int | None
) -> tuple[int, str]:
    """The one unrevoked grant of (user, model) with this window: created, or updated in place.

    Returns (grant id, "created" | "updated" | "unchanged"). The unique index grants_one_unrevoked makes
    concurrent calls for one pair meet on one row (ON CONFLICT waits for the other transaction).
    """
    cur = await conn.execute(
        "insert into grants (platform_user_id, model_id, permitted_from_ts, permitted_until_ts)"
        " values (%(uid)s, %(model)s, %(from)s, %(until)s)"
        " on conflict (platform_user_id, model_id) where revoked_ts is null do update"
        " set permitted_from_ts = excluded.permitted_from_ts, permitted_until_ts = excluded.permitted_until_ts,"
        "     updated_ts = extract(epoch from now())::bigint"
        " where (grants.permitted_from_ts, grants.permitted_until_ts)"
        "       is distinct from (excluded.permitted_from_ts, excluded.permitted_until_ts)"
        " returning id, xmax = 0 as created",
        {"uid": user_id, "model": model, "from": from_ts, "until": until_ts},
    )
    row = await cur.fetchone()
    if row is not None:
        return row["id"], "created" if row["created"] else "updated"
    # Same window as the grant in force: ON CONFLICT locked it without changing it.
    cur = await conn.execute(
        "select id from grants where platform_user_id = %s and model_id = %s and revoked_ts is null", [user_id, model]
    )
    return (await cur.fetchone())["id"], "unchanged"


async def active_grant(conn: psycopg.AsyncConnection, user_id: int, model: int) -> dict | None:
    """The unrevoked grant of (user, model), if any (the audit log's `before`)."""
    cur = await conn.execute(
        f"select {GRANT_COLUMNS} from grants g join models m on m.id = g.model_id"
        " where g.platform_user_id = %(uid)s and g.model_id = %(model)s and g.revoked_ts is null",
        {"uid": user_id, "model": model, "now": int(time.time())},
    )
    return await cur.fetchone()


async def get_grant(conn: psycopg.AsyncConnection, grant_id: int, for_update: bool = False) -> dict | None:
    lock = " for update of g" if for_update else ""
    cur = await conn.execute(
        f"select {GRANT_COLUMNS} from grants g join models m on m.id = g.model_id where g.id = %(id)s{lock}",
        {"id": grant_id, "now": int(time.time())},
    )
    return await cur.fetchone()


async def list_grants(
    conn: psycopg.AsyncConnection,
    platform_user_id: int | None,
    repo_id: str | None,
    active: bool | None,
    limit: int,
    offset: int,
) -> list[dict]:
    cur = await conn.execute(
        f"select * from (select {GRANT_COLUMNS} from grants g join models m on m.id = g.model_id"
        " where (%(uid)s::bigint is null or g.platform_user_id = %(uid)s)"
        " and (%(repo)s::text is null or lower(m.repo_id) = lower(%(repo)s))) x"
        " where (%(active)s::boolean is null or x.active = %(active)s)"
        " order by grant_id limit %(limit)s offset %(offset)s",
        {
            "uid": platform_user_id,
            "repo": repo_id,
            "active": active,
            "limit": limit,
            "offset": offset,
            "now": int(time.time()),
        },
    )
    return await cur.fetchall()


async def update_grant(conn: psycopg.AsyncConnection, grant_id: int, from_ts: int, until_ts: int | None) -> None:
    await conn.execute(
        "update grants set permitted_from_ts = %s, permitted_until_ts = %s, updated_ts = extract(epoch from now())::bigint"
        " where id = %s",
        [from_ts, until_ts, grant_id],
    )


async def revoke_grant(conn: psycopg.AsyncConnection, grant_id: int) -> None:
    await conn.execute(
        "update grants set revoked_ts = extract(epoch from now())::bigint, updated_ts = extract(epoch from now())::bigint"
        " where id = %s and revoked_ts is null",
        [grant_id],
    )
