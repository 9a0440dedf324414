"""Webhook rules shared by the api (subscriptions) and the notifier (deliveries).

- The event types one can subscribe to: their names, CloudEvents types and who receives them. The api
  accepts and documents these names; the notifier routes exactly these types.
- Where webhooks may be sent (SSRF): public unicast addresses, or those inside the allowlist
  (`WEBHOOK_ALLOW_PRIVATE_TARGETS`, CIDRs). The api checks a URL when a subscription is created or its
  URL changed (every address the host resolves to must be allowed); the notifier checks it again before
  every delivery and then connects to the checked address itself (Host header and TLS SNI keep the
  name), so a DNS answer that changes between the check and the connection (DNS rebinding) cannot reach
  an internal address.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, get_args
from urllib.parse import urlsplit, urlunsplit

from registry_shared.events import (
    GrantCreated,
    GrantRevoked,
    GrantUpdated,
    UploadCompleted,
    UploadRejected,
    UploadVerified,
    UserKeyRotated,
    VersionCreated,
)

# ---------------------------------------------------------------- subscribable events

#: The names a subscription's `event_types` may hold.
SubscriptionName = Literal[
    "upload.completed",
    "upload.verified",
    "upload.rejected",
    "grant.created",
    "grant.updated",
    "grant.revoked",
    "version.created",
    "user.key_rotated",
]


@dataclass(frozen=True, slots=True)
class SubscribableEvent:
    """An event type one can subscribe to."""

    name: SubscriptionName
    cloudevents_type: str
    description: str


#: Every event type one can subscribe to, in the order they are documented.
SUBSCRIBABLE_EVENTS: tuple[SubscribableEvent, ...] = (
    SubscribableEvent(
        "upload.completed",
        UploadCompleted.event_type,
        "A file you uploaded was declared complete and awaits verification (to its developer).",
    ),
    SubscribableEvent(
        "upload.verified",
        UploadVerified.event_type,
        "A file you uploaded was verified and is now served (to its developer).",
    ),
    SubscribableEvent(
        "upload.rejected",
        UploadRejected.event_type,
        "A file you uploaded was rejected, with the reason (to its developer).",
    ),
    SubscribableEvent("grant.created", GrantCreated.event_type, "You were granted a model (to the platform user)."),
    SubscribableEvent(
        "grant.updated", GrantUpdated.event_type, "The window of your grant changed (to the platform user)."
    ),
    SubscribableEvent("grant.revoked", GrantRevoked.event_type, "Your grant was revoked (to the platform user)."),
    SubscribableEvent(
        "version.created",
        VersionCreated.event_type,
        "A new version of a model you may see: your own, one granted to you and in force at the event's "
        "time, or a public model named in the subscription's repo_id filter.",
    ),
    SubscribableEvent(
        "user.key_rotated", UserKeyRotated.event_type, "Your API key was rotated (to the account's owner)."
    ),
)

#: CloudEvents type → the name subscriptions use.
SUBSCRIPTION_NAME_OF: dict[str, SubscriptionName] = {e.cloudevents_type: e.name for e in SUBSCRIBABLE_EVENTS}

if {e.name for e in SUBSCRIBABLE_EVENTS} != set(get_args(SubscriptionName)):  # pragma: no cover
    raise RuntimeError("SubscriptionName and SUBSCRIBABLE_EVENTS disagree")

# ---------------------------------------------------------------- targets (SSRF)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
#: host, port → the addresses it resolves to.
Resolver = Callable[[str, int], Awaitable[list[str]]]


class TargetRefused(ValueError):
    """The URL may not be used as a webhook target (its message says why)."""


def parse_networks(spec: str) -> list[IPNetwork]:
    """'127.0.0.1/32, 10.0.0.0/8' → networks (a bare address is a /32 or /128)."""
    return [ipaddress.ip_network(part.strip(), strict=False) for part in spec.split(",") if part.strip()]


def address_allowed(ip: IPAddress, allowed: list[IPNetwork]) -> bool:
    """Public unicast addresses are allowed; anything else only inside the allowlist."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if any(ip in net for net in allowed):
        return True
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_unspecified)


