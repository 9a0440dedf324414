"""MinIO's bucket notifications (S3 event records, not CloudEvents) and which of them ingest looks at."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote_plus

from registry_shared.storage import LEGACY_PREFIX, QUARANTINE_PREFIX


class BadNotification(ValueError):
    """A message on the MinIO topic that is not an S3 event record we can read."""


@dataclass(frozen=True)
class ObjectNotification:
    """One object created or removed, as MinIO reported it."""

    kind: Literal["created", "removed"]
    event_name: str
    bucket: str
    key: str
    size: int | None
    etag: str | None
    sequencer: str | None
    version_id: str | None

    @property
    def correlation_id(self) -> str:
        """What identifies this notification in logs (MinIO records carry no event id)."""
        return f"minio:{self.key}@{self.sequencer or '-'}"


def parse_notification(value: bytes) -> list[ObjectNotification]:
    """The created/removed records of one MinIO Kafka message (other event names are dropped).

    Keys arrive URL-encoded with '+' for spaces, hence `unquote_plus`. Raises BadNotification.
    """
    try:
        doc = json.loads(value)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadNotification(f"not JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("Records"), list):
        raise BadNotification("no Records list: not a MinIO bucket event")
    out: list[ObjectNotification] = []
    for record in doc["Records"]:
        try:
            name = str(record["eventName"])
            s3 = record["s3"]
            obj = s3["object"]
            bucket = str(s3["bucket"]["name"])
            key = unquote_plus(str(obj["key"]))
        except (KeyError, TypeError) as exc:
            raise BadNotification(f"record without {exc}") from None
        if name.startswith("s3:ObjectCreated:"):
            kind: Literal["created", "removed"] = "created"
        elif name.startswith("s3:ObjectRemoved:"):
            kind = "removed"
        else:
            continue
        size = obj.get("size")
        etag = obj.get("eTag")
        out.append(
            ObjectNotification(
                kind=kind,
                event_name=name,
                bucket=bucket,
                key=key,
                size=int(size) if isinstance(size, int | float) else None,
                etag=str(etag).strip('"') if etag else None,
                sequencer=str(obj["sequencer"]) if obj.get("sequencer") else None,
                version_id=str(obj["versionId"]) if obj.get("versionId") else None,
            )
        )
    return out


def owns_key(key: str, upload_prefix: str) -> bool:
    """Whether a worker owning `upload_prefix` judges the object at `key`.

    Quarantined objects (moved there by ingest itself) and legacy hf/ catalog files are never judged,
    whatever the prefix.
    """
    if key.startswith((QUARANTINE_PREFIX, LEGACY_PREFIX)):
        return False
    return key.startswith(upload_prefix) and len(key) > len(upload_prefix)


def message_key_outside(message_key: bytes | None, bucket: str, upload_prefix: str) -> bool:
    """Cheap pre-filter on MinIO's Kafka message key ("<bucket>/<key>"): True if surely not ours.

    Lets a worker skip the JSON of the many notifications for other prefixes; when in doubt (no key,
    not UTF-8), the value is parsed.
    """
    if not message_key:
        return False
    try:
        text = message_key.decode()
    except UnicodeDecodeError:
        return False
    expected = f"{bucket}/"
    if not text.startswith(expected):
        return False
    return not owns_key(text[len(expected) :], upload_prefix)
