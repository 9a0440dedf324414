"""HTTP: /v1/admin/audit — the audit log, filtered and paged (x-admin-token)."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, Query, Request

from registry_api.audit import repository
from registry_api.audit.schemas import AuditEntry, AuditList
from registry_api.auth import Admin
from registry_api.errors import Unprocessable
from registry_api.kit.schemas import BIGINT_MAX, EPOCH_MAX, errors

router = APIRouter(prefix="/v1/admin", tags=["Admin"])

ACTIONS = (
    "user.register, user.create, user.rotate_key, user.reissue_key, grant.create, grant.update, grant.revoke, "
    "model.create, model.update, version.create, upload.complete, upload.verdict, webhook.create, "
    "webhook.update, webhook.delete"
)
_ACTOR = re.compile(r"^(admin-token|anonymous|system|[1-9][0-9]{0,18})$")


def _actor(actor: str | None) -> tuple[str | None, int | None]:
    if actor is None:
        return None, None
    if not _ACTOR.match(actor):
        raise Unprocessable("actor must be a user id, admin-token, anonymous or system")
    if actor[0].isdigit():
        if int(actor) > BIGINT_MAX:
            raise Unprocessable("actor must be a user id, admin-token, anonymous or system")
        return "user", int(actor)
    return actor, None


@router.get(
    "/audit",
    response_model=AuditList,
    summary="The audit log",
    description="Every state-changing action, newest first: who (`actor_kind`, `actor_user_id`), what "
    f"(`action`: {ACTIONS}), the target, before/after, request id, client IP and time. Rows are written in "
    "the transaction of the change and can never be changed or deleted. Filters combine; page with "
    "`cursor` = the previous page's `next_cursor`. Each row is also published on Kafka "
    "(`registry.audit.recorded.v1` on `registry.audit.v1`).",
    responses=errors(401, 422, 503),
)
async def list_audit(
    request: Request,
    _: Admin,
    actor: Annotated[
        str | None, Query(max_length=20, description="A user id, `admin-token`, `anonymous` or `system`")
    ] = None,
    action: Annotated[str | None, Query(max_length=64, description="e.g. `grant.create`")] = None,
    repo_id: Annotated[str | None, Query(max_length=193, description="Target model (any case)")] = None,
    since: Annotated[float | None, Query(ge=0, le=EPOCH_MAX, description="From this time (epoch s)")] = None,
    until: Annotated[float | None, Query(ge=0, le=EPOCH_MAX, description="Before this time (epoch s)")] = None,
    cursor: Annotated[str | None, Query(max_length=20, pattern=r"^[1-9][0-9]{0,18}$")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> AuditList:
    actor_kind, actor_user_id = _actor(actor)
    before_id = None if cursor is None else min(int(cursor), BIGINT_MAX)
    async with request.app.state.pool.connection() as conn:
        rows = await repository.search(
            conn,
            actor_kind=actor_kind,
            actor_user_id=actor_user_id,
            action=action,
            repo_id=repo_id,
            since=since,
            until=until,
            before_id=before_id,
            limit=limit,
        )
    next_cursor = str(rows[-1]["audit_id"]) if len(rows) == limit else None
    return AuditList(items=[AuditEntry(**r) for r in rows], next_cursor=next_cursor)
