"""Rules of grants: only platform users, only existing models, a sane window; every change an event."""

from __future__ import annotations

import psycopg

from registry_api.admin import repository
from registry_api.admin.schemas import GrantIn, GrantUpdate
from registry_api.audit import service as audit
from registry_api.catalog.cache import download_cache, notify_catalog_changed
from registry_api.errors import Conflict, NotFound, Unprocessable
from registry_api.kit.outbox import write_event
from registry_api.kit.validate import check_repo_id
from registry_shared.events import GrantCreated, GrantRevoked, GrantUpdated


def _event_fields(g: dict) -> dict:
    return {
        "grant_id": g["grant_id"],
        "platform_user_id": g["platform_user_id"],
        "repo_id": g["repo_id"],
        "permitted_from_ts": g["permitted_from_ts"],
        "permitted_until_ts": g["permitted_until_ts"],
    }


async def create_grant(conn: psycopg.AsyncConnection, body: GrantIn) -> dict:
    """Grant a platform user a model. There is at most one unrevoked grant per (platform user, model):
    creating it again sets that grant's window in place (same grant_id, a grant.updated event)."""
    check_repo_id(body.repo_id)
    async with conn.transaction():
        role = await repository.user_role(conn, body.platform_user_id)
        if role is None:
            raise NotFound("user not found")
        if role != "platform":
            raise Unprocessable("grants are for platform users; this user is a " + role)
        model = await repository.model_id(conn, body.repo_id)
        if model is None:
            raise NotFound("model not found")
        previous = await repository.active_grant(conn, body.platform_user_id, model)
        grant_id, outcome = await repository.upsert_grant(
            conn, body.platform_user_id, model, body.permitted_from_ts, body.permitted_until_ts
        )
        grant = await repository.get_grant(conn, grant_id)
        if outcome != "unchanged":
            event = GrantCreated if outcome == "created" else GrantUpdated
            await write_event(conn, event(**_event_fields(grant)))
            await audit.record(
                conn,
                "grant.create" if outcome == "created" else "grant.update",
                "grant",
                grant_id,
                repo_id=grant["repo_id"],
                before=previous,
                after=grant,
            )
            await notify_catalog_changed(conn, grant["repo_id"])
    if outcome != "unchanged":
        download_cache.clear()
    return grant


async def get_grant(conn: psycopg.AsyncConnection, grant_id: int) -> dict:
    grant = await repository.get_grant(conn, grant_id)
    if grant is None:
        raise NotFound("grant not found")
    return grant


async def update_grant(conn: psycopg.AsyncConnection, grant_id: int, body: GrantUpdate) -> dict:
    changes = body.model_dump(exclude_unset=True)
    async with conn.transaction():
        grant = await repository.get_grant(conn, grant_id, for_update=True)
        if grant is None:
            raise NotFound("grant not found")
        if grant["revoked_ts"] is not None:
            raise Conflict("grant is revoked; create a new one")
        from_ts = changes.get("permitted_from_ts", grant["permitted_from_ts"])
        until_ts = changes.get("permitted_until_ts", grant["permitted_until_ts"])
        if until_ts is not None and until_ts <= from_ts:
            raise Unprocessable("permitted_until_ts must be after permitted_from_ts")
        await repository.update_grant(conn, grant_id, from_ts, until_ts)
        before, grant = grant, await repository.get_grant(conn, grant_id)
        await write_event(conn, GrantUpdated(**_event_fields(grant)))
        await audit.record(
            conn, "grant.update", "grant", grant_id, repo_id=grant["repo_id"], before=before, after=grant
        )
        await notify_catalog_changed(conn, grant["repo_id"])
    download_cache.clear()
    return grant


async def revoke_grant(conn: psycopg.AsyncConnection, grant_id: int) -> dict:
    async with conn.transaction():
        grant = await repository.get_grant(conn, grant_id, for_update=True)
        if grant is None:
            raise NotFound("grant not found")
        if grant["revoked_ts"] is None:
            await repository.revoke_grant(conn, grant_id)
            before, grant = grant, await repository.get_grant(conn, grant_id)
            await write_event(conn, GrantRevoked(**_event_fields(grant)))
            await audit.record(
                conn, "grant.revoke", "grant", grant_id, repo_id=grant["repo_id"], before=before, after=grant
            )
            await notify_catalog_changed(conn, grant["repo_id"])
    download_cache.clear()
    return grant
