"""Authentication: user API keys (x-api-key) and the admin token (x-admin-token).

Keys look like `sk_live_<12-char lookup prefix><32-char secret>`. Only a SHA-256 of the whole key is
stored; the prefix finds the row and the hash is compared in constant time. Verified keys are cached
for a few seconds in this process; rotating a key evicts it here at once and, through Postgres
NOTIFY, in every other api process.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import psycopg
from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from registry_api.catalog.cache import CATALOG_CHANNEL, download_cache
from registry_api.errors import Forbidden, Unauthorized, Unavailable

log = logging.getLogger(__name__)

KEY_PREFIX = "sk_live_"
_LOOKUP_LEN = 12
_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
REVOKE_CHANNEL = "registry_key_revoked"
_CACHE_TTL = 30.0

Role = Literal["developer", "platform", "admin"]

api_key_header = APIKeyHeader(name="x-api-key", auto_error=False, description="Your user API key (sk_live_...).")
bearer_header = HTTPBearer(
    auto_error=False, description="Your user API key as a bearer token (`Authorization: Bearer sk_live_...`)."
)
admin_token_header = APIKeyHeader(
    name="x-admin-token", auto_error=False, description="The REGISTRY_ADMIN_TOKEN of this deployment."
)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: a user (by API key) or the holder of the admin token (user_id 0)."""

    user_id: int
    role: Role
    email: str = ""
    name: str = ""
    via_admin_token: bool = False

    @property
    def sees_everything(self) -> bool:
        return self.role == "admin"


ADMIN_TOKEN_PRINCIPAL = Principal(user_id=0, role="admin", email="", name="admin token", via_admin_token=True)


def new_api_key() -> tuple[str, str, bytes]:
    """A fresh key: (key, lookup prefix, sha256 of the key)."""
    body = "".join(secrets.choice(_ALPHABET) for _ in range(_LOOKUP_LEN + 32))
    key = KEY_PREFIX + body
    return key, body[:_LOOKUP_LEN], hash_key(key)


def hash_key(key: str) -> bytes:
    """What is stored for a key."""
    return hashlib.sha256(key.encode()).digest()


def lookup_prefix(key: str) -> str | None:
    """The lookup prefix of a well-formed key, else None."""
    if not key.startswith(KEY_PREFIX) or len(key) != len(KEY_PREFIX) + _LOOKUP_LEN + 32:
        return None
    return key[len(KEY_PREFIX) : len(KEY_PREFIX) + _LOOKUP_LEN]


class KeyCache:
    """prefix → (hash, principal, expiry): saves a database round trip per request."""

    def __init__(self) -> None:
        self._items: dict[str, tuple[bytes, Principal, float]] = {}

    def get(self, prefix: str) -> tuple[bytes, Principal] | None:
        item = self._items.get(prefix)
        if item is None:
            return None
        if item[2] < time.monotonic():
            self._items.pop(prefix, None)
            return None
        return item[0], item[1]

    def put(self, prefix: str, key_hash: bytes, principal: Principal) -> None:
        if len(self._items) > 100_000:
            self._items.clear()
        self._items[prefix] = (key_hash, principal, time.monotonic() + _CACHE_TTL)

    def evict(self, prefix: str) -> None:
        self._items.pop(prefix, None)

    def clear(self) -> None:
        self._items.clear()


key_cache = KeyCache()


async def listen_for_invalidations(database_url: str, stop: asyncio.Event) -> None:
    """Drop cached keys and download lookups that any api process invalidated (Postgres LISTEN).

    Reconnects until `stop` is set; on every (re)connect both caches are cleared, since anything may
    have changed while the listener was away.
    """
    while not stop.is_set():
        try:
            async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
                await conn.execute(f"listen {REVOKE_CHANNEL}")
                await conn.execute(f"listen {CATALOG_CHANNEL}")
                key_cache.clear()
                download_cache.clear()
                async for note in conn.notifies():
                    if note.channel == REVOKE_CHANNEL:
                        key_cache.evict(note.payload)
                    else:
                        download_cache.clear()
                    if stop.is_set():
                        break
        except (psycopg.Error, OSError) as exc:
            log.warning("invalidation listener reconnecting: %s", exc)
            key_cache.clear()
            download_cache.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=1.0)


