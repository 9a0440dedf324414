"""The 0.3.0 catalog: imported models keep the spec's default object key `hf/{repo_id}/{rfilename}`,
or the `uploads` override, and are served like any other file."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import uuid

import httpx

from registry_shared.storage import minio_client


def test_imported_catalog_is_served_with_default_and_override_keys(registry, minio_settings):
    repo = f"imp{uuid.uuid4().hex[:8]}/Llama-3-8B"
    tok, weights = b'{"tok": 1}', b"w" * 4096
    client = minio_client(minio_settings)
    client.put_object(minio_settings.minio_bucket, f"hf/{repo}/tokenizer.json", io.BytesIO(tok), len(tok))
    override = f"mirror/{uuid.uuid4().hex}/model.safetensors"
    client.put_object(minio_settings.minio_bucket, override, io.BytesIO(weights), len(weights))
    line = {
        "repo_id": repo,
        "model_name": "Llama-3-8B",
        "pipeline_tag": "text-generation",
        "license": "llama3",
        "parameters": 8_000_000_000,
        "likes": 678,
        "created_at": "2024-01-10T00:00:00Z",
        "tags": "llama3, meta",
        "files": [
            {"rfilename": "tokenizer.json", "size": len(tok), "sha256": hashlib.sha256(tok).hexdigest()},
            {
                "rfilename": "model.safetensors",
                "size": len(weights),
                "sha256": hashlib.sha256(weights).hexdigest(),
                "object_key": override,
            },
        ],
    }
    r = subprocess.run(
        ["uv", "run", "--no-sync", "registry-api-import", "-"], input=json.dumps(line), capture_output=True, text=True
    )
    assert r.returncode == 0 and "imported 1 models" in r.stdout, r.stderr
    dev = registry.register("Reader")
    model = registry.http.get(f"/v1/models/{repo}", headers=dev.headers).json()
    assert (model["parameters_readable"], model["file_count"], model["has_safetensors"], model["likes"]) == (
        "8B",
        2,
        1,
        678,
    )
    assert model["created_at"] == "2024-01-10T00:00:00Z"
    files = registry.http.get(f"/v1/models/{repo}/files", params={"presign": "true"}, headers=dev.headers).json()
    keys = {f["rfilename"]: f["object_key"] for f in files["items"]}
    assert keys == {"tokenizer.json": f"hf/{repo}/tokenizer.json", "model.safetensors": override}
    for f in files["items"]:
        assert httpx.get(f["presigned_url"]).content == (tok if f["rfilename"] == "tokenizer.json" else weights)
    d = registry.http.get(f"/v1/files/{repo}/tokenizer.json/download", headers=dev.headers).json()
    assert d["object_key"] == f"hf/{repo}/tokenizer.json" and d["version"] is None
    assert httpx.get(d["url"]).content == tok
