"""SQL of webhook subscriptions and their delivery log (tables of migration 0002)."""

from __future__ import annotations

import psycopg
from psycopg_pool import AsyncConnectionPool

from registry_api.catalog.visibility import VISIBLE
from registry_shared.secretbox import SecretBox

_WEBHOOK = """id, url, description, event_types, repo_id, enabled, consecutive_failures, disabled_reason,
    disabled_ts, created_ts, updated_ts"""

_DELIVERY = """id, webhook_id, event_id::text as event_id, event_type, message_id, status, attempts,
    case when status in ('pending', 'sending') then extract(epoch from next_attempt_at)::float8 end as next_attempt_ts,
    last_status_code, last_latency_ms, last_error, extract(epoch from delivered_at)::float8 as delivered_ts,
    extract(epoch from created_at)::float8 as created_ts"""


async def visible_spelling(conn: psycopg.AsyncConnection, vis: dict, repo_id: str) -> str | None:
    """The stored spelling of `repo_id` (any case) if the caller may see that model, else None."""
    cur = await conn.execute(
        f"select m.repo_id from models m where lower(m.repo_id) = lower(%(repo_id)s) and {VISIBLE}",
        {**vis, "repo_id": repo_id},
    )
    row = await cur.fetchone()
    return row["repo_id"] if row else None


async def count_of(conn: psycopg.AsyncConnection, owner_id: int) -> int:
    """How many subscriptions `owner_id` has."""
    cur = await conn.execute("select count(*) as n from webhooks where owner_id = %s", [owner_id])
    return (await cur.fetchone())["n"]


async def insert_webhook(
    conn: psycopg.AsyncConnection,
    owner_id: int,
    url: str,
    description: str,
    event_types: list[str],
    repo_id: str | None,
    secret: str,
    enabled: bool,
) -> dict:
    """Create a subscription; returns its row (without the secret)."""
    cur = await conn.execute(
        "insert into webhooks (owner_id, url, description, event_types, repo_id, secret, enabled)"
        f" values (%s, %s, %s, %s, %s, %s, %s) returning {_WEBHOOK}",
        [owner_id, url, description, event_types, repo_id, secret, enabled],
    )
    return await cur.fetchone()


async def list_webhooks(conn: psycopg.AsyncConnection, owner_id: int) -> list[dict]:
    """Every subscription of `owner_id`, oldest first."""
    cur = await conn.execute(f"select {_WEBHOOK} from webhooks where owner_id = %s order by id", [owner_id])
    return await cur.fetchall()


async def get_webhook(
    conn: psycopg.AsyncConnection, owner_id: int, webhook_id: int, for_update: bool = False
) -> dict | None:
    """One subscription of `owner_id` (None if it does not exist or belongs to someone else)."""
    lock = " for update" if for_update else ""
    cur = await conn.execute(
        f"select {_WEBHOOK} from webhooks where id = %s and owner_id = %s{lock}", [webhook_id, owner_id]
    )
    return await cur.fetchone()


async def update_webhook(conn: psycopg.AsyncConnection, webhook_id: int, changes: dict) -> dict:
    """Apply `changes` (column → value, columns from a fixed set); enabling resets the failure state."""
    allowed = ("url", "description", "event_types", "repo_id", "enabled")
    sets = [f"{col} = %({col})s" for col in allowed if col in changes]
    if changes.get("enabled") is True:
        sets += ["consecutive_failures = 0", "disabled_reason = null", "disabled_ts = null"]
    sets.append("updated_ts = extract(epoch from now())::bigint")
    cur = await conn.execute(
        f"update webhooks set {', '.join(sets)} where id = %(id)s returning {_WEBHOOK}",
        {**{c: changes[c] for c in allowed if c in changes}, "id": webhook_id},
    )
    return await cur.fetchone()


async def delete_webhook(conn: psycopg.AsyncConnection, owner_id: int, webhook_id: int) -> bool:
    """Delete a subscription of `owner_id` and its deliveries; False if there was none."""
    cur = await conn.execute("delete from webhooks where id = %s and owner_id = %s", [webhook_id, owner_id])
    return cur.rowcount == 1


async def list_deliveries(
    conn: psycopg.AsyncConnection, webhook_id: int, status: str | None, limit: int, offset: int
) -> list[dict]:
    """The delivery log of a subscription, newest first."""
    cur = await conn.execute(
        f"select {_DELIVERY} from webhook_deliveries where webhook_id = %(wid)s"
        " and (%(status)s::text is null or status = %(status)s)"
        " order by id desc limit %(limit)s offset %(offset)s",
        {"wid": webhook_id, "status": status, "limit": limit, "offset": offset},
    )
    return await cur.fetchall()


async def get_delivery(
    conn: psycopg.AsyncConnection, webhook_id: int, delivery_id: int, for_update: bool = False
) -> dict | None:
    """One delivery of a subscription."""
    lock = " for update" if for_update else ""
    cur = await conn.execute(
        f"select {_DELIVERY} from webhook_deliveries where id = %s and webhook_id = %s{lock}",
        [delivery_id, webhook_id],
    )
    return await cur.fetchone()


async def attempts_of(conn: psycopg.AsyncConnection, delivery_id: int) -> list[dict]:
    """Every attempt of a delivery, in order."""
    cur = await conn.execute(
        "select attempt, status_code, latency_ms, error, extract(epoch from attempted_at)::float8 as attempted_ts"
        " from webhook_attempts where delivery_id = %s order by attempt, id",
        [delivery_id],
    )
    return await cur.fetchall()


async def schedule_redelivery(conn: psycopg.AsyncConnection, delivery_id: int) -> None:
    """Make a finished delivery due again now, with the same message id (the notifier sends it)."""
    await conn.execute(
        "update webhook_deliveries set status = 'pending', next_attempt_at = now(), lease_until = null where id = %s",
        [delivery_id],
    )


async def seal_clear_secrets(pool: AsyncConnectionPool, box: SecretBox) -> int:
    """Seal in place the signing secrets an older version stored in clear; returns how many."""
    async with pool.connection() as conn, conn.transaction():
        cur = await conn.execute("select id, secret from webhooks where secret not like 'enc:v1:%' for update")
        rows = await cur.fetchall()
        for row in rows:
            await conn.execute("update webhooks set secret = %s where id = %s", [box.seal(row["secret"]), row["id"]])
    return len(rows)
