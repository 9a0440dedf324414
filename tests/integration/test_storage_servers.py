"""Every storage operation of the registry against each S3 server it supports: MinIO and SeaweedFS.

The api's own signer (kit/presign.py) signs the URLs, the api's multipart calls (uploads/storage.py) and
ingest's bucket operations (bucket.py: read, HEAD, CopyObject to quarantine with an ETag condition, delete,
bounded ListObjectsV2) run as in the services, against a real server each: path-style SigV4 throughout.
test.sh starts SeaweedFS beside MinIO (SEAWEEDFS_TEST_ENDPOINT); these tests fail, not skip, without it.
"""

from __future__ import annotations

import hashlib
import io
import os
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from minio import Minio

from registry_api.kit.presign import Presigner
from registry_api.settings import ApiSettings
from registry_api.uploads.storage import MultipartStorage, UploadGone, multipart_etag
from registry_ingest.bucket import Bucket, ObjectMissing
from registry_shared.settings import MinioSettings
from registry_shared.storage import minio_client, quarantine_key
from registry_shared.storage_backend import backend_for

pytestmark = pytest.mark.timeout(120)

SERVERS = ["minio", "seaweedfs"]


def _settings(server: str) -> MinioSettings:
    base = MinioSettings()
    if server == "minio":
        return base
    endpoint = os.environ.get("SEAWEEDFS_TEST_ENDPOINT")
    assert endpoint, "SEAWEEDFS_TEST_ENDPOINT is not set: run the tests through deploy/local/test.sh"
    return base.model_copy(update={"minio_endpoint": endpoint, "storage_backend": "seaweedfs"})


class Store:
    """One server: its settings, an SDK client, the api's signer and multipart calls, ingest's bucket."""

    def __init__(self, server: str) -> None:
        self.server = server
        self.settings = _settings(server)
        self.client: Minio = minio_client(self.settings)
        api = ApiSettings(**{k: getattr(self.settings, k) for k in MinioSettings.model_fields})
        self.presigner = Presigner(api)
        self.multipart = MultipartStorage(self.settings)
        self.bucket = Bucket(self.client, self.settings.minio_bucket)
        self.prefix = f"itest-storage-{uuid.uuid4().hex[:8]}/uploads/"

    def cleanup(self) -> None:
        for p in (self.prefix, quarantine_key(self.prefix)):
            for obj in self.client.list_objects(self.settings.minio_bucket, prefix=p, recursive=True):
                self.client.remove_object(self.settings.minio_bucket, obj.object_name)


@pytest.fixture(params=SERVERS)
def store(request) -> Iterator[Store]:
    s = Store(request.param)
    backend_for(s.settings).setup_bucket()  # idempotent: the stack created it already
    try:
        yield s
    finally:
        s.cleanup()


KEYS = ["acme/bert/v1/model.safetensors", "acme/bert/v1/dir with space/ünïcode+plus&amp=x.bin"]


@pytest.mark.parametrize("name", KEYS, ids=["plain", "escaped"])
def test_presigned_put_and_get_are_accepted(store, name):
    key = store.prefix + name
    body = os.urandom(70_000)
    put = httpx.put(store.presigner.put_url(key, 300), content=body, timeout=30)
    assert put.status_code == 200, put.text
    got = httpx.get(store.presigner.get_url(key, 300), timeout=30)
    assert got.status_code == 200, got.text
    assert got.content == body
    # Ranged GET through the same URL (the client's segmented downloads).
    part = httpx.get(store.presigner.get_url(key, 300), headers={"Range": "bytes=10-19"}, timeout=30)
    assert part.status_code == 206 and part.content == body[10:20]


def test_a_tampered_or_expired_url_is_refused(store):
    key = store.prefix + "acme/bert/v1/secret.bin"
    store.client.put_object(store.settings.minio_bucket, key, io.BytesIO(b"secret"), 6)
    url = store.presigner.get_url(key, 300)
    assert httpx.get(url.replace(key.split("/")[-1], "other.bin"), timeout=30).status_code == 403
    stale = store.presigner.get_url(key, 1, datetime.now(UTC) - timedelta(minutes=10))
    assert httpx.get(stale, timeout=30).status_code == 403
    other = Presigner(ApiSettings(minio_endpoint=store.settings.minio_endpoint, minio_root_password="wrong-secret"))
    assert httpx.get(other.get_url(key, 300), timeout=30).status_code == 403


