"""Authentication: user API keys (x-api-key) and the admin token (x-admin-token).

Keys look like `sk_live_<12-char lookup prefix><32-char secret>`. Only a SHA-256 of the whole key is
stored; the prefix finds the row and the hash is compared in constant time. Verified keys are cached
for a few seconds in this process; rotating a key evicts it here at once and, through Postgres
NOTIFY, in every other api process (`invalidation_listener`). While that listener is down, cached keys
are trusted for kit.cache.UNTRUSTED_S only; while Postgres is down, they go on being served (nothing can
be rotated meanwhile): see kit.cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from registry_api.audit.service import set_actor
from registry_api.catalog.cache import CATALOG_CHANNEL, download_cache
from registry_api.errors import Forbidden, Unauthorized, Unavailable
from registry_api.kit.cache import InvalidatedCache
from registry_api.kit.db_monitor import DatabaseMonitor
from registry_api.kit.listen import PgListener

log = logging.getLogger(__name__)

KEY_PREFIX = "sk_live_"
_LOOKUP_LEN = 12
_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
REVOKE_CHANNEL = "registry_key_revoked"
_CACHE_TTL = 30.0

Role = Literal["developer", "platform", "admin"]
KeyScope = Literal["full", "read-only"]
#: Methods a read-only key may call; anything else changes state and answers 403.
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

# Two security schemes of their own names in OpenAPI: user operations declare ApiKey, admin operations
# AdminToken, and the catalog reads either (a list of alternatives).
api_key_header = APIKeyHeader(
    name="x-api-key", scheme_name="ApiKey", auto_error=False, description="Your user API key (sk_live_...)."
)
bearer_header = HTTPBearer(
    scheme_name="Bearer",
    auto_error=False,
    description="Your user API key as a bearer token (`Authorization: Bearer sk_live_...`).",
)
admin_token_header = APIKeyHeader(
    name="x-admin-token",
    scheme_name="AdminToken",
    auto_error=False,
    description="The REGISTRY_ADMIN_TOKEN of this deployment.",
)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: a user (by API key) or the holder of the admin token (user_id 0)."""

    user_id: int
    role: Role
    email: str = ""
    name: str = ""
    via_admin_token: bool = False
    key_scope: KeyScope = "full"
    key_expires_ts: int | None = None
    key_prefix: str = ""

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


#: prefix → (sha256 of the key, its user): saves a database round trip per request.
key_cache: InvalidatedCache[tuple[bytes, Principal]] = InvalidatedCache(ttl=_CACHE_TTL, max_items=100_000)


#: prefix → events set when this process's listener hears that key revoked (revocation_heard).
_revocation_waiters: dict[str, list[asyncio.Event]] = {}
#: How long a rotation waits to hear its own NOTIFY back before answering.
REVOCATION_ECHO_WAIT_S = 2.0


def _key_revoked(prefix: str) -> None:
    key_cache.evict(prefix)
    for event in _revocation_waiters.pop(prefix, []):
        event.set()


@contextlib.asynccontextmanager
async def revocation_heard(prefix: str) -> AsyncIterator[None]:
    """Around a transaction that revokes the key `prefix`: on leaving, wait until this process's LISTEN
    connection has received that NOTIFY back (at most REVOCATION_ECHO_WAIT_S, and only while it listens).

    Postgres signals every listening session when the transaction commits, but each delivers the
    notification on its own schedule: answering the rotation only once our own listener has it keeps
    "revoked" ahead of the client's next request to another api process, which hears it the same way."""
    event = asyncio.Event()
    _revocation_waiters.setdefault(prefix, []).append(event)
    try:
        yield
        if key_cache.listening:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), REVOCATION_ECHO_WAIT_S)
    finally:
        waiters = _revocation_waiters.get(prefix, [])
        if event in waiters:
            waiters.remove(event)
        if not waiters:
            _revocation_waiters.pop(prefix, None)


def _catalog_changed(_: str) -> None:
    download_cache.clear()


