"""The api's settings (environment variables; see .env.example)."""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import Field, SecretStr, field_validator

from registry_shared.settings import KafkaSettings, MinioSettings, PostgresSettings, WebhookSecretSettings


class ApiSettings(PostgresSettings, KafkaSettings, MinioSettings, WebhookSecretSettings):
    """Everything the api reads from the environment."""

    registry_admin_token: SecretStr | None = Field(
        None, description="Token for x-admin-token. Unset or empty: admin endpoints answer 503."
    )
    registration_policy: Literal["open", "allowlist", "closed"] = "open"
    registration_email_domains: str = Field("", description="Comma-separated domains for the allowlist policy.")
    minio_public_endpoint: str | None = Field(
        None, description="host:port clients use to reach MinIO in presigned URLs (default MINIO_ENDPOINT)."
    )
    analytics_url: str = "http://127.0.0.1:8083"
    api_run_migrations: bool = Field(True, description="Apply pending migrations at start-up.")
    api_consume_events: bool = Field(True, description="Run the verdict/downloads consumers in this process.")
    outbox_relay: bool = Field(True, description="Run the outbox relay in this process.")
    access_flush_ms: int = Field(
        20, ge=1, le=5000, description="How often buffered access events are written to the outbox."
    )
    access_buffer_max: int = Field(
        100_000,
        ge=100,
        le=10_000_000,
        description="Access events held in memory while they cannot be written (Postgres away); when full, "
        "counted reads answer 503 instead of going uncounted.",
    )

    rate_limits_enabled: bool = Field(
        True, description="Token-bucket rate limits per user and per client IP (register); false: none."
    )
    rate_limit_developer_per_minute: int = Field(
        600, ge=1, description="Requests a developer may make per minute (also its burst)."
    )
    rate_limit_platform_per_minute: int = Field(
        6000, ge=1, description="Requests a platform user may make per minute (also its burst)."
    )
    rate_limit_admin_per_minute: int = Field(
        1200,
        ge=1,
        description="Requests an admin-role user (by API key) may make per minute. The admin token is exempt.",
    )
    rate_limit_register_per_minute: int = Field(
        10, ge=1, description="Self-registrations per client IP per minute (also its burst)."
    )
    rate_limit_lease_max: int = Field(
        100, ge=1, le=100_000, description="Most tokens one api process leases from a shared bucket at a time."
    )

    @field_validator("registry_admin_token", mode="before")
    @classmethod
    def _empty_is_unset(cls, v: object) -> object:
        return None if v in ("", None) else v

    @property
    def allowed_domains(self) -> set[str]:
        """Lower-cased e-mail domains allowed to self-register under the allowlist policy."""
        return {d.strip().lower() for d in self.registration_email_domains.split(",") if d.strip()}


@lru_cache
def get_settings() -> ApiSettings:
    """The process-wide settings (MinIO with the api's own user: API_MINIO_ACCESS_KEY / API_MINIO_SECRET_KEY)."""
    return ApiSettings().for_service("api")
