"""The notifier's settings (environment variables; see the "--- notifier ---" part of .env.example)."""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import Field, SecretStr, field_validator

from registry_shared.settings import KafkaSettings, PostgresSettings, WebhookSecretSettings

#: Seconds to wait before attempt 2, 3, ... of a failed delivery: about 16 hours in all.
DEFAULT_RETRY_SCHEDULE = "5,30,120,600,1800,3600,7200,14400,28800"


class NotifierSettings(PostgresSettings, KafkaSettings, WebhookSecretSettings):
    """Everything the notifier reads from the environment."""

    notifier_group_id: str = Field("registry-notifier", description="Kafka consumer group.")
    notifier_auto_offset_reset: Literal["earliest", "latest"] = Field(
        "earliest", description="Where a new consumer group starts (replays are harmless: deliveries are unique)."
    )
    notifier_deployment: str = Field(
        "default",
        description="Name of this notifier deployment (its replicas share one SMTP relay and one e-mail queue).",
    )
    webhook_allow_private_targets: str = Field(
        "", description="Comma-separated CIDRs webhooks may target although not public (same variable as the api)."
    )
    notifier_retry_schedule_s: str = Field(
        DEFAULT_RETRY_SCHEDULE, description="Comma-separated delays (s) before each retry; then the delivery fails."
    )
    notifier_retry_jitter: float = Field(0.2, ge=0, le=1, description="Each delay is shortened by up to this share.")
    notifier_max_consecutive_failures: int = Field(
        20, ge=1, description="Failed attempts in a row after which a webhook is disabled and its owner e-mailed."
    )
    notifier_delivery_timeout_s: float = Field(10.0, gt=0, le=120)
    notifier_delivery_concurrency: int = Field(64, ge=1, le=1000, description="Deliveries in flight at once.")
    notifier_lease_s: float = Field(300.0, gt=0, description="A claimed delivery returns to others after this.")
    notifier_adopt_after_s: float = Field(
        300.0, ge=0, description="Deliveries queued by another deployment are taken over once this overdue."
    )
    notifier_retention_days: int = Field(
        30,
        ge=0,
        description="Delivered/failed deliveries and sent/failed e-mails are deleted after this many days (0: kept"
        " forever). Keep it above the Kafka topics' retention: an event replayed after it would be sent again.",
    )
    notifier_poll_interval_s: float = Field(0.5, gt=0, le=60, description="How often due retries are looked for.")
    notifier_dns_timeout_s: float = Field(3.0, gt=0, le=30)
    notifier_dns_cache_s: float = Field(30.0, ge=0, le=3600)
    smtp_host: str = Field("", description="SMTP relay; empty disables e-mail.")
    smtp_port: int = 25
    smtp_username: str = ""
    smtp_password: SecretStr = SecretStr("")
    smtp_starttls: bool = False
    smtp_ssl: bool = Field(False, description="Implicit TLS (SMTPS, usually port 465).")
    smtp_from: str = "Model Registry <no-reply@registry.local>"
    smtp_timeout_s: float = Field(10.0, gt=0, le=120)

    @field_validator("notifier_retry_schedule_s")
    @classmethod
    def _schedule(cls, v: str) -> str:
        delays = [float(x) for x in v.split(",") if x.strip()]
        if any(d < 0 for d in delays):
            raise ValueError("retry delays must be >= 0")
        return v

    @property
    def retry_delays(self) -> list[float]:
        """The retry schedule in seconds; its length + 1 is the number of attempts of a delivery."""
        return [float(x) for x in self.notifier_retry_schedule_s.split(",") if x.strip()]

    @property
    def email_enabled(self) -> bool:
        """E-mail is sent only when an SMTP relay is configured."""
        return bool(self.smtp_host)


@lru_cache
def get_settings() -> NotifierSettings:
    """The process-wide settings."""
    return NotifierSettings()
