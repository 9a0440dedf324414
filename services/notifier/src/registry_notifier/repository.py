"""SQL of the notifier: the webhook tables of the api's migration 0002, and reads of the catalog.

The api owns the schema. The notifier reads users, uploads, models and grants to decide who may
receive an event, and is the only writer of deliveries' state besides the api's redeliver call.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime

import psycopg

# ---------------------------------------------------------------- who receives what


async def enabled_webhooks(conn: psycopg.AsyncConnection) -> list[dict]:
    """Every enabled subscription (the routing of one batch of events works on this snapshot)."""
    cur = await conn.execute(
        "select id, owner_id, url, event_types, repo_id, created_at from webhooks where enabled order by id"
    )
    return await cur.fetchall()


async def upload_developers(conn: psycopg.AsyncConnection, upload_ids: Sequence[int]) -> dict[int, dict]:
    """upload id → {developer_id, email} of the developer who uploaded it."""
    if not upload_ids:
        return {}
    cur = await conn.execute(
        "select up.id, up.developer_id, u.email from uploads up join users u on u.id = up.developer_id"
        " where up.id = any(%s)",
        [list(upload_ids)],
    )
    return {r["id"]: r for r in await cur.fetchall()}


async def user_emails(conn: psycopg.AsyncConnection, user_ids: Iterable[int]) -> dict[int, str]:
    """user id → e-mail address."""
    ids = sorted(set(user_ids))
    if not ids:
        return {}
    cur = await conn.execute("select id, email from users where id = any(%s)", [ids])
    return {r["id"]: r["email"] for r in await cur.fetchall()}


async def model_audiences(conn: psycopg.AsyncConnection, repo_ids: Sequence[str], now: int) -> dict[str, dict]:
    """repo_id → {visibility, grants: [(platform user, permitted_from_ts)]} with the grants in force now."""
    if not repo_ids:
        return {}
    cur = await conn.execute(
        "select m.repo_id, m.visibility, g.platform_user_id, g.permitted_from_ts from models m"
        " left join grants g on g.model_id = m.id and g.revoked_ts is null"
        "  and (g.permitted_until_ts is null or g.permitted_until_ts > %(now)s)"
        " where m.repo_id = any(%(repos)s)",
        {"repos": sorted(set(repo_ids)), "now": now},
    )
    out: dict[str, dict] = {}
    for r in await cur.fetchall():
        model = out.setdefault(r["repo_id"], {"visibility": r["visibility"], "grants": []})
        if r["platform_user_id"] is not None:
            model["grants"].append((r["platform_user_id"], r["permitted_from_ts"]))
    return out


async def insert_deliveries(conn: psycopg.AsyncConnection, rows: list[tuple]) -> int:
    """Queue deliveries (webhook_id, event_id, event_type, order_key, message_id, payload, event_time,
    deployment); a (webhook, event) pair already queued is left alone."""
    if not rows:
        return 0
    async with conn.cursor() as cur:
        await cur.executemany(
            "insert into webhook_deliveries (webhook_id, event_id, event_type, order_key, message_id, payload,"
            " event_time, deployment) values (%s, %s, %s, %s, %s, %s, %s, %s)"
            " on conflict (webhook_id, event_id) do nothing",
            rows,
        )
    return len(rows)


async def insert_emails(conn: psycopg.AsyncConnection, rows: list[tuple]) -> None:
    """Queue e-mails (deployment, dedupe_key, kind, to_addr, subject, body), once per dedupe key."""
    if not rows:
        return
    async with conn.cursor() as cur:
        await cur.executemany(
            "insert into notifier_emails (deployment, dedupe_key, kind, to_addr, subject, body)"
            " values (%s, %s, %s, %s, %s, %s) on conflict (deployment, dedupe_key) do nothing",
            rows,
        )


# ---------------------------------------------------------------- delivering

_CLAIMED = """d.id, d.webhook_id, d.order_key, d.message_id, d.payload, d.attempts, d.event_id, d.event_type,
    w.url, w.secret"""

# Heads of line: the first undelivered delivery of every (webhook, order key). One ordered pass over the
# partial index of undelivered rows finds them; only the due heads of enabled webhooks that belong to
# this deployment (or are long overdue elsewhere) are locked and claimed.
CLAIM_HEADS = f"""
with heads as (
    select distinct on (webhook_id, order_key) id
    from webhook_deliveries
    where status in ('pending', 'sending')
    order by webhook_id, order_key, id
), due as (
    select d.id from heads h
    join webhook_deliveries d on d.id = h.id
    join webhooks w on w.id = d.webhook_id
    where w.enabled
      and (d.deployment = %(dep)s or d.next_attempt_at < now() - make_interval(secs => %(adopt)s))
      and ((d.status = 'pending' and d.next_attempt_at <= now()) or (d.status = 'sending' and d.lease_until < now()))
    order by d.next_attempt_at, d.id
    limit %(limit)s
    for update of d skip locked
)
update webhook_deliveries d
   set status = 'sending', deployment = %(dep)s,
       lease_until = now() + make_interval(secs => %(lease)s)
  from due, webhooks w
 where d.id = due.id and w.id = d.webhook_id
