"""Object storage: the MinIO client and the layout of object keys in the bucket."""

from __future__ import annotations

from minio import Minio

from registry_shared.settings import MinioSettings, minio_settings

#: Objects that failed verification or appeared without an upload are moved under this prefix.
QUARANTINE_PREFIX = "quarantine/"
#: Files of the 0.3.0 catalog without an upload behind them (the spec's default key pattern).
LEGACY_PREFIX = "hf/"
#: Files uploaded to a version through the developer API.
UPLOAD_PREFIX = "uploads/"
#: LFS objects staged by the Hugging Face–compatible upload (/hf) until a commit copies them under uploads/.
HF_LFS_PREFIX = "hf-lfs/"


def legacy_object_key(repo_id: str, rfilename: str) -> str:
    """The spec's default key: `hf/{repo_id}/{rfilename}`."""
    return f"{LEGACY_PREFIX}{repo_id}/{rfilename}"


def upload_object_key(repo_id: str, version: str, rfilename: str) -> str:
    """Where a developer's upload of `rfilename` to `version` is stored.

    `repo_id` is always two segments and `version` has no slash, so the key splits unambiguously.
    """
    return f"{UPLOAD_PREFIX}{repo_id}/{version}/{rfilename}"


def quarantine_key(object_key: str) -> str:
    """Where a rejected or stray object is kept for inspection (never served)."""
    return f"{QUARANTINE_PREFIX}{object_key}"


def minio_client(settings: MinioSettings | None = None) -> Minio:
    """A MinIO client from settings: MINIO_ENDPOINT, ... as in the spec, with the service's own credentials
    when the settings carry them (MinioSettings.for_service), else the root user's."""
    s = settings or minio_settings()
    access, secret = s.credentials()
    return Minio(
        s.minio_endpoint,
        access_key=access,
        secret_key=secret,
        secure=s.minio_secure,
        region=s.minio_region,
    )
