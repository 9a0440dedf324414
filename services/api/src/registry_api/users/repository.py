"""SQL of users and API keys."""

from __future__ import annotations

import time

import psycopg

from registry_api.auth import REVOKE_CHANNEL, new_api_key
from registry_api.errors import Conflict


async def insert_user(conn: psycopg.AsyncConnection, email: str, name: str, role: str) -> int:
    """Create a user; 409 if the e-mail is taken (case-insensitive)."""
    try:
        async with conn.transaction():
            cur = await conn.execute(
                "insert into users (email, name, role) values (%s, %s, %s) returning id", [email, name, role]
            )
    except psycopg.errors.UniqueViolation as exc:
        raise Conflict("email already registered") from exc
    return (await cur.fetchone())["id"]


async def issue_key(
    conn: psycopg.AsyncConnection, user_id: int, scope: str = "full", expires_ts: int | None = None
) -> tuple[str, str]:
    """Give `user_id` a new key (optionally read-only, optionally expiring); returns (key, prefix)."""
    key, prefix, digest = new_api_key()
    await conn.execute(
        "insert into api_keys (user_id, prefix, key_hash, scope, expires_ts) values (%s, %s, %s, %s, %s)",
        [user_id, prefix, digest, scope, expires_ts],
    )
    return key, prefix


async def lock_user(conn: psycopg.AsyncConnection, user_id: int) -> bool:
    """Hold the user's row until the transaction ends: key changes of one user happen one at a time.
    False if there is no such user."""
    cur = await conn.execute("select id from users where id = %s for update", [user_id])
    return await cur.fetchone() is not None


async def revoke_keys(conn: psycopg.AsyncConnection, user_id: int) -> list[str]:
    """Revoke every active key of `user_id` and tell every api process (NOTIFY at commit)."""
    cur = await conn.execute(
        "update api_keys set revoked_ts = %s where user_id = %s and revoked_ts is null returning prefix",
        [int(time.time()), user_id],
    )
    prefixes = [r["prefix"] for r in await cur.fetchall()]
    for prefix in prefixes:
        await conn.execute("select pg_notify(%s, %s)", [REVOKE_CHANNEL, prefix])
    return prefixes