returning {_CLAIMED}
"""


async def claim_heads(
    conn: psycopg.AsyncConnection, deployment: str, limit: int, lease_s: float, adopt_after_s: float
) -> list[dict]:
    """Claim up to `limit` due deliveries that are first in line for their (webhook, order key)."""
    cur = await conn.execute(CLAIM_HEADS, {"dep": deployment, "limit": limit, "lease": lease_s, "adopt": adopt_after_s})
    return await cur.fetchall()


CLAIM_RUN = f"""
with line as (
    select d.id, (d.status = 'pending' and d.next_attempt_at <= now() and w.enabled) as ready
    from webhook_deliveries d join webhooks w on w.id = d.webhook_id
    where d.webhook_id = %(wid)s and d.order_key = %(key)s and d.status in ('pending', 'sending')
    order by d.id limit %(limit)s
    for update of d
), run as (
    select id from (select id, bool_and(ready) over (order by id) as go from line) x where go
)
update webhook_deliveries d
   set status = 'sending', deployment = %(dep)s, lease_until = now() + make_interval(secs => %(lease)s)
  from run, webhooks w
 where d.id = run.id and w.id = d.webhook_id
returning {_CLAIMED}
"""


async def claim_run(
    conn: psycopg.AsyncConnection, deployment: str, webhook_id: int, order_key: str, lease_s: float, limit: int
) -> list[dict]:
    """Claim, in order, the run of due deliveries at the head of a (webhook, order key), at most `limit`.

    The run stops before anything not pending or not yet due: an earlier delivery always goes first."""
    cur = await conn.execute(
        CLAIM_RUN, {"wid": webhook_id, "key": order_key, "limit": limit, "dep": deployment, "lease": lease_s}
    )
    return sorted(await cur.fetchall(), key=lambda r: r["id"])


RECORD_DELIVERED = """
with v as (
    select * from unnest(%(ids)s::bigint[], %(attempts)s::int[], %(codes)s::int[], %(ms)s::int[])
        as v(id, attempt, code, ms)
), done as (
    update webhook_deliveries d
       set status = 'delivered', delivered_at = now(), lease_until = null, attempts = v.attempt,
           last_status_code = v.code, last_latency_ms = v.ms, last_error = null
      from v where d.id = v.id
    returning d.id
), log as (
    insert into webhook_attempts (delivery_id, attempt, status_code, latency_ms)
    select id, attempt, code, ms from v
), streak as (
    update webhooks set consecutive_failures = 0 where id = %(wid)s and consecutive_failures <> 0
)
select count(*) as n from done
"""


async def record_delivered(
    conn: psycopg.AsyncConnection, webhook_id: int, done: list[tuple[int, int, int, int]]
) -> None:
    """Deliveries the receiver accepted, as (id, attempt, status code, latency ms); the failure streak ends."""
    ids, attempts, codes, latencies = (list(col) for col in zip(*done, strict=True))
    await conn.execute(
        RECORD_DELIVERED, {"ids": ids, "attempts": attempts, "codes": codes, "ms": latencies, "wid": webhook_id}
    )


# Both at once, in one round trip: the deliveries just sent are recorded and the next run of the same
# key is claimed (every part of one statement sees the same snapshot, so the rows just sent are left
# out of the line explicitly).
RECORD_AND_CLAIM = f"""
with v as (
    select * from unnest(%(ids)s::bigint[], %(attempts)s::int[], %(codes)s::int[], %(ms)s::int[])
        as v(id, attempt, code, ms)
), done as (
    update webhook_deliveries d
       set status = 'delivered', delivered_at = now(), lease_until = null, attempts = v.attempt,
           last_status_code = v.code, last_latency_ms = v.ms, last_error = null
      from v where d.id = v.id
    returning d.id
), log as (
    insert into webhook_attempts (delivery_id, attempt, status_code, latency_ms)
    select id, attempt, code, ms from v
), streak as (
    update webhooks set consecutive_failures = 0 where id = %(wid)s and consecutive_failures <> 0
), line as (
    select d.id, (d.status = 'pending' and d.next_attempt_at <= now() and w.enabled) as ready
    from webhook_deliveries d join webhooks w on w.id = d.webhook_id
    where d.webhook_id = %(wid)s and d.order_key = %(key)s and d.status in ('pending', 'sending')
      and d.id <> all(%(ids)s::bigint[])
    order by d.id limit %(limit)s
    for update of d
), run as (
    select id from (select id, bool_and(ready) over (order by id) as go from line) x where go
)
update webhook_deliveries d
   set status = 'sending', deployment = %(dep)s, lease_until = now() + make_interval(secs => %(lease)s)
  from run, webhooks w
 where d.id = run.id and w.id = d.webhook_id
