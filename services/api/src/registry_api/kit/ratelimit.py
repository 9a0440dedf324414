"""Rate limits: token buckets in Postgres, shared by every api process, leased out in blocks.

Each bucket (one per user — the user's one live key — and one per client IP for self-registration) holds up
to `capacity` tokens and refills at `capacity / 60` tokens a second (RATE_LIMIT_*_PER_MINUTE). A request
takes one token; without one it answers 429 with `Retry-After` and the IETF draft's `RateLimit-*` headers.

Sharing the budget between N processes: the bucket's state is one row of the UNLOGGED table
`rate_limit_buckets`, refilled and drawn from by one atomic `INSERT … ON CONFLICT DO UPDATE … RETURNING`
on Postgres's clock (`clock_timestamp()`), so no process's clock matters. A process does not draw one token
per request: it leases a block (at most RATE_LIMIT_LEASE_MAX, and at most a quarter of what the bucket
holds, at least one) and spends it locally, so a key far from its limit costs one round trip per block,
not per request (the download hot path stays a dict lookup). Every token spent was drawn from the one
bucket, so N processes together never exceed `capacity + refill × time`; near the limit blocks shrink to
one token, so the budget is not stranded in one process's lease. A refused bucket is remembered locally
until its Retry-After, so a client hammering past its limit does not reach Postgres either.

While Postgres is away the limiter fails open (nothing to share a budget through; the api then serves only
what its caches hold, kit.db_monitor).

The admin token is exempt (one operator secret, needed most during an incident); admin-role users have
a limit of their own.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from registry_api.errors import ApiError

if TYPE_CHECKING:
    from registry_api.auth import Principal

_MAX_LOCAL = 100_000  # buckets remembered by one process; beyond it the oldest are forgotten

# One atomic statement: refill on Postgres's clock, then lease up to `n` tokens (at most a quarter of what
# the bucket holds, at least one when it holds one). `granted` is what this call took.
_LEASE = """
insert into rate_limit_buckets as b (bucket, tokens, updated, granted)
select %(bucket)s, %(cap)s - g, t, g
from (
    select extract(epoch from clock_timestamp())::float8 as t,
           least(%(n)s, greatest(1, floor(%(cap)s / 4.0)))::float8 as g
) as fresh
on conflict (bucket) do update set
    granted = case
        when least(%(cap)s, b.tokens + greatest(0, excluded.updated - b.updated) * %(rate)s) >= 1
        then least(%(n)s, greatest(1, floor(
            least(%(cap)s, b.tokens + greatest(0, excluded.updated - b.updated) * %(rate)s) / 4.0)))
        else 0 end,
    tokens = least(%(cap)s, b.tokens + greatest(0, excluded.updated - b.updated) * %(rate)s) - case
        when least(%(cap)s, b.tokens + greatest(0, excluded.updated - b.updated) * %(rate)s) >= 1
        then least(%(n)s, greatest(1, floor(
            least(%(cap)s, b.tokens + greatest(0, excluded.updated - b.updated) * %(rate)s) / 4.0)))
        else 0 end,
    updated = excluded.updated