def _listener_up() -> None:
    key_cache.listener_up()
    download_cache.listener_up()


def _listener_down() -> None:
    key_cache.listener_down()
    download_cache.listener_down()


def set_outage(down: bool) -> None:
    """The database monitor says Postgres is away (True) or back (False): the caches serve stale entries
    meanwhile (kit.cache)."""
    key_cache.outage = down
    download_cache.outage = down


def invalidation_listener(database_url: str, monitor: DatabaseMonitor | None = None) -> PgListener:
    """The LISTEN loop that keeps this process's caches true: a rotated key is evicted, a catalog change
    clears the download lookups, and a (re)connection clears both."""
    return PgListener(
        database_url,
        {REVOKE_CHANNEL: _key_revoked, CATALOG_CHANNEL: _catalog_changed},
        on_connect=_listener_up,
        on_disconnect=_listener_down,
        monitor=monitor,
    )


async def principal_for_key(app: Any, key: str) -> Principal:
    """The user behind an api key (401 unless it is known and not rotated); cached per process."""
    prefix = lookup_prefix(key)
    if prefix is None:
        raise Unauthorized("invalid or revoked api key")
    presented = hash_key(key)
    cached = key_cache.get(prefix)
    if cached is not None:
        if not hmac.compare_digest(cached[0], presented):
            raise Unauthorized("invalid or revoked api key")
        return await _live(app, cached[1])
    generation = key_cache.generation
    async with app.state.pool.connection() as conn:
        cur = await conn.execute(
            "select k.key_hash, k.scope, k.expires_ts, u.id, u.role, u.email, u.name"
            " from api_keys k join users u on u.id = k.user_id where k.prefix = %s and k.revoked_ts is null",
            [prefix],
        )
        row = await cur.fetchone()
    if row is None or not hmac.compare_digest(bytes(row["key_hash"]), presented):
        raise Unauthorized("invalid or revoked api key")
    principal = Principal(
        user_id=row["id"],
        role=row["role"],
        email=row["email"],
        name=row["name"],
        key_scope=row["scope"],
        key_expires_ts=row["expires_ts"],
        key_prefix=prefix,
    )
    key_cache.put(prefix, (bytes(row["key_hash"]), principal), generation=generation)
    return await _live(app, principal)


async def _live(app: Any, principal: Principal) -> Principal:
    """A known key still inside its lifetime (401 `api key expired` after it), and within its rate limit."""
    if principal.key_expires_ts is not None and time.time() >= principal.key_expires_ts:
        raise Unauthorized("api key expired")
    set_actor(principal)
    limiter = getattr(app.state, "rate_limiter", None)
    if limiter is not None:
        await limiter.check_principal(principal)
    return principal


def check_scope(principal: Principal, method: str) -> Principal:
    """A read-only key may only read: any other method answers 403."""
    if principal.key_scope == "read-only" and method not in READ_METHODS:
        raise Forbidden("api key is read-only")
    return principal


def check_admin_token(app: Any, token: str | None) -> Principal:
    """The admin token holder; raises unless `token` is this deployment's admin token (constant time)."""
    configured = app.state.settings.registry_admin_token
    if configured is None:
        raise Unavailable("admin token not configured")
    if token is None or not hmac.compare_digest(token.encode(), configured.get_secret_value().encode()):
        raise Unauthorized("invalid admin token")
    set_actor(ADMIN_TOKEN_PRINCIPAL)
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
    return check_scope(await principal_for_key(request.app, key), request.method)


async def catalog_reader(
    request: Request,
    x_api_key: Annotated[str | None, Depends(api_key_header)],
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_header)],
    x_admin_token: Annotated[str | None, Depends(admin_token_header)],
) -> Principal:
    """A user by x-api-key (or bearer token), or (without one) the admin token holder, who sees the whole catalog."""
    return check_scope(
        await catalog_principal(request.app, x_api_key or _bearer_key(bearer), x_admin_token), request.method
    )


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