returning {_CLAIMED}
"""


async def record_delivered_and_claim(
    conn: psycopg.AsyncConnection,
    deployment: str,
    webhook_id: int,
    order_key: str,
    done: list[tuple[int, int, int, int]],
    lease_s: float,
    limit: int,
) -> list[dict]:
    """record_delivered + claim_run of the same key in one statement; returns the claimed run in order."""
    ids, attempts, codes, latencies = (list(col) for col in zip(*done, strict=True))
    cur = await conn.execute(
        RECORD_AND_CLAIM,
        {
            "ids": ids,
            "attempts": attempts,
            "codes": codes,
            "ms": latencies,
            "wid": webhook_id,
            "key": order_key,
            "limit": limit,
            "dep": deployment,
            "lease": lease_s,
        },
    )
    return sorted(await cur.fetchall(), key=lambda r: r["id"])


async def record_failure(
    conn: psycopg.AsyncConnection,
    delivery_id: int,
    attempt: int,
    status_code: int | None,
    latency_ms: int | None,
    error: str,
    retry_in_s: float | None,
) -> None:
    """An attempt failed: try again in `retry_in_s` seconds, or give up (None)."""
    await conn.execute(
        "update webhook_deliveries set status = %s, attempts = %s, next_attempt_at = now() + make_interval(secs => %s),"
        " lease_until = null, last_status_code = %s, last_latency_ms = %s, last_error = %s where id = %s",
        [
            "failed" if retry_in_s is None else "pending",
            attempt,
            retry_in_s or 0.0,
            status_code,
            latency_ms,
            error,
            delivery_id,
        ],
    )
    await conn.execute(
        "insert into webhook_attempts (delivery_id, attempt, status_code, latency_ms, error) values (%s, %s, %s, %s, %s)",
        [delivery_id, attempt, status_code, latency_ms, error],
    )


async def release(conn: psycopg.AsyncConnection, ids: list[int]) -> None:
    """Hand claimed deliveries that were not attempted back to the queue."""
    await conn.execute(
        "update webhook_deliveries set status = 'pending', lease_until = null where id = any(%s) and status = 'sending'",
        [ids],
    )


async def still_visible(conn: psycopg.AsyncConnection, webhook_id: int, repo_id: str, now: int) -> bool:
    """Whether the webhook's owner may see the model now: owner, public, or a grant in force."""
    cur = await conn.execute(
        "select exists (select 1 from webhooks w join models m on m.repo_id = %(repo)s where w.id = %(wid)s"
        " and (m.owner_id = w.owner_id or m.visibility = 'public' or exists ("
        "  select 1 from grants g where g.model_id = m.id and g.platform_user_id = w.owner_id"
        "  and g.revoked_ts is null and g.permitted_from_ts <= %(now)s"
        "  and (g.permitted_until_ts is null or g.permitted_until_ts > %(now)s)))) as visible",
        {"wid": webhook_id, "repo": repo_id, "now": now},
    )
    return (await cur.fetchone())["visible"]


