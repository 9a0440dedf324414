"""The event contract of the Model Registry: topics, the CloudEvents envelope, one model per event type.

Producers and consumers import these same classes. Every event travels as CloudEvents 1.0 JSON
(structured mode) with the message key set to the event's `subject` (the repo_id for catalog events,
`user:<id>` for account events), so all events of one model stay in order on one partition.

Types are versioned by name (`registry.upload.completed.v1`); a breaking change gets a new type.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from registry_shared import tracing


class Topics:
    """Kafka topic names."""

    USERS = "registry.users.v1"
    CATALOG = "registry.catalog.v1"
    UPLOADS = "registry.uploads.v1"
    VERDICTS = "registry.verdicts.v1"
    ACCESS = "registry.access.v1"
    DEAD_LETTER = "registry.dead-letter.v1"
    #: The audit log, for SIEMs (every state-changing action; see the api's audit/).
    AUDIT = "registry.audit.v1"
    #: MinIO's own bucket notifications (not CloudEvents; MinIO's S3 event records).
    MINIO_EVENTS = "minio.bucket-events"


class EventData(BaseModel):
    """Base of every event payload: its CloudEvents type and the topic it is published on."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    event_type: ClassVar[str]
    topic: ClassVar[str]


# ---------------------------------------------------------------- users
class UserRegistered(EventData):
    """A user account was created (self-registration or by an admin)."""

    event_type: ClassVar[str] = "registry.user.registered.v1"
    topic: ClassVar[str] = Topics.USERS
    user_id: int
    email: str
    name: str
    role: Literal["developer", "platform", "admin"]


class UserKeyRotated(EventData):
    """A user's API key was replaced; the old one stopped working at `rotated_ts`."""

    event_type: ClassVar[str] = "registry.user.key_rotated.v1"
    topic: ClassVar[str] = Topics.USERS
    user_id: int
    email: str
    key_prefix: str
    rotated_ts: int


# ---------------------------------------------------------------- catalog
class ModelCreated(EventData):
    """A developer created a model."""

    event_type: ClassVar[str] = "registry.model.created.v1"
    topic: ClassVar[str] = Topics.CATALOG
    repo_id: str
    owner_id: int
    visibility: Literal["private", "public"]


class VersionCreated(EventData):
    """A developer created a version of a model."""

    event_type: ClassVar[str] = "registry.version.created.v1"
    topic: ClassVar[str] = Topics.CATALOG
    repo_id: str
    version: str
    owner_id: int


class GrantChanged(EventData):
    """Common shape of grant events."""

    grant_id: int
    platform_user_id: int
    repo_id: str
    permitted_from_ts: int
    permitted_until_ts: int | None = None


class GrantCreated(GrantChanged):
    """An admin granted a platform user a model from `permitted_from_ts`."""

    event_type: ClassVar[str] = "registry.grant.created.v1"
    topic: ClassVar[str] = Topics.CATALOG


class GrantUpdated(GrantChanged):
    """An admin changed a grant's window."""

    event_type: ClassVar[str] = "registry.grant.updated.v1"
    topic: ClassVar[str] = Topics.CATALOG


class GrantRevoked(GrantChanged):
    """An admin revoked a grant; the platform user loses access at once."""

    event_type: ClassVar[str] = "registry.grant.revoked.v1"
    topic: ClassVar[str] = Topics.CATALOG


# ---------------------------------------------------------------- uploads
class UploadInitiated(EventData):
    """A developer asked for a presigned PUT URL for a file of a version, or started a multipart upload."""

    event_type: ClassVar[str] = "registry.upload.initiated.v1"
    topic: ClassVar[str] = Topics.UPLOADS
    upload_id: int
    repo_id: str
    version: str
    rfilename: str
    object_key: str
    developer_id: int
    expires_ts: int
    multipart_upload_id: str | None = Field(
        None, description="The S3 multipart upload id when the file is uploaded in parts (absent for a single PUT)."
    )


class UploadCompleted(EventData):
    """A developer declared an upload complete with its size and sha256; ingest verifies it."""

    event_type: ClassVar[str] = "registry.upload.completed.v1"
    topic: ClassVar[str] = Topics.UPLOADS
    upload_id: int
    repo_id: str
    version: str
    rfilename: str
    object_key: str
    developer_id: int
    size: int
    sha256: str


class UploadVerified(EventData):
    """Ingest found the stored object equal to what was declared; the file may be served."""

    event_type: ClassVar[str] = "registry.upload.verified.v1"
    topic: ClassVar[str] = Topics.VERDICTS
    upload_id: int
    repo_id: str
    version: str
    rfilename: str
    object_key: str
    size: int
    sha256: str
    etag: str | None = None
    file_format: Literal["safetensors", "pickle", "other"] = "other"
    is_pickle: bool = False