def split_target(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of an http(s) URL without credentials; TargetRefused otherwise."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise TargetRefused(f"invalid URL: {exc}") from exc
    if parts.scheme not in ("http", "https"):
        raise TargetRefused("the URL must be http or https")
    if not parts.hostname:
        raise TargetRefused("the URL has no host")
    if parts.username is not None or parts.password is not None:
        raise TargetRefused("credentials in the URL are not allowed")
    return parts.scheme, parts.hostname, port or (443 if parts.scheme == "https" else 80)


def literal_address(host: str) -> IPAddress | None:
    """The address if `host` is an IP literal, else None."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def statically_allowed(url: str, allowed: list[IPNetwork]) -> bool:
    """Cheap check without DNS: a well-formed URL whose host, if an IP literal, is allowed.

    The notifier queues deliveries only for subscriptions that pass it. A notifier whose allowlist does
    not cover a literal private address (say, the stack's notifier and a test's loopback receiver) thus
    leaves that subscription to a notifier deployment that may reach it.
    """
    try:
        _, host, _ = split_target(url)
    except TargetRefused:
        return False
    ip = literal_address(host)
    return ip is None or address_allowed(ip, allowed)


async def system_resolver(host: str, port: int) -> list[str]:
    """The addresses of `host` from the system resolver."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [info[4][0] for info in infos]


@dataclass(frozen=True, slots=True)
class PinnedTarget:
    """Where to connect: the URL with a checked address in place of the name, and the name for Host/SNI."""

    url: str
    host_header: str
    sni_hostname: str | None


class TargetGuard:
    """Resolves and checks webhook targets, caching answers for `cache_s` (0: no cache)."""

    def __init__(
        self,
        allowed: list[IPNetwork],
        resolver: Resolver = system_resolver,
        dns_timeout: float = 3.0,
        cache_s: float = 30.0,
    ) -> None:
        self.allowed = allowed
        self._resolver = resolver
        self._dns_timeout = dns_timeout
        self._cache_s = cache_s
        self._cache: dict[tuple[str, int], tuple[float, list[IPAddress]]] = {}

    async def _addresses(self, host: str, port: int) -> list[IPAddress]:
        ip = literal_address(host)
        if ip is not None:
            return [ip]
        hit = self._cache.get((host, port))
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        try:
            async with asyncio.timeout(self._dns_timeout):
                raw = await self._resolver(host, port)
        except (OSError, TimeoutError) as exc:
            raise TargetRefused(f"cannot resolve host {host!r} ({exc or type(exc).__name__})") from exc
        addresses = [ipaddress.ip_address(a.split("%", 1)[0]) for a in raw]
        if not addresses:
            raise TargetRefused(f"cannot resolve host {host!r}")
        if self._cache_s > 0:
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[(host, port)] = (time.monotonic() + self._cache_s, addresses)
        return addresses

    async def check(self, url: str) -> list[IPAddress]:
        """The addresses of `url`'s host, every one of them allowed; TargetRefused otherwise."""
        _, host, port = split_target(url)
        addresses = await self._addresses(host, port)
        for ip in addresses:
            if not address_allowed(ip, self.allowed):
                where = str(ip) if literal_address(host) is not None else f"{host} resolves to {ip}, which"
                raise TargetRefused(f"{where} is not a public address (private, loopback, link-local or reserved)")
        return addresses

    async def pin(self, url: str) -> PinnedTarget:
        """Check every address of `url`'s host; the URL rewritten to connect to the first one."""
        scheme, host, port = split_target(url)
        ip = (await self.check(url))[0]
        parts = urlsplit(url)
        netloc = f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
        default_port = 443 if scheme == "https" else 80
        host_header = host if port == default_port else f"{host}:{port}"
        if ":" in host and not host.startswith("["):
            host_header = f"[{host}]" if port == default_port else f"[{host}]:{port}"
        pinned = urlunsplit((scheme, netloc, parts.path or "/", parts.query, ""))
        return PinnedTarget(pinned, host_header, host if scheme == "https" and literal_address(host) is None else None)