async def count_failure(conn: psycopg.AsyncConnection, webhook_id: int, max_failures: int, error: str) -> bool:
    """Add one to the webhook's failure streak; disable it at `max_failures`. True if it was disabled now."""
    cur = await conn.execute(
        "update webhooks set consecutive_failures = consecutive_failures + 1 where id = %s"
        " returning consecutive_failures, enabled",
        [webhook_id],
    )
    row = await cur.fetchone()
    if row is None or not row["enabled"] or row["consecutive_failures"] < max_failures:
        return False
    reason = f"{row['consecutive_failures']} consecutive failed delivery attempts; last error: {error}"[:1000]
    await conn.execute(
        "update webhooks set enabled = false, disabled_reason = %s, disabled_ts = extract(epoch from now())::bigint,"
        " updated_ts = extract(epoch from now())::bigint where id = %s",
        [reason, webhook_id],
    )
    return True


# ---------------------------------------------------------------- e-mail


async def disabled_without_email(conn: psycopg.AsyncConnection, deployment: str) -> list[dict]:
    """Webhooks disabled in the last day whose owner this deployment has not e-mailed yet."""
    cur = await conn.execute(
        "select w.id, w.url, w.disabled_reason, w.disabled_ts, u.email from webhooks w join users u on u.id = w.owner_id"
        " where w.disabled_ts is not null and not w.enabled"
        " and w.disabled_ts > extract(epoch from now())::bigint - 86400"
        " and not exists (select 1 from notifier_emails e where e.deployment = %(dep)s"
        "   and e.dedupe_key = 'webhook_disabled:' || w.id || ':' || w.disabled_ts)",
        {"dep": deployment},
    )
    return await cur.fetchall()


async def claim_emails(conn: psycopg.AsyncConnection, deployment: str, limit: int, lease_s: float) -> list[dict]:
    """Claim due e-mails of this deployment."""
    cur = await conn.execute(
        "with due as (select id from notifier_emails where deployment = %(dep)s"
        "  and ((status = 'pending' and next_attempt_at <= now()) or (status = 'sending' and lease_until < now()))"
        "  order by id limit %(limit)s for update skip locked)"
        " update notifier_emails e set status = 'sending', attempts = e.attempts + 1,"
        "  lease_until = now() + make_interval(secs => %(lease)s)"
        " from due where e.id = due.id returning e.id, e.to_addr, e.subject, e.body, e.attempts, e.kind",
        {"dep": deployment, "limit": limit, "lease": lease_s},
    )
    return await cur.fetchall()


async def email_sent(conn: psycopg.AsyncConnection, email_id: int) -> None:
    """The relay accepted the e-mail."""
    await conn.execute(
        "update notifier_emails set status = 'sent', sent_at = now(), lease_until = null, last_error = null"
        " where id = %s",
        [email_id],
    )


async def email_failed(conn: psycopg.AsyncConnection, email_id: int, error: str, retry_in_s: float | None) -> None:
    """Sending failed: retry in `retry_in_s` seconds or give up (None)."""
    await conn.execute(
        "update notifier_emails set status = %s, next_attempt_at = now() + make_interval(secs => %s),"
        " lease_until = null, last_error = %s where id = %s",
        ["failed" if retry_in_s is None else "pending", retry_in_s or 0.0, error[:1000], email_id],
    )


def message_id(webhook_id: int, event_id: str) -> str:
    """The `webhook-id` of an event's delivery to a webhook: the same for every attempt and every notifier."""
    return "msg_" + uuid.uuid5(uuid.NAMESPACE_URL, f"registry-webhook:{webhook_id}:{event_id}").hex


def delivery_row(
    webhook_id: int,
    event_id: str,
    event_type: str,
    order_key: str,
    payload: str,
    event_time: datetime,
    deployment: str,
) -> tuple:
    """A row for insert_deliveries."""
    return (
        webhook_id,
        uuid.UUID(event_id),
        event_type,
        order_key,
        message_id(webhook_id, event_id),
        payload,
        event_time,
        deployment,
    )
