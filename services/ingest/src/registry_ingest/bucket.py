"""The few object-storage operations ingest performs (blocking minio-py calls: run them in a thread)."""

from __future__ import annotations

import http.client
import itertools
import logging
from dataclasses import dataclass
from typing import Any

from minio import Minio
from minio.commonconfig import CopySource
from minio.error import S3Error

log = logging.getLogger(__name__)

_MISSING = {"NoSuchKey", "NoSuchObject", "NoSuchVersion"}


class ObjectMissing(Exception):
    """The object is not (or no longer) in the bucket."""


@dataclass
class OpenedObject:
    """A GET in progress: its headers, and `readinto` that fills a caller's buffer straight from the socket."""

    response: Any
    size: int | None
    etag: str | None
    version_id: str | None

    def readinto(self, view: memoryview) -> int:
        """Fill `view` with the next bytes of the body; 0 at the end."""
        fp = getattr(self.response, "_fp", None)
        # http.client's readinto writes into our buffer without an intermediate bytes object; urllib3's own
        # read() would allocate and copy every chunk. Only valid when urllib3 does not decode the body.
        if isinstance(fp, http.client.HTTPResponse) and not self.response.headers.get("Content-Encoding"):
            return fp.readinto(view)
        data = self.response.read(len(view))
        view[: len(data)] = data
        return len(data)

    def close(self, *, reuse: bool) -> None:
        """Finish the GET: return the connection to the pool after a full read, drop it otherwise."""
        try:
            if reuse:
                self.response.release_conn()
            else:
                self.response.close()
        except Exception:  # closing is best effort
            log.debug("closing a GET failed", exc_info=True)


class Bucket:
    """One bucket of a MinIO client."""

    def __init__(self, client: Minio, name: str) -> None:
        self.client = client
        self.name = name

    def open(self, key: str) -> OpenedObject:
        """Start streaming an object; raises ObjectMissing."""
        try:
            resp = self.client.get_object(self.name, key)
        except S3Error as exc:
            if exc.code in _MISSING:
                raise ObjectMissing(key) from None
            raise
        length = resp.headers.get("Content-Length")
        return OpenedObject(
            response=resp,
            size=int(length) if length is not None else None,
            etag=(resp.headers.get("ETag") or "").strip('"') or None,
            version_id=resp.headers.get("x-amz-version-id"),
        )

    def stat(self, key: str) -> tuple[str | None, int | None] | None:
        """(etag, size) of an object, or None if it does not exist."""
        try:
            st = self.client.stat_object(self.name, key)
        except S3Error as exc:
            if exc.code in _MISSING:
                return None
            raise
        return (st.etag or "").strip('"') or None, st.size

    def move(self, key: str, dest: str, etag: str | None) -> bool:
        """Server-side copy `key` to `dest`, then delete `key`, while `key` is still version `etag`.

        Idempotent: if `key` is already gone and `dest` exists, the move happened before (a retry after a
        crash). Returns True if `dest` holds the object afterwards.
        """
        current = self.stat(key)
        if current is None:
            return self.stat(dest) is not None
        if etag is not None and current[0] != etag:
            # Replaced by a newer upload since the verdict: that one is judged on its own.
            log.warning("not moving %s: now version %s, not %s", key, current[0], etag, extra={"fields": {"key": key}})
            return self.stat(dest) is not None
        try:
            self.client.copy_object(self.name, dest, CopySource(self.name, key, match_etag=etag))
        except S3Error as exc:
            if exc.code in _MISSING or exc.code == "PreconditionFailed":
                return self.stat(dest) is not None
            raise
        self.client.remove_object(self.name, key)
        return True

    def remove(self, key: str, etag: str | None) -> None:
        """Delete `key` if it is still version `etag` (any version if None)."""
        current = self.stat(key)
        if current is None or (etag is not None and current[0] != etag):
            return
        self.client.remove_object(self.name, key)

    def list_page(self, prefix: str, after: str | None, limit: int) -> list[tuple[str, str | None, int | None]]:
        """(key, etag, size) of at most `limit` objects under `prefix` whose keys sort after `after`, in key
        order: one ListObjectsV2 request (max-keys=`limit`, start-after=`after`). Fewer than `limit` means the
        listing reached the end of the prefix."""
        objects = self.client._list_objects(
            self.name, prefix=prefix, start_after=after, max_keys=limit, encoding_type="url"
        )
        return [
            (o.object_name, (o.etag or "").strip('"') or None, o.size)
            for o in itertools.islice(objects, limit)
            if o.object_name is not None and not o.is_dir
        ]

    def abort_multipart(self, key: str, s3_upload_id: str) -> None:
        """Abort a multipart upload of `key`: its parts are deleted (nothing to do if it is gone already)."""
        try:
            self.client._abort_multipart_upload(self.name, key, s3_upload_id)
        except S3Error as exc:
            if exc.code != "NoSuchUpload":
                raise
