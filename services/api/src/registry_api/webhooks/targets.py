"""The api's side of the webhook target policy (SSRF): its settings, and the check at creation.

The rule itself is `registry_shared.webhooks` (the notifier applies it again before every delivery, against
DNS rebinding). `WEBHOOK_ALLOW_PRIVATE_TARGETS` lists the CIDRs that are allowed even though they are not
public (the tests put 127.0.0.1/32 there for their loopback receivers).
"""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from registry_shared.webhooks import IPNetwork, TargetGuard, TargetRefused, parse_networks

__all__ = ["TargetRefused", "TargetSettings", "check_target", "target_settings"]


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


@lru_cache
def _guard() -> TargetGuard:
    settings = target_settings()
    # No cache: a subscription is checked against what its host resolves to now.
    return TargetGuard(settings.allowed_networks, dns_timeout=settings.webhook_dns_timeout_s, cache_s=0)


async def check_target(url: str) -> None:
    """Raise TargetRefused unless `url` is an http(s) URL whose every address is public or allowlisted."""
    await _guard().check(url)
