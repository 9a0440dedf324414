"""The audit log: who did what to which target, written in the transaction of the change itself.

Service functions call `record(conn, action, target_type, target_id, ...)` once, inside their transaction:
the row and its `registry.audit.recorded.v1` event (for SIEMs, through the outbox) commit with the change
or not at all. Who and from where come from the request's context: the caller (`set_actor`, called by
auth when a key or the admin token is accepted), the client IP (`AuditContext`, an ASGI middleware) and
the request id (kit.request_id). Outside a request (the verdict consumer) the actor is `system`.

The table is append-only (migration 0009): a trigger refuses UPDATE, DELETE and TRUNCATE to every role,
the api's own included.
"""

from __future__ import annotations

import contextvars
import json
import time
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg.types.json import Jsonb
from starlette.types import ASGIApp, Receive, Scope, Send

from registry_api.audit import repository
from registry_api.kit.outbox import write_event
from registry_shared.events import AuditRecorded
from registry_shared.logging import correlation_id

if TYPE_CHECKING:
    from registry_api.auth import Principal

_actor: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("audit_actor", default=None)
_client_ip: contextvars.ContextVar[str | None] = contextvars.ContextVar("audit_client_ip", default=None)
_in_request: contextvars.ContextVar[bool] = contextvars.ContextVar("audit_in_request", default=False)

#: Fields never copied into the log (secrets and their seals).
_HIDDEN = frozenset({"secret", "secret_sealed", "key_hash", "api_key"})


def set_actor(principal: Principal) -> None:
    """The caller of this request (auth calls it when it accepts a key or the admin token)."""
    _actor.set(principal)


def is_admin_token_call() -> bool:
    """True when this request was made with the admin token."""
    actor = _actor.get()
    return actor is not None and actor.via_admin_token


class AuditContext:
    """Pure ASGI middleware: the client IP of each request (the TCP peer) for its audit rows."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        tokens = (
            _client_ip.set(client[0] if client else None),
            _actor.set(None),
            _in_request.set(True),
        )
        try:
            await self.app(scope, receive, send)
        finally:
            _in_request.reset(tokens[2])
            _actor.reset(tokens[1])
            _client_ip.reset(tokens[0])


def _clean(value: dict | None) -> dict | None:
    if value is None:
        return None
    kept = {k: v for k, v in value.items() if k not in _HIDDEN and not isinstance(v, bytes | memoryview)}
    return json.loads(json.dumps(kept, default=str))  # plain JSON (times and decimals as text)


def _actor_fields() -> tuple[str, int | None]:
    actor = _actor.get()
    if actor is None:
        return ("anonymous", None) if _in_request.get() else ("system", None)
    if actor.via_admin_token:
        return "admin-token", None
    return "user", actor.user_id


async def record(
    conn: psycopg.AsyncConnection,
    action: str,
    target_type: str,
    target_id: object,
    *,
    repo_id: str | None = None,
    before: dict[str, Any] | None = None,
    after: dict[str, Any] | None = None,
) -> None:
    """Append one audit row and its event, in the caller's transaction."""
    kind, user_id = _actor_fields()
    rid = correlation_id.get()  # the request id (in the verdict consumer: what it logs with)
    before, after = _clean(before), _clean(after)
    row = {
        "ts": time.time(),
        "actor_kind": kind,
        "actor_user_id": user_id,
        "action": action,
        "target_type": target_type,
        "target_id": None if target_id is None else str(target_id),
        "repo_id": repo_id,
        "request_id": rid or None,
        "client_ip": _client_ip.get(),
    }
    audit_id = await repository.insert(conn, {**row, "before": Jsonb(before), "after": Jsonb(after)})
    await write_event(conn, AuditRecorded(audit_id=audit_id, **row, before=before, after=after))
