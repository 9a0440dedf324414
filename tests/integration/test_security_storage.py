"""Least-privilege storage (issue 15): `setup-minio` gives the api and ingest MinIO users of their own, each
with a policy limited to what it does. MinIO itself refuses everything else: the api's credentials cannot
list buckets, reach another bucket or quarantine/, or call the admin API, and a URL they presign for
another bucket is refused; ingest's user moves an object into quarantine/ but cannot delete from it."""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterator
from urllib.parse import unquote

import httpx
import pytest
from conftest import Registry
from minio import Minio, MinioAdmin
from minio.credentials import StaticProvider
from minio.error import MinioAdminException, S3Error

from registry_api.kit.presign import Presigner
from registry_api.settings import ApiSettings
from registry_ingest.bucket import Bucket
from registry_shared.settings import MinioSettings
from registry_shared.storage import minio_client, quarantine_key


@pytest.fixture(scope="module")
def root(minio_settings: MinioSettings) -> Minio:
    return minio_client(minio_settings.model_copy(update={"minio_access_key": None, "minio_secret_key": None}))


@pytest.fixture(scope="module")
def api_settings(minio_settings: MinioSettings) -> MinioSettings:
    s = minio_settings.for_service("api")
    assert s.minio_access_key and s.minio_access_key != s.minio_root_user, "API_MINIO_ACCESS_KEY not set"
    return s


@pytest.fixture(scope="module")
def ingest_settings(minio_settings: MinioSettings) -> MinioSettings:
    s = minio_settings.for_service("ingest")
    assert s.minio_access_key and s.minio_access_key != s.minio_root_user, "INGEST_MINIO_ACCESS_KEY not set"
    return s


@pytest.fixture(scope="module")
def other_bucket(root: Minio) -> Iterator[str]:
    name = f"other-{uuid.uuid4().hex[:10]}"
    root.make_bucket(name)
    root.put_object(name, "secret.bin", io.BytesIO(b"not yours"), 9)
    yield name
    root.remove_object(name, "secret.bin")
    root.remove_bucket(name)


def _denied(call) -> None:
    with pytest.raises(S3Error) as info:
        call()
    assert info.value.code == "AccessDenied", info.value


def test_api_credentials_cannot_leave_their_bucket(api_settings: MinioSettings, root: Minio, other_bucket: str):
    api = minio_client(api_settings)
    bucket = api_settings.minio_bucket
    assert [b.name for b in api.list_buckets()] == [bucket]  # MinIO lists only what the policy allows
    _denied(lambda: list(api.list_objects(other_bucket)))
    _denied(lambda: api.get_object(other_bucket, "secret.bin"))
    _denied(lambda: api.put_object(other_bucket, "x.bin", io.BytesIO(b"x"), 1))
    _denied(lambda: api.make_bucket(f"made-{uuid.uuid4().hex[:8]}"))
    # inside its bucket: no quarantine, no deletes, no writes outside uploads/
    key = f"quarantine/uploads/t{uuid.uuid4().hex[:8]}/m/v1/w.bin"
    root.put_object(bucket, key, io.BytesIO(b"bad"), 3)
    _denied(lambda: api.get_object(bucket, key))
    _denied(lambda: api.remove_object(bucket, key))
    _denied(lambda: api.put_object(bucket, f"hf/x{uuid.uuid4().hex[:8]}/y", io.BytesIO(b"x"), 1))
    # what it is for works
    own = f"uploads/t{uuid.uuid4().hex[:8]}/m/v1/w.bin"
    api.put_object(bucket, own, io.BytesIO(b"ok"), 2)
    assert api.get_object(bucket, own).read() == b"ok"
    _denied(lambda: api.remove_object(bucket, own))
    # the /hf upload stages LFS objects under hf-lfs/: put, stat, copy from, and remove them
    staged = f"hf-lfs/t{uuid.uuid4().hex[:8]}/m/{uuid.uuid4().hex}"
    api.put_object(bucket, staged, io.BytesIO(b"lfs"), 3)
    assert api.stat_object(bucket, staged).size == 3
    api.remove_object(bucket, staged)
    root.remove_object(bucket, own)
    root.remove_object(bucket, key)


def test_api_credentials_cannot_call_the_admin_api(api_settings: MinioSettings) -> None:
    admin = MinioAdmin(
        endpoint=api_settings.minio_endpoint,
        credentials=StaticProvider(*api_settings.credentials()),
        secure=api_settings.minio_secure,
    )
    calls = (admin.info, admin.user_list, admin.policy_list, lambda: admin.user_add("evil", "evil-secret-123"))
    for call in calls:
        with pytest.raises(MinioAdminException) as info:
            call()
        assert info.value._code in ("403", 403), info.value


def test_urls_signed_for_another_bucket_are_refused(api_settings: MinioSettings, other_bucket: str, root: Minio):
    settings = ApiSettings(**{**api_settings.model_dump(), "minio_bucket": other_bucket})
    url = Presigner(settings).get_url("secret.bin", 300)
    r = httpx.get(url, timeout=10)
    assert r.status_code == 403 and b"AccessDenied" in r.content
    # the same signer on its own bucket works: the refusal is the policy's, not a broken signature
    key = f"uploads/t{uuid.uuid4().hex[:8]}/m/v1/w.bin"
    root.put_object(api_settings.minio_bucket, key, io.BytesIO(b"served"), 6)
    ok = httpx.get(Presigner(ApiSettings(**api_settings.model_dump())).get_url(key, 300), timeout=10)
    assert ok.status_code == 200 and ok.content == b"served"
    root.remove_object(api_settings.minio_bucket, key)


def test_the_running_api_signs_with_its_own_user(registry: Registry, api_settings: MinioSettings) -> None:
    dev = registry.register()
    repo_id = registry.create_model(dev)
    registry.create_version(dev, repo_id)
    r = registry.http.post(
        f"/v1/dev/models/{repo_id}/versions/v1/uploads/initiate", params={"filename": "a.bin"}, headers=dev.headers
    )
    assert r.status_code == 200, r.text
    assert f"X-Amz-Credential={api_settings.minio_access_key}/" in unquote(r.json()["url"])
    assert httpx.put(r.json()["url"], content=b"abc", timeout=30).status_code == 200


def test_ingest_moves_to_quarantine_with_its_restricted_user(ingest_settings: MinioSettings, root: Minio) -> None:
    bucket = Bucket(minio_client(ingest_settings), ingest_settings.minio_bucket)
    key = f"uploads/t{uuid.uuid4().hex[:8]}/m/v1/bad.bin"
    etag = root.put_object(ingest_settings.minio_bucket, key, io.BytesIO(b"rejected"), 8).etag
    dest = quarantine_key(key)
    assert bucket.move(key, dest, etag)
    assert root.get_object(ingest_settings.minio_bucket, dest).read() == b"rejected"
    assert bucket.stat(key) is None  # the original is gone
    ingest = minio_client(ingest_settings)
    _denied(lambda: ingest.remove_object(ingest_settings.minio_bucket, dest))  # quarantine is kept
    _denied(lambda: ingest.put_object(ingest_settings.minio_bucket, key, io.BytesIO(b"x"), 1))
    assert [b.name for b in ingest.list_buckets()] == [ingest_settings.minio_bucket]
    root.remove_object(ingest_settings.minio_bucket, dest)