def test_multipart_with_presigned_part_urls(store):
    key = store.prefix + "acme/bert/v1/big.gguf"
    parts = [os.urandom(5 * 1024 * 1024), os.urandom(1234)]
    s3_id = store.multipart.create(key)
    etags = []
    for n, data in enumerate(parts, start=1):
        resp = httpx.put(store.presigner.part_url(key, s3_id, n, 300), content=data, timeout=60)
        assert resp.status_code == 200, resp.text
        etags.append(resp.headers["ETag"].strip('"'))
    listed = store.multipart.list_parts(key, s3_id)
    assert [(p.part_number, p.size) for p in listed] == [(1, len(parts[0])), (2, len(parts[1]))]
    etag = store.multipart.complete(key, s3_id, list(enumerate(etags, start=1)))
    assert etag == multipart_etag(etags)  # the ETag the api predicts for a complete it retries
    whole = b"".join(parts)
    got = httpx.get(store.presigner.get_url(key, 300), timeout=60)
    assert hashlib.sha256(got.content).hexdigest() == hashlib.sha256(whole).hexdigest()
    # Completed: the S3 upload is gone.
    with pytest.raises(UploadGone):
        store.multipart.list_parts(key, s3_id)


def test_a_reuploaded_part_is_the_one_completed(store):
    """Re-uploading a part replaces it for the complete that names its ETag (SeaweedFS lists both uploads of
    the part until then; S3 and MinIO only the last)."""
    key = store.prefix + "acme/bert/v1/redo.gguf"
    s3_id = store.multipart.create(key)
    first, second = os.urandom(5 * 1024 * 1024), os.urandom(5 * 1024 * 1024)
    for data in (first, second):
        resp = httpx.put(store.presigner.part_url(key, s3_id, 1, 300), content=data, timeout=60)
        assert resp.status_code == 200
    etag = resp.headers["ETag"].strip('"')
    assert etag in {p.etag for p in store.multipart.list_parts(key, s3_id) if p.part_number == 1}
    store.multipart.complete(key, s3_id, [(1, etag)])
    got = httpx.get(store.presigner.get_url(key, 300), timeout=60)
    assert got.content == second


def test_multipart_abort_deletes_the_upload(store):
    key = store.prefix + "acme/bert/v1/aborted.gguf"
    s3_id = store.multipart.create(key)
    resp = httpx.put(store.presigner.part_url(key, s3_id, 1, 300), content=b"x" * 1000, timeout=30)
    assert resp.status_code == 200
    store.bucket.abort_multipart(key, s3_id)
    with pytest.raises(UploadGone):
        store.multipart.list_parts(key, s3_id)
    store.bucket.abort_multipart(key, s3_id)  # idempotent


def test_ingest_reads_heads_and_moves_to_quarantine(store):
    key = store.prefix + "acme/bert/v1/bad.safetensors"
    body = os.urandom(100_000)
    store.client.put_object(store.settings.minio_bucket, key, io.BytesIO(body), len(body))
    etag, size = store.bucket.stat(key)
    assert size == len(body) and etag

    opened = store.bucket.open(key)
    buf, got = bytearray(len(body) + 10), 0
    view = memoryview(buf)
    while n := opened.readinto(view[got:]):
        got += n
    opened.close(reuse=True)
    assert (opened.size, opened.etag, bytes(buf[:got])) == (len(body), etag, body)

    # A stale ETag: CopyObject's x-amz-copy-source-if-match refuses, nothing moves.
    assert store.bucket.move(key, quarantine_key(key), "0" * 32) is False
    assert store.bucket.stat(key) is not None
    # The right one: copied, then deleted; a repeat (after a crash) is a no-op that reports success.
    assert store.bucket.move(key, quarantine_key(key), etag) is True
    assert store.bucket.stat(key) is None
    assert store.bucket.stat(quarantine_key(key))[1] == len(body)
    assert store.bucket.move(key, quarantine_key(key), etag) is True
    with pytest.raises(ObjectMissing):
        store.bucket.open(key)
    store.bucket.remove(quarantine_key(key), None)
    assert store.bucket.stat(quarantine_key(key)) is None


def test_bounded_listing_pages_through_the_prefix(store):
    keys = sorted(f"{store.prefix}acme/m/1.0.0/f{i}.bin" for i in range(5))
    for k in keys:
        store.client.put_object(store.settings.minio_bucket, k, io.BytesIO(b"abc"), 3)
    seen, after, requests = [], None, 0
    while True:
        page = store.bucket.list_page(store.prefix, after, 2)
        requests += 1
        assert len(page) <= 2
        seen += page
        if len(page) < 2:
            break
        after = page[-1][0]
    assert [k for k, _, _ in seen] == keys
    assert all(size == 3 and etag for _, etag, size in seen)
    assert requests == 3
