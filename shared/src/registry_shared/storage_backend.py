"""What differs between S3 servers, behind one small interface; everything else is plain S3.

The services sign, read, copy to quarantine, run multipart uploads and list with plain S3 calls
(signature v4, path-style), which every supported server accepts. What is not S3 lives here:
creating the bucket with the server's defaults and pushing object events to Kafka, which only MinIO's
own notification target does. `backend_for(settings)` picks the implementation from STORAGE_BACKEND.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Literal

from minio.notificationconfig import NotificationConfig, QueueConfig

from registry_shared.settings import MinioSettings
from registry_shared.storage import minio_client


class StorageBackend(ABC):
    """One kind of S3 server: how the stack prepares it, and what it can do beyond plain S3."""

    name: str
    #: Whether the server can push s3:ObjectCreated/Removed events to Kafka.
    can_notify: bool

    def __init__(self, settings: MinioSettings) -> None:
        self.settings = settings
        self.client = minio_client(settings)

    def setup_bucket(self) -> None:
        """Create the bucket if it does not exist (plain S3: CreateBucket)."""
        if not self.client.bucket_exists(self.settings.minio_bucket):
            self.client.make_bucket(self.settings.minio_bucket)

    @abstractmethod
    def setup_notifications(self) -> None:
        """Send every created or removed object of the bucket to Kafka; raises if the server cannot."""

    def setup(self) -> Literal["kafka", "none"]:
        """The bucket, plus notifications when the mode in force asks for them; returns that mode."""
        self.setup_bucket()
        mode = self.settings.notifications
        if mode == "kafka":
            self.setup_notifications()
        return mode


class MinioBackend(StorageBackend):
    """MinIO: bucket notifications through its own Kafka target (id REGISTRY, configured by the stack's
    MINIO_NOTIFY_KAFKA_*_REGISTRY variables), set with MinIO's PutBucketNotification."""

    name = "minio"
    can_notify = True

    def setup_notifications(self) -> None:
        """s3:ObjectCreated:* and s3:ObjectRemoved:* → the queue ARN of the REGISTRY target."""
        config = NotificationConfig(
            queue_config_list=[
                QueueConfig(
                    queue=self.settings.minio_notify_arn,
                    events=["s3:ObjectCreated:*", "s3:ObjectRemoved:*"],
                    config_id="registry",
                ),
            ]
        )
        self.client.set_bucket_notification(self.settings.minio_bucket, config)


class SeaweedfsBackend(StorageBackend):
    """SeaweedFS's S3 gateway: identities come from the S3 config file the stack writes at start (the
    project's MINIO_ROOT_USER/PASSWORD as an Admin identity); it has no Kafka bucket notifications, so
    ingest runs with STORAGE_NOTIFICATIONS=none (verification on complete, reconciliation by listing)."""

    name = "seaweedfs"
    can_notify = False

    def setup_notifications(self) -> None:
        """SeaweedFS cannot push S3 object events to Kafka."""
        raise RuntimeError("SeaweedFS has no S3 bucket notifications to Kafka: use STORAGE_NOTIFICATIONS=none")


_BACKENDS: dict[str, type[StorageBackend]] = {"minio": MinioBackend, "seaweedfs": SeaweedfsBackend}


def backend_for(settings: MinioSettings | None = None) -> StorageBackend:
    """The backend named by STORAGE_BACKEND."""
    s = settings or MinioSettings()
    return _BACKENDS[s.storage_backend](s)
