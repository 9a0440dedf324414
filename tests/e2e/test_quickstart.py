"""The spec's quick starts (1.0.0 developer → admin → platform, and 0.3.0 register → list), with real
HTTP against the running stack: presigned PUT of real bytes, verification by the ingest service, and a
download through the returned URL that yields the same bytes."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time

import httpx


def safetensors_bytes() -> bytes:
    """A small valid safetensors file: one float32 tensor of 4 values."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    return struct.pack("<Q", len(header)) + header + struct.pack("<4f", 1, 2, 3, 4)


def test_developer_admin_platform_quickstart(registry):
    http = registry.http
    # Developer
    dev = registry.register("Dev")
    repo = registry.create_model(dev, "private")
    registry.create_version(dev, repo, "v1")
    data = os.urandom(256 * 1024 + 3)
    r = http.post(
        f"/v1/dev/models/{repo}/versions/v1/uploads/initiate",
        params={"filename": "model.safetensors", "expires": 900},
        headers=dev.headers,
    )
    assert r.status_code == 200
    up = r.json()
    assert up["method"] == "PUT" and up["expires_in"] == 900
    assert httpx.put(up["url"], content=data).status_code == 200
    # Not served before verification
    r = http.post(
        f"/v1/dev/models/{repo}/versions/v1/uploads/complete",
        headers=dev.headers,
        json={"rfilename": "model.safetensors", "size": len(data), "sha256": hashlib.sha256(data).hexdigest()},
    )
    assert r.status_code == 200 and r.json()["status"] == "pending_verification"
    verdict = registry.wait_upload(dev, up["upload_id"])
    # random bytes are not a valid safetensors file: ingest must refuse them
    assert verdict["status"] == "rejected" and verdict["reason"] == "bad_safetensors_header", verdict

    # A correct file goes through; the rejected name can be uploaded again, correctly this time
    payload = os.urandom(300_000)
    registry.publish(dev, repo, "v1", "weights/model.bin", payload)
    registry.publish(dev, repo, "v1", "model.safetensors", safetensors_bytes())

    # Admin: platform user and grant
    plat = registry.create_user("platform", "Plat")
    assert http.get(f"/v1/models/{repo}", headers=plat.headers).status_code == 404  # not granted yet
    registry.grant(plat, repo, int(time.time()) - 1)

    # Platform: manifest and download
    r = http.get("/v1/platform/manifest", params={"presign": "true", "expires": 600}, headers=plat.headers)
    assert r.status_code == 200
    item = next(i for i in r.json()["items"] if i["repo_id"] == repo)
    files = item["versions"][0]["files"]
    assert [f["rfilename"] for f in files] == ["model.safetensors", "weights/model.bin"]
    by_name = {f["rfilename"]: f for f in files}
    assert httpx.get(by_name["weights/model.bin"]["presigned_url"]).content == payload
    assert httpx.get(by_name["model.safetensors"]["presigned_url"]).content == safetensors_bytes()

    r = http.get(
        f"/v1/files/{repo}/weights/model.bin/download", params={"version": "v1", "expires": 900}, headers=plat.headers
    )
    assert r.status_code == 200
    body = r.json()
    assert body["sha256"] == hashlib.sha256(payload).hexdigest() and body["size"] == len(payload)
    assert body["expires_in"] == 900
    assert httpx.get(body["url"]).content == payload
    # URL-encoded repo_id and file name work too
    r = http.get(f"/v1/files/{repo.replace('/', '%2F')}/weights%2Fmodel.bin/download", headers=plat.headers)
    assert r.status_code == 200 and r.json()["object_key"] == body["object_key"]

    # The catalog reflects the available file only
    model = http.get(f"/v1/models/{repo}", headers=plat.headers).json()
    assert model["file_count"] == 2 and model["has_bin"] == 1 and model["has_safetensors"] == 1
    manifest = http.get(f"/v1/manifest/{repo}", headers=dev.headers).json()
    assert manifest["schema"] == "hf-model-manifest/v1"
    assert [f["rfilename"] for f in manifest["files"]] == ["model.safetensors", "weights/model.bin"]
    uploads = http.get(f"/v1/dev/models/{repo}/versions/v1/uploads", headers=dev.headers).json()["items"]
    assert [(u["rfilename"], u["status"], u["reason"]) for u in uploads] == [
        ("model.safetensors", "rejected", "bad_safetensors_header"),
        ("weights/model.bin", "available", None),
        ("model.safetensors", "available", None),
    ]


def test_v030_quickstart_register_and_list(registry):
    r = registry.http.post("/v1/users/register", json={"email": f"you-{time.time_ns()}@example.com", "name": "You"})
    assert r.status_code == 200
    key = r.json()["api_key"]
    assert key.startswith("sk_live_")
    r = registry.http.get("/v1/models", params={"limit": 5}, headers={"x-api-key": key})
    assert r.status_code == 200 and len(r.json()["items"]) <= 5
    assert registry.http.get("/healthz").json()["ok"] is True
