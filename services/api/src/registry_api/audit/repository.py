"""SQL of the audit log (append-only: insert and read, nothing else)."""

from __future__ import annotations

import psycopg

_COLUMNS = (
    "id as audit_id, ts, actor_kind, actor_user_id, action, target_type, target_id, repo_id,"
    " before, after, request_id, client_ip"
)


async def insert(conn: psycopg.AsyncConnection, row: dict) -> int:
    """Append a row; returns its id."""
    cur = await conn.execute(
        "insert into audit_log (ts, actor_kind, actor_user_id, action, target_type, target_id, repo_id,"
        " before, after, request_id, client_ip) values (%(ts)s, %(actor_kind)s, %(actor_user_id)s, %(action)s,"
        " %(target_type)s, %(target_id)s, %(repo_id)s, %(before)s, %(after)s, %(request_id)s, %(client_ip)s)"
        " returning id",
        row,
    )
    return (await cur.fetchone())["id"]


async def search(
    conn: psycopg.AsyncConnection,
    *,
    actor_kind: str | None,
    actor_user_id: int | None,
    action: str | None,
    repo_id: str | None,
    since: float | None,
    until: float | None,
    before_id: int | None,
    limit: int,
) -> list[dict]:
    """Rows matching every filter given, newest first, with ids below `before_id` (the cursor)."""
    where, params = [], {}
    for column, value in (("actor_kind", actor_kind), ("actor_user_id", actor_user_id), ("action", action)):
        if value is not None:
            where.append(f"{column} = %({column})s")
            params[column] = value
    if repo_id is not None:
        where.append("lower(repo_id) = lower(%(repo_id)s)")
        params["repo_id"] = repo_id
    if since is not None:
        where.append("ts >= %(since)s")
        params["since"] = since
    if until is not None:
        where.append("ts < %(until)s")
        params["until"] = until
    if before_id is not None:
        where.append("id < %(before_id)s")
        params["before_id"] = before_id
    clause = f" where {' and '.join(where)}" if where else ""
    cur = await conn.execute(
        f"select {_COLUMNS} from audit_log{clause} order by id desc limit %(limit)s", {**params, "limit": limit}
    )
    return await cur.fetchall()