class UploadRejected(EventData):
    """Ingest refused an upload; the object was moved to `quarantine_key` and is never served."""

    event_type: ClassVar[str] = "registry.upload.rejected.v1"
    topic: ClassVar[str] = Topics.VERDICTS
    upload_id: int
    repo_id: str
    version: str
    rfilename: str
    object_key: str
    reason: Literal[
        "size_mismatch",
        "sha256_mismatch",
        "object_missing",
        "bad_safetensors_header",
        "expired",
        "unverifiable",
    ] = Field(
        description="unverifiable: the object could not be read to be verified (e.g. a key the store cannot"
        " hold), after a bounded number of attempts; `detail` says why."
    )
    detail: str = ""
    quarantine_key: str | None = None


class ObjectQuarantined(EventData):
    """An object appeared in the bucket without an upload behind it and was quarantined."""

    event_type: ClassVar[str] = "registry.object.quarantined.v1"
    topic: ClassVar[str] = Topics.VERDICTS
    object_key: str
    quarantine_key: str
    size: int | None = None
    reason: Literal["stray_object"] = "stray_object"


# ---------------------------------------------------------------- access
AccessKind = Literal["download", "manifest", "files_list", "platform_manifest", "model_detail", "changes"]


class FileAccessed(EventData):
    """A user read something the usage endpoints count (a download URL, a manifest, a files list)."""

    event_type: ClassVar[str] = "registry.file.accessed.v1"
    topic: ClassVar[str] = Topics.ACCESS
    user_id: int
    kind: AccessKind
    repo_id: str | None = None
    version: str | None = None
    rfilename: str | None = None
    bytes: int = 0
    ts: float = Field(description="When the access happened (epoch seconds, fractional).")


# ---------------------------------------------------------------- audit
class AuditRecorded(EventData):
    """A state-changing action was written to the audit log (same transaction as the change)."""

    event_type: ClassVar[str] = "registry.audit.recorded.v1"
    topic: ClassVar[str] = Topics.AUDIT
    audit_id: int
    ts: float = Field(description="When (epoch seconds, fractional).")
    actor_kind: Literal["user", "admin-token", "anonymous", "system"]
    actor_user_id: int | None = None
    action: str = Field(description="e.g. grant.create, model.update, upload.verdict")
    target_type: str
    target_id: str | None = None
    repo_id: str | None = None
    before: dict[str, Any] | None = None
    after: dict[str, Any] | None = None
    request_id: str | None = None
    client_ip: str | None = None


EVENT_TYPES: dict[str, type[EventData]] = {
    cls.event_type: cls
    for cls in (
        UserRegistered,
        UserKeyRotated,
        ModelCreated,
        VersionCreated,
        GrantCreated,
        GrantUpdated,
        GrantRevoked,
        UploadInitiated,
        UploadCompleted,
        UploadVerified,
        UploadRejected,
        ObjectQuarantined,
        FileAccessed,
        AuditRecorded,
    )
}


class CloudEvent(BaseModel):
    """CloudEvents 1.0 envelope (structured JSON mode)."""

    model_config = ConfigDict(extra="allow")
    specversion: Literal["1.0"] = "1.0"
    id: str = Field(default_factory=lambda: str(uuid.uuid4()))
    source: str
    type: str
    time: datetime = Field(default_factory=lambda: datetime.now(UTC))
    subject: str | None = None
    datacontenttype: Literal["application/json"] = "application/json"
    traceparent: str | None = Field(
        None,
        description="The W3C trace context of the span that produced the event (the CloudEvents distributed-tracing "
        "extension attribute); present when the producer traces (OpenTelemetry), so consumers continue its trace.",
    )
    data: dict[str, Any]

    def payload(self) -> EventData:
        """The typed payload, validated against its event type's model."""
        cls = EVENT_TYPES.get(self.type)
        if cls is None:
            raise ValueError(f"unknown event type: {self.type}")
        return cls.model_validate(self.data)

    @property
    def key(self) -> bytes | None:
        """The Kafka message key: the subject, so events of one model keep their order."""
        return self.subject.encode() if self.subject else None


def make_event(data: EventData, *, source: str, subject: str | None = None, **fields: Any) -> CloudEvent:
    """Wrap a payload in a CloudEvents envelope; `subject` defaults to the payload's repo_id."""
    if subject is None:
        subject = getattr(data, "repo_id", None)
        if subject is None and hasattr(data, "user_id"):
            subject = f"user:{data.user_id}"
    if "traceparent" not in fields:
        fields["traceparent"] = tracing.current_traceparent()
    return CloudEvent(source=source, type=data.event_type, subject=subject, data=data.model_dump(), **fields)


def encode_event(event: CloudEvent) -> bytes:
    """The bytes of a Kafka message value: the CloudEvent as structured-mode JSON."""
    return event.model_dump_json(exclude_none=True).encode()


def decode_event(value: bytes) -> CloudEvent:
    """Parse a Kafka message value produced by `encode_event` (raises pydantic.ValidationError)."""
    return CloudEvent.model_validate_json(value)