async def principal_for_key(app: Any, key: str) -> Principal:
    """The user behind an api key (401 unless it is known and not rotated); cached per process."""
    prefix = lookup_prefix(key)
    if prefix is None:
        raise Unauthorized("invalid or revoked api key")
    presented = hash_key(key)
    cached = key_cache.get(prefix)
    if cached is not None:
        if hmac.compare_digest(cached[0], presented):
            return cached[1]
        raise Unauthorized("invalid or revoked api key")
    async with app.state.pool.connection() as conn:
        cur = await conn.execute(
            "select k.key_hash, u.id, u.role, u.email, u.name from api_keys k join users u on u.id = k.user_id"
            " where k.prefix = %s and k.revoked_ts is null",
            [prefix],
        )
        row = await cur.fetchone()
    if row is None or not hmac.compare_digest(bytes(row["key_hash"]), presented):
        raise Unauthorized("invalid or revoked api key")
    principal = Principal(user_id=row["id"], role=row["role"], email=row["email"], name=row["name"])
    key_cache.put(prefix, bytes(row["key_hash"]), principal)
    return principal


def check_admin_token(app: Any, token: str | None) -> Principal:
    """The admin token holder; raises unless `token` is this deployment's admin token (constant time)."""
    configured = app.state.settings.registry_admin_token
    if configured is None:
        raise Unavailable("admin token not configured")
    if token is None or not hmac.compare_digest(token.encode(), configured.get_secret_value().encode()):
        raise Unauthorized("invalid admin token")
    return ADMIN_TOKEN_PRINCIPAL


def presented_key(x_api_key: str | None, authorization: str | None) -> str | None:
    """The key a request presents: `x-api-key`, else the token of `Authorization: Bearer <key>`."""
    if x_api_key:
        return x_api_key
    if authorization:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return None


def _bearer_key(credentials: HTTPAuthorizationCredentials | None) -> str | None:
    return credentials.credentials if credentials is not None else None


async def current_user(
    request: Request,
    x_api_key: Annotated[str | None, Depends(api_key_header)],
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_header)],
) -> Principal:
    """The user behind x-api-key or a bearer token (401 if missing, unknown or rotated)."""
    key = x_api_key or _bearer_key(bearer)
    if not key:
        raise Unauthorized("missing x-api-key")
    return await principal_for_key(request.app, key)


async def catalog_reader(
    request: Request,
    x_api_key: Annotated[str | None, Depends(api_key_header)],
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_header)],
    x_admin_token: Annotated[str | None, Depends(admin_token_header)],
) -> Principal:
    """A user by x-api-key (or bearer token), or (without one) the admin token holder, who sees the whole catalog."""
    return await catalog_principal(request.app, x_api_key or _bearer_key(bearer), x_admin_token)


async def catalog_principal(app: Any, api_key: str | None, admin_token: str | None) -> Principal:
    """The rule of `catalog_reader`, for callers outside FastAPI's dependency injection (the download
    fast path): the key's user, else the admin token holder, else 401."""
    if api_key:
        return await principal_for_key(app, api_key)
    if admin_token:
        return check_admin_token(app, admin_token)
    raise Unauthorized("missing x-api-key")


async def require_admin(
    request: Request, x_admin_token: Annotated[str | None, Depends(admin_token_header)]
) -> Principal:
    """The admin endpoints' guard: x-admin-token must equal REGISTRY_ADMIN_TOKEN."""
    return check_admin_token(request.app, x_admin_token)


async def require_developer(principal: Annotated[Principal, Depends(current_user)]) -> Principal:
    """Developer endpoints are for developers (and admin-role users)."""
    if principal.role not in ("developer", "admin"):
        raise Forbidden("developer role required")
    return principal


async def require_platform(principal: Annotated[Principal, Depends(current_user)]) -> Principal:
    """Platform endpoints are for platform users."""
    if principal.role != "platform":
        raise Forbidden("platform role required")
    return principal


CurrentUser = Annotated[Principal, Depends(current_user)]
CatalogReader = Annotated[Principal, Depends(catalog_reader)]
Admin = Annotated[Principal, Depends(require_admin)]
Developer = Annotated[Principal, Depends(require_developer)]
Platform = Annotated[Principal, Depends(require_platform)]
