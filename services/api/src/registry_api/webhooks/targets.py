"""SSRF guard for webhook targets: refuse private, loopback, link-local and other non-public addresses.

The same rule runs twice: here when a subscription is created or its URL changed (every address the
host resolves to must be allowed), and in the notifier before every delivery (against DNS rebinding).
`WEBHOOK_ALLOW_PRIVATE_TARGETS` lists the CIDRs that are allowed even though they are not public
(the tests put 127.0.0.1/32 there for their loopback receivers).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from functools import lru_cache
from urllib.parse import urlsplit

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class TargetSettings(BaseSettings):
    """The api's side of the webhook target policy (environment variables)."""

    model_config = SettingsConfigDict(env_file=None, extra="ignore", case_sensitive=False)
    webhook_allow_private_targets: str = Field(
        "", description="Comma-separated CIDRs a webhook may target although they are not public addresses."
    )
    webhook_dns_timeout_s: float = Field(3.0, gt=0, le=30)

    @property
    def allowed_networks(self) -> list[IPNetwork]:
        """The allowlist, parsed."""
        return parse_networks(self.webhook_allow_private_targets)


@lru_cache
def target_settings() -> TargetSettings:
    """The process-wide target policy."""
    return TargetSettings()


class TargetRefused(ValueError):
    """The URL may not be used as a webhook target."""


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


async def check_target(url: str, allowed: list[IPNetwork], dns_timeout: float = 3.0) -> None:
    """Raise TargetRefused unless every address `url`'s host resolves to is allowed."""
    _, host, port = split_target(url)
    try:
        literal: IPAddress | None = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        addresses = [literal]
    else:
        try:
            infos = await asyncio.wait_for(
                asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM), dns_timeout
            )
        except (OSError, TimeoutError) as exc:
            raise TargetRefused(f"cannot resolve host {host!r}") from exc
        addresses = [ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos]
        if not addresses:
            raise TargetRefused(f"cannot resolve host {host!r}")
    for ip in addresses:
        if not address_allowed(ip, allowed):
            raise TargetRefused(f"target address {ip} is not public (private, loopback or link-local)")