returning tokens, granted
"""


@dataclass(frozen=True, slots=True)
class Limit:
    """A token bucket: `per_minute` tokens of burst, refilled at `per_minute / 60` a second."""

    per_minute: int

    @property
    def capacity(self) -> float:
        return float(self.per_minute)

    @property
    def rate(self) -> float:
        return self.per_minute / 60.0


class RateLimited(ApiError):
    """429 with Retry-After and RateLimit-* headers."""

    status_code = 429

    def __init__(self, limit: Limit, retry_after: int) -> None:
        super().__init__("rate limit exceeded; retry after the Retry-After header's seconds")
        self.retry_after = retry_after
        self.headers = {
            "Retry-After": str(retry_after),
            "RateLimit-Limit": str(limit.per_minute),
            "RateLimit-Remaining": "0",
            "RateLimit-Reset": str(retry_after),
            "RateLimit-Policy": f"{limit.per_minute};w=60",
        }


@dataclass(slots=True)
class _Local:
    tokens: int = 0
    blocked_until: float = 0.0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class RateLimiter:
    """Token buckets per user and per client IP, shared through Postgres (see the module doc)."""

    def __init__(
        self,
        pool: AsyncConnectionPool,
        role_limits: dict[str, Limit],
        register_limit: Limit,
        lease_max: int = 100,
    ) -> None:
        self._pool = pool
        self._role_limits = role_limits
        self._register_limit = register_limit
        self._lease_max = lease_max
        self._local: dict[str, _Local] = {}

    async def check_principal(self, principal: Principal) -> None:
        """Take a token of the caller's bucket (the admin token is exempt); raises RateLimited."""
        if principal.via_admin_token:
            return
        await self.take(f"user:{principal.user_id}", self._role_limits[principal.role])

    async def check_register(self, client_ip: str) -> None:
        """Take a token of a client IP's self-registration bucket; raises RateLimited."""
        await self.take(f"register:{client_ip}", self._register_limit)

    async def take(self, bucket: str, limit: Limit) -> None:
        """One token of `bucket`, from this process's lease when it holds one (no round trip)."""
        local = self._local.get(bucket)
        if local is None:
            if len(self._local) >= _MAX_LOCAL:
                self._local.pop(next(iter(self._local)))
            local = self._local[bucket] = _Local()
        if local.tokens > 0:
            local.tokens -= 1
            return
        now = time.monotonic()
        if local.blocked_until > now:
            raise RateLimited(limit, math.ceil(local.blocked_until - now))
        async with local.lock:
            if local.tokens > 0:  # another request of this process leased meanwhile
                local.tokens -= 1
                return
            try:
                tokens, granted = await self._lease(bucket, limit)
            except (psycopg.OperationalError, PoolTimeout):
                # Postgres away: no shared budget to draw from. Fail open, so what the api serves from
                # its caches meanwhile (downloads, kit.db_monitor) is not refused by the limiter.
                return
            if granted < 1:
                retry_after = max(1, math.ceil((1.0 - tokens) / limit.rate))
                local.blocked_until = time.monotonic() + retry_after
                raise RateLimited(limit, retry_after)
            local.tokens = int(granted) - 1

    async def _lease(self, bucket: str, limit: Limit) -> tuple[float, float]:
        params = {"bucket": bucket, "cap": limit.capacity, "rate": limit.rate, "n": self._lease_max}
        async with self._pool.connection() as conn:
            cur = await conn.execute(_LEASE, params)
            row = await cur.fetchone()
        return float(row["tokens"]), float(row["granted"])


_HEADER = {"schema": {"type": "integer"}}
#: The 429 answer in OpenAPI (added to every operation a rate limit applies to: see `document_429`).
RATE_LIMITED_RESPONSE: dict = {
    "description": "Rate limit exceeded (per user, or per client IP for registration); retry after `Retry-After` s",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorOut"}}},
    "headers": {
        "Retry-After": {"description": "Seconds until a request may succeed", **_HEADER},
        "RateLimit-Limit": {"description": "Requests per minute of the caller's bucket (IETF draft)", **_HEADER},
        "RateLimit-Remaining": {"description": "Requests left now (0 on a 429)", **_HEADER},
        "RateLimit-Reset": {"description": "Seconds until a request may succeed", **_HEADER},
        "RateLimit-Policy": {"description": "`<limit>;w=60`", "schema": {"type": "string"}},
    },
}


def document_429(schema: dict) -> dict:
    """Add the 429 answer to every operation a user key or registration reaches (not the admin-token-only
    ones, which are exempt, nor health probes)."""
    for path, item in schema.get("paths", {}).items():
        for op in item.values():
            if not isinstance(op, dict) or "responses" not in op:
                continue
            schemes = {name for sec in op.get("security", []) for name in sec}
            if "ApiKey" in schemes or path == "/v1/users/register":
                op["responses"].setdefault("429", RATE_LIMITED_RESPONSE)
    return schema
