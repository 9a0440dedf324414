"""Configuration of every service, read from environment variables (pydantic-settings).

One class per concern; each service builds only what it needs. `.env.example` at the checkout's
root lists every variable with its default.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Literal, Self

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from registry_shared.secretbox import SecretBox, parse_key

_CONFIG = SettingsConfigDict(env_file=None, extra="ignore", case_sensitive=False)


class PostgresSettings(BaseSettings):
    """Where the api's catalog lives."""

    model_config = _CONFIG
    database_url: str = Field(
        "postgresql://registry:registry@127.0.0.1:55432/registry",
        description="libpq connection URL of the catalog database.",
    )
    db_pool_min: int = 2
    db_pool_max: int = 20


class KafkaSettings(BaseSettings):
    """The event bus."""

    model_config = _CONFIG
    kafka_bootstrap_servers: str = "127.0.0.1:19092"
    kafka_client_id: str = "model-registry"


class MinioSettings(BaseSettings):
    """Object storage (the spec's variable names)."""

    model_config = _CONFIG
    minio_endpoint: str = "127.0.0.1:19000"
    minio_root_user: str = "registry"
    minio_root_password: SecretStr = SecretStr("registry-secret")
    minio_bucket: str = "models"
    minio_secure: bool = False
    minio_region: str = "us-east-1"
    minio_notify_topic: str = "minio.bucket-events"
    #: The queue ARN of MinIO's Kafka notification target configured by MINIO_NOTIFY_KAFKA_*_REGISTRY.
    minio_notify_arn: str = "arn:minio:sqs::REGISTRY:kafka"
    #: A service's own MinIO user (created by `registry-devstack setup-minio` with a policy limited to what
    #: the service does). Read as `<SERVICE>_MINIO_ACCESS_KEY` / `<SERVICE>_MINIO_SECRET_KEY` through
    #: `for_service`; unset: the root credentials (not for production).
    minio_access_key: str | None = None
    minio_secret_key: SecretStr | None = None

    def credentials(self) -> tuple[str, str]:
        """(access key, secret key) this process signs and calls MinIO with."""
        if self.minio_access_key and self.minio_secret_key is not None:
            return self.minio_access_key, self.minio_secret_key.get_secret_value()
        return self.minio_root_user, self.minio_root_password.get_secret_value()

    def for_service(self, service: str) -> Self:
        """These settings with `service`'s own credentials (`<SERVICE>_MINIO_ACCESS_KEY` and
        `<SERVICE>_MINIO_SECRET_KEY`) when both are set."""
        prefix = f"{service.upper()}_MINIO_"
        access, secret = os.environ.get(prefix + "ACCESS_KEY"), os.environ.get(prefix + "SECRET_KEY")
        if not access or not secret:
            return self
        return self.model_copy(update={"minio_access_key": access, "minio_secret_key": SecretStr(secret)})


class ClickHouseSettings(BaseSettings):
    """The analytics store: in-process chDB locally and in CI, a ClickHouse server over HTTP elsewhere."""

    model_config = _CONFIG
    clickhouse_mode: Literal["chdb", "http"] = "chdb"
    chdb_path: str = ".local/data/chdb"
    clickhouse_host: str = "127.0.0.1"
    clickhouse_port: int = 8123
    clickhouse_user: str = "default"
    clickhouse_password: SecretStr = SecretStr("")
    clickhouse_database: str = "registry"


class WebhookSecretSettings(BaseSettings):
    """The key webhook signing secrets are sealed with at rest (api seals, notifier opens)."""

    model_config = _CONFIG
    webhook_secret_key: SecretStr | None = Field(
        None,
        description="AES-256 key (base64 of 32 bytes) sealing webhook signing secrets in the database; the"
        " api and the notifier need the same one. Unset: webhooks cannot be created (503).",
    )

    @field_validator("webhook_secret_key", mode="before")
    @classmethod
    def _checked_key(cls, v: object) -> object:
        if v in ("", None):
            return None
        parse_key(v.get_secret_value() if isinstance(v, SecretStr) else str(v))  # fails at start-up, not later
        return v

    def secret_box(self) -> SecretBox | None:
        """The box sealing webhook secrets, if a key is configured."""
        return SecretBox(self.webhook_secret_key.get_secret_value()) if self.webhook_secret_key else None


class ServiceSettings(BaseSettings):
    """How a service process listens."""

    model_config = _CONFIG
    host: str = "127.0.0.1"
    log_level: Literal["debug", "info", "warning", "error"] = "info"


@lru_cache
def kafka_settings() -> KafkaSettings:
    """The process-wide Kafka settings."""
    return KafkaSettings()


@lru_cache
def minio_settings() -> MinioSettings:
    """The process-wide MinIO settings."""
    return MinioSettings()
