"""Configuration of the analytics service (environment variables with the ANALYTICS_ prefix)."""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from registry_shared.events import Topics


class AnalyticsSettings(BaseSettings):
    """How the analytics loader consumes Kafka and batches its inserts into ClickHouse."""

    model_config = SettingsConfigDict(env_prefix="ANALYTICS_", env_file=None, extra="ignore", case_sensitive=False)

    access_topic: str = Field(Topics.ACCESS, description="Topic of registry.file.accessed.v1 events.")
    users_topic: str = Field(Topics.USERS, description="Topic of the user events (email/name dimension).")
    dead_letter_topic: str = Field(
        Topics.DEAD_LETTER, description="Where messages the loader gives up on go, with the error (consumer policy)."
    )
    group_id: str = Field("registry-analytics", description="Kafka consumer group of the loader.")
    group_instance_id: str | None = Field(
        None, description="Static group membership: a restarted loader gets its partitions back at once."
    )
    session_timeout_ms: int = Field(10_000, ge=1000, description="Kafka group session timeout.")
    batch_max_events: int = Field(50_000, ge=1, description="Flush a batch once it holds this many messages.")
    flush_interval_ms: int = Field(500, ge=1, description="Flush a non-empty batch at least this often.")
    fetch_max_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="Kafka fetch size (bytes) per request.")
    max_partition_fetch_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="Kafka fetch size per partition.")
    consumer_enabled: bool = Field(True, description="Run the Kafka loader inside the HTTP process.")


@lru_cache
def analytics_settings() -> AnalyticsSettings:
    """The process-wide analytics settings."""
    return AnalyticsSettings()
