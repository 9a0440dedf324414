"""Rules of accounts: registration policy, key issue and rotation."""

from __future__ import annotations

import time

import psycopg

from registry_api.audit import service as audit
from registry_api.auth import Principal, key_cache
from registry_api.errors import Forbidden, NotFound, Unauthorized, Unprocessable
from registry_api.kit.outbox import write_event
from registry_api.settings import ApiSettings
from registry_api.users import repository
from registry_shared.events import UserKeyRotated, UserRegistered


def check_key_expiry(expires_ts: int | None) -> None:
    """A key's expiry must lie in the future."""
    if expires_ts is not None and expires_ts <= time.time():
        raise Unprocessable("key_expires_ts must be in the future")


def check_registration_allowed(settings: ApiSettings, email: str) -> None:
    """Apply REGISTRATION_POLICY (open, allowlist of e-mail domains, or closed)."""
    if settings.registration_policy == "closed":
        raise Forbidden("registration is closed; ask an admin for an account")
    if settings.registration_policy == "allowlist":
        domain = email.rsplit("@", 1)[-1].lower()
        if domain not in settings.allowed_domains:
            raise Forbidden("registration is not open to this e-mail domain")


async def create_user(
    conn: psycopg.AsyncConnection,
    email: str,
    name: str,
    role: str,
    key_scope: str = "full",
    key_expires_ts: int | None = None,
) -> tuple[int, str]:
    """Create a user with a first key, and its event, in one transaction; returns (user_id, key)."""
    check_key_expiry(key_expires_ts)
    async with conn.transaction():
        user_id = await repository.insert_user(conn, email, name, role)
        key, _ = await repository.issue_key(conn, user_id, key_scope, key_expires_ts)
        await write_event(conn, UserRegistered(user_id=user_id, email=email, name=name, role=role))
        action = "user.create" if audit.is_admin_token_call() else "user.register"
        after = {"email": email, "name": name, "role": role, "key_scope": key_scope, "key_expires_ts": key_expires_ts}
        await audit.record(conn, action, "user", user_id, after=after)
    return user_id, key


async def rotate_key(conn: psycopg.AsyncConnection, principal: Principal, presented_prefix: str) -> str:
    """Revoke the caller's keys and issue a new one; the old key fails from the commit on.

    The presented key (by its lookup prefix) must still be live once the user's row is locked: of several
    rotations sent at once with one key, the first revokes it and the others answer 401, so exactly one
    key works afterwards.
    """
    async with conn.transaction():
        await repository.lock_user(conn, principal.user_id)
        revoked = await repository.revoke_keys(conn, principal.user_id)
        if presented_prefix not in revoked:
            raise Unauthorized("invalid or revoked api key")  # rolls the transaction back
        # the new key keeps the old one's scope and lifetime: rotating never widens or extends a key
        key, prefix = await repository.issue_key(conn, principal.user_id, principal.key_scope, principal.key_expires_ts)
        await write_event(
            conn,
            UserKeyRotated(
                user_id=principal.user_id, email=principal.email, key_prefix=prefix, rotated_ts=int(time.time())
            ),
        )
        await audit.record(
            conn,
            "user.rotate_key",
            "user",
            principal.user_id,
            before={"key_prefixes": revoked},
            after={"key_prefix": prefix},
        )
    for p in revoked:
        key_cache.evict(p)
    return key


async def reissue_key(conn: psycopg.AsyncConnection, user_id: int, key_scope: str, key_expires_ts: int | None) -> str:
    """An admin replaces a user's keys with a new one (its scope and lifetime as given): the previous
    keys stop working at once (a leaked key, a platform moved to read-only, a key given an end)."""
    check_key_expiry(key_expires_ts)
    async with conn.transaction():
        if not await repository.lock_user(conn, user_id):
            raise NotFound("user not found")
        revoked = await repository.revoke_keys(conn, user_id)
        key, prefix = await repository.issue_key(conn, user_id, key_scope, key_expires_ts)
        cur = await conn.execute("select email from users where id = %s", [user_id])
        email = (await cur.fetchone())["email"]
        await write_event(
            conn, UserKeyRotated(user_id=user_id, email=email, key_prefix=prefix, rotated_ts=int(time.time()))
        )
        after = {"key_prefix": prefix, "key_scope": key_scope, "key_expires_ts": key_expires_ts}
        await audit.record(conn, "user.reissue_key", "user", user_id, before={"key_prefixes": revoked}, after=after)
    for p in revoked:
        key_cache.evict(p)
    return key
