"""Presigned URLs for MinIO, computed locally (no request to MinIO on the hot path)."""

from __future__ import annotations

from datetime import timedelta

from minio import Minio

from registry_api.settings import ApiSettings
from registry_shared.storage import minio_client

EXPIRES_MIN = 60
EXPIRES_MAX = 86400
EXPIRES_DEFAULT = 3600


class Presigner:
    """Signs GET and PUT URLs for the bucket with the host clients use (MINIO_PUBLIC_ENDPOINT)."""

    def __init__(self, settings: ApiSettings) -> None:
        endpoint = settings.minio_public_endpoint or settings.minio_endpoint
        self._client: Minio = minio_client(settings.model_copy(update={"minio_endpoint": endpoint}))
        self.bucket = settings.minio_bucket

    def get_url(self, object_key: str, expires: int) -> str:
        """A presigned GET of `object_key`, valid `expires` seconds."""
        return self._client.presigned_get_object(self.bucket, object_key, expires=timedelta(seconds=expires))

    def put_url(self, object_key: str, expires: int) -> str:
        """A presigned PUT to `object_key`, valid `expires` seconds."""
        return self._client.presigned_put_object(self.bucket, object_key, expires=timedelta(seconds=expires))
