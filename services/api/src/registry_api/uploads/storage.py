"""The S3 multipart calls of the api: create, list parts, complete, abort (blocking minio-py calls).

Part URLs are signed locally (kit/presign.py); these calls go to MinIO's S3 API on the internal
endpoint (MINIO_ENDPOINT). minio-py exposes the multipart operations as its low-level methods
(`_create_multipart_upload`, ...), which its own `put_object` uses. Run them in a thread.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from minio import Minio
from minio.datatypes import Part
from minio.error import S3Error

from registry_shared.settings import MinioSettings
from registry_shared.storage import minio_client

_MISSING_UPLOAD = {"NoSuchUpload"}
_MISSING_OBJECT = {"NoSuchKey", "NoSuchObject"}


class UploadGone(Exception):
    """The S3 multipart upload does not exist (any more): completed, aborted or expired."""


class PartsRejected(Exception):
    """Object storage refused the part list of a complete (a part missing, an ETag that does not match...)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class StoredPart:
    """A part held by object storage."""

    part_number: int
    etag: str
    size: int
    last_modified: int | None


def normalize_etag(etag: str) -> str:
    """An ETag as compared: without quotes, lower case."""
    return etag.strip().strip('"').lower()


def multipart_etag(part_etags: list[str]) -> str | None:
    """The ETag S3 (and MinIO) give an object assembled from parts: md5 of the parts' binary MD5s, `-<count>`.

    None if a part's ETag is not a plain MD5 (encrypted objects): then it cannot be predicted. This is an
    identity of the object version, never an MD5 of its bytes.
    """
    try:
        digests = b"".join(bytes.fromhex(normalize_etag(e)) for e in part_etags)
    except ValueError:
        return None
    if len(digests) != 16 * len(part_etags):
        return None
    return f"{hashlib.md5(digests).hexdigest()}-{len(part_etags)}"  # noqa: S324 (the S3 ETag, not security)


class MultipartStorage:
    """S3 multipart operations on the registry's bucket."""

    def __init__(self, settings: MinioSettings, client: Minio | None = None) -> None:
        self.client = client or minio_client(settings)
        self.bucket = settings.minio_bucket

    def create(self, object_key: str) -> str:
        """Start a multipart upload to `object_key`; returns S3's upload id."""
        return self.client._create_multipart_upload(
            self.bucket, object_key, {"Content-Type": "application/octet-stream"}
        )

    def list_parts(self, object_key: str, s3_upload_id: str) -> list[StoredPart]:
        """Every part stored so far (all pages of ListParts); raises UploadGone."""
        parts: list[StoredPart] = []
        marker: str | None = None
        while True:
            try:
                result = self.client._list_parts(
                    self.bucket, object_key, s3_upload_id, max_parts=1000, part_number_marker=marker
                )
            except S3Error as exc:
                if exc.code in _MISSING_UPLOAD:
                    raise UploadGone(s3_upload_id) from None
                raise
            parts.extend(
                StoredPart(
                    part_number=p.part_number,
                    etag=normalize_etag(p.etag),
                    size=p.size or 0,
                    last_modified=int(p.last_modified.timestamp()) if p.last_modified else None,
                )
                for p in result.parts
            )
            if not result.is_truncated or not result.next_part_number_marker:
                return parts
            marker = result.next_part_number_marker

    def complete(self, object_key: str, s3_upload_id: str, parts: list[tuple[int, str]]) -> str:
        """Assemble the object from (part_number, etag); returns its ETag. Raises UploadGone, PartsRejected."""
        try:
            result = self.client._complete_multipart_upload(
                self.bucket, object_key, s3_upload_id, [Part(n, normalize_etag(e)) for n, e in parts]
            )
        except S3Error as exc:
            if exc.code in _MISSING_UPLOAD:
                raise UploadGone(s3_upload_id) from None
            if exc.code in {"InvalidPart", "InvalidPartOrder", "EntityTooSmall"}:
                raise PartsRejected(exc.code, exc.message or exc.code) from None
            raise
        return normalize_etag(result.etag or "")

    def abort(self, object_key: str, s3_upload_id: str) -> None:
        """Abort the upload and delete its parts (nothing to do if it is gone already)."""
        try:
            self.client._abort_multipart_upload(self.bucket, object_key, s3_upload_id)
        except S3Error as exc:
            if exc.code not in _MISSING_UPLOAD:
                raise

    def object_etag(self, object_key: str) -> str | None:
        """The ETag of the object at `object_key`, None if there is none."""
        try:
            return normalize_etag(self.client.stat_object(self.bucket, object_key).etag or "")
        except S3Error as exc:
            if exc.code in _MISSING_OBJECT:
                return None
            raise
