"""Configuration of the ingest worker, read from INGEST_* environment variables.

Connections come from the shared settings (DATABASE_URL, KAFKA_BOOTSTRAP_SERVERS, MINIO_*); this class holds
what only ingest decides: its topics and consumer group, the object-key prefix it owns, and its timings.
`.env.example` lists every variable with its default.
"""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from registry_shared.events import Topics
from registry_shared.storage import LEGACY_PREFIX, QUARANTINE_PREFIX, UPLOAD_PREFIX


class IngestSettings(BaseSettings):
    """Everything the ingest worker can be tuned with (prefix INGEST_)."""

    model_config = SettingsConfigDict(env_prefix="INGEST_", env_file=None, extra="ignore", case_sensitive=False)

    port: int = Field(8082, description="HTTP port of /healthz (read by registry_shared.serve).")
    group_id: str = Field("registry-ingest", description="Kafka consumer group; processes sharing it share work.")
    uploads_topic: str = Field(Topics.UPLOADS, description="Where the api's UploadInitiated/Completed arrive.")
    minio_topic: str = Field(Topics.MINIO_EVENTS, description="Where MinIO publishes its bucket notifications.")
    verdicts_topic: str = Field(Topics.VERDICTS, description="Where UploadVerified/Rejected, ObjectQuarantined go.")
    dead_letter_topic: str = Field(Topics.DEAD_LETTER, description="Where undecodable messages go, with the error.")
    upload_prefix: str = Field(
        UPLOAD_PREFIX,
        description=(
            "Object keys this worker owns. Notifications for other keys are ignored, and its sweeper only looks at"
            " rows under this prefix, so workers with distinct prefixes (e.g. a test's) can share the stack."
        ),
    )
    event_source: str = Field("/ingest", description="CloudEvents `source` of the events ingest emits.")

    object_grace_seconds: float = Field(
        5.0, description="After `complete`, how long a missing object may still appear before object_missing."
    )
    stray_grace_seconds: float = Field(
        30.0,
        description="How long an object without any upload behind it waits before it is quarantined as stray;"
        " must exceed the api's outbox lag.",
    )
    upload_ttl_seconds: float = Field(
        86400.0, description="Uploads initiated and not completed within this time are rejected as expired."
    )
    multipart_ttl_seconds: float = Field(
        86400.0,
        description="Multipart uploads initiated and not completed within this time are aborted in object storage"
        " (their parts deleted) and rejected as expired.",
    )
    lease_seconds: float = Field(
        30.0, description="How long a worker owns a verification without renewing it; a dead worker's lease lapses."
    )
    sweep_interval_seconds: float = Field(1.0, description="How often the sweeper looks for due or orphaned work.")

    chunk_mib: int = Field(8, ge=1, le=256, description="Size of each read from MinIO while hashing.")
    read_buffers: int = Field(3, ge=2, le=16, description="Buffers in flight between the reader and hasher threads.")
    max_concurrent_verifications: int = Field(
        2,
        ge=1,
        le=64,
        description="Objects streamed at once by one process, each on a thread of ingest's own pool of this size;"
        " further verifications wait for a slot (their leases kept alive).",
    )
    max_verify_attempts: int = Field(
        5,
        ge=1,
        description="Failed verifications of one upload (storage or Postgres outages not counted) before it is"
        " rejected as `unverifiable`; an object the store can never hold (e.g. a key over 1,024 bytes) is"
        " rejected at the first.",
    )
    max_read_mbps: float = Field(0.0, ge=0, description="Cap on read throughput per object in MB/s (0 = none).")
    safetensors_max_header_mib: int = Field(100, ge=1, description="Larger safetensors headers are rejected.")

    fetch_max_wait_ms: int = Field(
        100,
        ge=1,
        description="Longest a fetch waits on the broker; bounds the delay before a partition paused for backlog"
        " is fetched again.",
    )
    consumers_per_topic: int = Field(
        2,
        ge=1,
        description="Kafka consumers of each topic in one process (FastStream's max_workers): each is a member of"
        " the group with partitions of its own, handled in order, so a long verification holds up only its own.",
    )
    max_attempts: int = Field(
        5,
        ge=1,
        description="Unexpected failures (neither infrastructure nor the message's own fault) of one message"
        " before it is dead-lettered.",
    )
    db_pool_max: int = Field(5, ge=2, description="Postgres connections of one process.")
    shutdown_timeout_seconds: float = Field(10.0, description="How long shutdown waits for in-flight messages.")

    @field_validator("upload_prefix")
    @classmethod
    def _prefix_is_a_folder_outside_reserved(cls, value: str) -> str:
        # Quarantined and legacy (hf/) objects must never be judged, so their prefixes cannot be owned.
        if not value.endswith("/") or value.startswith((QUARANTINE_PREFIX, LEGACY_PREFIX)) or value == "/":
            raise ValueError(f"upload_prefix must end with '/' and lie outside quarantine/ and hf/: {value!r}")
        return value

    @property
    def chunk_bytes(self) -> int:
        """Size of one read in bytes."""
        return self.chunk_mib * 1024 * 1024


@lru_cache
def ingest_settings() -> IngestSettings:
    """The process-wide ingest settings."""
    return IngestSettings()
