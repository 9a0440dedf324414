"""Rules of webhook subscriptions: only your own, safe targets, a secret shown once."""

from __future__ import annotations

import base64
import secrets

import psycopg

from registry_api.audit import service as audit
from registry_api.auth import Principal
from registry_api.catalog.visibility import visibility_params
from registry_api.errors import Conflict, NotFound, Unavailable, Unprocessable
from registry_api.webhooks import repository
from registry_api.webhooks.schemas import WebhookIn, WebhookUpdate
from registry_api.webhooks.targets import TargetRefused, check_target
from registry_shared.secretbox import SecretBox

MAX_WEBHOOKS_PER_USER = 50


def new_secret() -> str:
    """A Standard Webhooks signing secret: `whsec_` + base64 of 32 random bytes."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


async def check_url(url: str) -> None:
    """422 unless `url` is an http(s) URL whose every address is public or allowlisted."""
    try:
        await check_target(url)
    except TargetRefused as exc:
        raise Unprocessable(f"webhook url refused: {exc}") from exc


async def _canonical_repo_id(conn: psycopg.AsyncConnection, principal: Principal, repo_id: str | None) -> str | None:
    """Repo ids are case-insensitive: a filter naming a model the caller may see takes the model's spelling
    (events carry it). A model the caller may not see (or that does not exist yet) is kept as given."""
    if repo_id is None:
        return None
    return await repository.visible_spelling(conn, visibility_params(principal), repo_id) or repo_id


async def create_webhook(
    conn: psycopg.AsyncConnection, principal: Principal, body: WebhookIn, box: SecretBox | None
) -> dict:
    """Create a subscription for the caller; returns its row plus the secret (shown once). The secret is
    stored sealed with `box` (WEBHOOK_SECRET_KEY); without a key no webhook is created (503)."""
    if box is None:
        raise Unavailable("webhook secret key not configured")
    await check_url(body.url)
    secret = new_secret()
    async with conn.transaction():
        repo_id = await _canonical_repo_id(conn, principal, body.repo_id)
        if await repository.count_of(conn, principal.user_id) >= MAX_WEBHOOKS_PER_USER:
            raise Conflict(f"at most {MAX_WEBHOOKS_PER_USER} webhooks per user")
        row = await repository.insert_webhook(
            conn,
            principal.user_id,
            body.url,
            body.description,
            list(body.event_types),
            repo_id,
            box.seal(secret),
            body.enabled,
        )
        await audit.record(conn, "webhook.create", "webhook", row["id"], repo_id=repo_id, after=row)
    return {**row, "secret": secret}


async def list_webhooks(conn: psycopg.AsyncConnection, principal: Principal) -> list[dict]:
    """The caller's subscriptions, oldest first."""
    return await repository.list_webhooks(conn, principal.user_id)


async def get_webhook(conn: psycopg.AsyncConnection, principal: Principal, webhook_id: int) -> dict:
    """The caller's subscription, or 404 (also when it belongs to someone else)."""
    row = await repository.get_webhook(conn, principal.user_id, webhook_id)
    if row is None:
        raise NotFound("webhook not found")
    return row


async def update_webhook(
    conn: psycopg.AsyncConnection, principal: Principal, webhook_id: int, body: WebhookUpdate
) -> dict:
    """Change the caller's subscription; a new URL is checked like at creation."""
    changes = body.model_dump(exclude_unset=True)
    if "url" in changes:
        await check_url(changes["url"])
    async with conn.transaction():
        before = await repository.get_webhook(conn, principal.user_id, webhook_id, for_update=True)
        if before is None:
            raise NotFound("webhook not found")
        if "repo_id" in changes:
            changes["repo_id"] = await _canonical_repo_id(conn, principal, changes["repo_id"])
        row = await repository.update_webhook(conn, webhook_id, changes)
        await audit.record(
            conn, "webhook.update", "webhook", webhook_id, repo_id=row["repo_id"], before=before, after=row
        )
        return row


async def delete_webhook(conn: psycopg.AsyncConnection, principal: Principal, webhook_id: int) -> None:
    """Delete the caller's subscription and its delivery log."""
    async with conn.transaction():
        if not await repository.delete_webhook(conn, principal.user_id, webhook_id):
            raise NotFound("webhook not found")
        await audit.record(conn, "webhook.delete", "webhook", webhook_id)


async def list_deliveries(
    conn: psycopg.AsyncConnection,
    principal: Principal,
    webhook_id: int,
    status: str | None,
    limit: int,
    offset: int,
) -> list[dict]:
    """The delivery log of the caller's subscription, newest first."""
    await get_webhook(conn, principal, webhook_id)
    return await repository.list_deliveries(conn, webhook_id, status, limit, offset)


async def get_delivery(conn: psycopg.AsyncConnection, principal: Principal, webhook_id: int, delivery_id: int) -> dict:
    """One delivery with all its attempts."""
    await get_webhook(conn, principal, webhook_id)
    row = await repository.get_delivery(conn, webhook_id, delivery_id)
    if row is None:
        raise NotFound("delivery not found")
    return {**row, "attempt_log": await repository.attempts_of(conn, delivery_id)}


async def redeliver(conn: psycopg.AsyncConnection, principal: Principal, webhook_id: int, delivery_id: int) -> dict:
    """Send a delivered or failed delivery again, with the same `webhook-id`."""
    async with conn.transaction():
        hook = await repository.get_webhook(conn, principal.user_id, webhook_id, for_update=True)
        if hook is None:
            raise NotFound("webhook not found")
        if not hook["enabled"]:
            raise Conflict("webhook is disabled; enable it first")
        row = await repository.get_delivery(conn, webhook_id, delivery_id, for_update=True)
        if row is None:
            raise NotFound("delivery not found")
        if row["status"] in ("pending", "sending"):
            raise Conflict("delivery is already scheduled")
        await repository.schedule_redelivery(conn, delivery_id)
        return await repository.get_delivery(conn, webhook_id, delivery_id)
