"""The fast SigV4 GET signer produces exactly the MinIO SDK's URLs."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from registry_api.kit.presign import Presigner
from registry_api.settings import ApiSettings


@pytest.mark.parametrize(
    "key",
    [
        "uploads/acme/bert/v1/model.safetensors",
        "uploads/acme/bert/v1/dir with space/ünïcode+plus&amp=x.bin",
        "hf/a/b/~tilde/(paren)/*star*.json",
    ],
)
@pytest.mark.parametrize("expires", [60, 3600, 86400])
def test_fast_signer_matches_the_sdk(key, expires):
    settings = ApiSettings(
        minio_endpoint="127.0.0.1:19000", minio_root_user="user/with+chars", minio_region="us-east-1"
    )
    signer = Presigner(settings)
    for now in (datetime(2026, 11, 27, 0, 0, 1, tzinfo=UTC), datetime(2030, 1, 31, 23, 59, 59, tzinfo=UTC)):
        assert signer.get_url(key, expires, now) == signer.sdk_get_url(key, expires, now)


def test_public_endpoint_is_used_for_urls():
    settings = ApiSettings(
        minio_endpoint="minio:9000", minio_public_endpoint="files.example.com:443", minio_secure=True
    )
    url = Presigner(settings).get_url("k", 60)
    assert url.startswith("https://files.example.com:443/models/k?")
