"""Catalog behaviour beyond authorization: caches that never outlive a revocation, registration
policies, the change feed, search and paging, OpenAPI completeness."""

from __future__ import annotations

import time

import httpx
import pytest
from conftest import seed_file, spawn_api, stop_process

from registry_api.kit.validate import REPO_ID_PATTERN, VERSION_PATTERN


@pytest.fixture(scope="module")
def second_api():
    proc, base = spawn_api()
    yield base
    stop_process(proc)


def test_revoking_a_grant_stops_cached_downloads_at_once_in_every_process(
    registry, second_api, pg_settings, minio_settings
):
    dev = registry.register("Cache")
    repo = registry.create_model(dev, "private")
    registry.create_version(dev, repo, "v1")
    seed_file(pg_settings, minio_settings, repo, "v1")
    plat = registry.create_user("platform")
    grant = registry.grant(plat, repo)
    path = f"/v1/files/{repo}/config/model.safetensors/download"
    for base in (registry.http.base_url, second_api):
        for _ in range(3):  # warm the caches
            assert httpx.get(f"{base}{path}", headers=plat.headers).status_code == 200
    assert registry.http.delete(f"/v1/admin/grants/{grant['grant_id']}", headers=registry.admin).status_code == 200
    assert httpx.get(f"{registry.http.base_url}{path}", headers=plat.headers).status_code == 404
    deadline = time.monotonic() + 0.5  # the other process hears NOTIFY within milliseconds
    while httpx.get(f"{second_api}{path}", headers=plat.headers).status_code != 404:
        assert time.monotonic() < deadline, "a revoked grant still served downloads in another process"
        time.sleep(0.01)


def test_grant_window_end_is_honoured_by_the_cache(registry, pg_settings, minio_settings):
    dev = registry.register("Window")
    repo = registry.create_model(dev, "private")
    registry.create_version(dev, repo, "v1")
    seed_file(pg_settings, minio_settings, repo, "v1")
    plat = registry.create_user("platform")
    now = int(time.time())
    registry.grant(plat, repo, now - 10, now + 2)
    path = f"/v1/files/{repo}/config/model.safetensors/download"
    assert registry.http.get(path, headers=plat.headers).status_code == 200
    time.sleep(max(0.0, now + 2 - time.time()) + 0.05)
    assert registry.http.get(path, headers=plat.headers).status_code == 404


def test_rotated_key_fails_at_once_in_another_process(registry, second_api):
    dev = registry.register("Rot2")
    assert httpx.get(f"{second_api}/v1/users/me", headers=dev.headers).status_code == 200  # cached there
    assert registry.http.post("/v1/users/rotate-key", headers=dev.headers).status_code == 200
    deadline = time.monotonic() + 0.5
    while httpx.get(f"{second_api}/v1/users/me", headers=dev.headers).status_code != 401:
        assert time.monotonic() < deadline, "a rotated key still worked in another process"
        time.sleep(0.01)


@pytest.mark.parametrize(
    ("env", "email", "status"),
    [
        ({"REGISTRATION_POLICY": "closed"}, "a@example.com", 403),
        ({"REGISTRATION_POLICY": "allowlist", "REGISTRATION_EMAIL_DOMAINS": "good.io"}, "a@bad.io", 403),
        ({"REGISTRATION_POLICY": "allowlist", "REGISTRATION_EMAIL_DOMAINS": "good.io, other.org"}, None, 200),
    ],
)
def test_registration_policy(env, email, status):
    proc, base = spawn_api(**env)
    try:
        email = email or f"x{time.time_ns()}@good.io"
        r = httpx.post(f"{base}/v1/users/register", json={"email": email, "name": "x"})
        assert r.status_code == status, r.text
        if status == 403:
            assert set(r.json()) == {"detail"}
    finally:
        stop_process(proc)


def test_search_paging_and_change_feed(registry):
    dev = registry.register("Feed")
    marker = f"zz{time.time_ns()}"
    repos = [registry.create_model(dev, "public", tags=marker, author=f"{marker}-author") for _ in range(3)]
    r = registry.http.get("/v1/models", params={"q": f"{marker}-author", "limit": 2}, headers=dev.headers)
    page1 = [m["repo_id"] for m in r.json()["items"]]
    r = registry.http.get("/v1/models", params={"q": f"{marker}-author", "limit": 2, "offset": 2}, headers=dev.headers)
    page2 = [m["repo_id"] for m in r.json()["items"]]
    assert sorted(page1 + page2) == sorted(repos) and len(page1) == 2
    before = min(
        m["last_update_ts"]
        for m in registry.http.get("/v1/models", params={"q": f"{marker}-author"}, headers=dev.headers).json()["items"]
    )
    r = registry.http.get("/v1/changes", params={"since": before - 1, "limit": 2000}, headers=dev.headers)
    items = r.json()["items"]
    assert set(repos) <= {i["repo_id"] for i in items}
    assert all(i["last_update_ts"] > before - 1 for i in items)
    assert [i["last_update_ts"] for i in items] == sorted(i["last_update_ts"] for i in items)
    r = registry.http.get("/v1/models", params={"updated_since": 4_000_000_000}, headers=dev.headers)
    assert r.json()["items"] == []


def test_model_item_has_exactly_the_spec_fields(registry):
    dev = registry.register("Shape")
    repo = registry.create_model(dev, "public", parameters=8_000_000_000, pipeline_tag="text-generation", license="mit")
    item = registry.http.get(f"/v1/models/{repo}", headers=dev.headers).json()
    assert set(item) == {
        "repo_id", "canonical_url", "model_name", "author", "pipeline_tag", "license", "parameters",
        "parameters_readable", "downloads", "likes", "created_at", "last_modified", "languages", "tags",
        "last_update_ts", "file_count", "has_safetensors", "has_bin",
    }  # fmt: skip
    assert item["parameters_readable"] == "8B" and item["author"] == repo.split("/")[0]
    assert item["created_at"].endswith("Z") and isinstance(item["last_update_ts"], int)
    assert (item["file_count"], item["has_safetensors"], item["has_bin"]) == (0, 0, 0)


def test_openapi_documents_every_endpoint_with_errors(registry):
    spec = registry.http.get("/openapi.json").json()
    paths = spec["paths"]
    expected = [
        ("get", "/healthz"),
        ("post", "/v1/users/register"),
        ("post", "/v1/users/rotate-key"),
        ("get", "/v1/users/me"),
        ("get", "/v1/users/me/usage"),
        ("get", "/v1/models"),
        ("get", "/v1/models/{repo_id}"),
        ("get", "/v1/models/{repo_id}/files"),
        ("get", "/v1/files/{file_path}/download"),
        ("get", "/v1/manifest/{repo_id}"),
        ("get", "/v1/changes"),
        ("get", "/v1/admin/usage"),
        ("post", "/v1/admin/users"),
        ("post", "/v1/admin/grants"),
        ("get", "/v1/admin/grants"),
        ("get", "/v1/admin/grants/{grant_id}"),
        ("patch", "/v1/admin/grants/{grant_id}"),
        ("delete", "/v1/admin/grants/{grant_id}"),
        ("post", "/v1/dev/models"),
        ("post", "/v1/dev/models/{repo_id}/versions"),
        ("post", "/v1/dev/models/{repo_id}/versions/{version}/uploads/initiate"),
        ("post", "/v1/dev/models/{repo_id}/versions/{version}/uploads/complete"),
        ("get", "/v1/platform/manifest"),
    ]
    for method, path in expected:
        op = paths[path][method]
        assert op.get("summary"), (method, path)
        if path != "/healthz":
            codes = set(op["responses"])
            assert codes & {"401", "422", "503"}, (method, path, codes)
            for code in codes - {"200", "201"}:
                schema = op["responses"][code]["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/ErrorOut"}, (method, path, code)
    assert registry.http.get("/docs").status_code == 200
    assert registry.http.get("/redoc").status_code == 200


def test_catalog_downloads_counter_counts_real_downloads(registry, pg_settings, minio_settings):
    dev = registry.register("Counter")
    repo = registry.create_model(dev, "public")
    registry.create_version(dev, repo, "v1")
    seed_file(pg_settings, minio_settings, repo, "v1")
    reader = registry.register("Reader")
    for _ in range(5):
        assert (
            registry.http.get(f"/v1/files/{repo}/config/model.safetensors/download", headers=reader.headers).status_code
            == 200
        )
    registry.http.get(f"/v1/manifest/{repo}", headers=reader.headers)  # not a download: not counted
    deadline = time.monotonic() + 20
    while (n := registry.http.get(f"/v1/models/{repo}", headers=dev.headers).json()["downloads"]) != 5:
        assert n < 5, f"downloads counted twice: {n}"
        assert time.monotonic() < deadline, f"downloads counter at {n} of 5 after 20 s"
        time.sleep(0.2)


def test_every_response_carries_a_request_id(registry):
    r = registry.http.get("/healthz", headers={"x-request-id": "trace-123"})
    assert r.headers["x-request-id"] == "trace-123"
    r = registry.http.get("/v1/models")
    assert r.status_code == 401 and len(r.headers["x-request-id"]) == 32


def test_openapi_security_schemes_and_path_patterns(registry):
    """User operations take the key as x-api-key or as a bearer token (huggingface_hub sends
    `Authorization: Bearer`); catalog reads (on /v1 and the Hub's reads on /hf) also take the admin token;
    admin operations take only the admin token."""
    spec = registry.http.get("/openapi.json").json()
    schemes = spec["components"]["securitySchemes"]
    assert schemes["ApiKey"] == {**schemes["ApiKey"], "type": "apiKey", "in": "header", "name": "x-api-key"}
    assert schemes["Bearer"] == {**schemes["Bearer"], "type": "http", "scheme": "bearer"}
    assert schemes["AdminToken"] == {**schemes["AdminToken"], "type": "apiKey", "in": "header", "name": "x-admin-token"}
    user = [{"ApiKey": []}, {"Bearer": []}]
    catalog = {"/v1/models", "/v1/models/{repo_id}", "/v1/models/{repo_id}/files", "/v1/manifest/{repo_id}"}
    catalog |= {"/v1/changes", "/v1/files/{file_path}/download"}
    # The Hub's reads: every GET under /hf, and paths-info (a read sent as POST).
    hf_reads = {"/hf/api/models/{namespace}/{name}/paths-info/{revision}"}
    # No credentials: the completion URL authorizes itself (signed); Xet is not offered (400 to anyone).
    public = {"/healthz", "/readyz", "/v1/users/register", "/hf/api/lfs/complete/{token}"}
    public |= {"/hf/api/models/{namespace}/{name}/xet-read-token/{revision}"}
    public |= {"/hf/api/models/{namespace}/{name}/xet-write-token/{revision}"}
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            security = op.get("security")
            if path in public:
                assert not security, (method, path)
            elif path.startswith("/v1/admin/"):
                assert security == [{"AdminToken": []}], (method, path, security)
            elif path in catalog or path in hf_reads or (path.startswith("/hf/") and method in ("get", "head")):
                assert security == [*user, {"AdminToken": []}], (method, path, security)
            else:
                assert security == user, (method, path, security)
            for param in op.get("parameters", []):
                if param["in"] == "path" and param["name"] == "repo_id":
                    assert param["schema"]["pattern"] == REPO_ID_PATTERN, (method, path)
                if param["in"] == "path" and param["name"] == "version":
                    assert param["schema"]["pattern"] == VERSION_PATTERN, (method, path)
                if param["in"] == "path" and param["name"].endswith("_id") and param["name"] != "repo_id":
                    assert param["schema"]["maximum"] == 2**63 - 1, (method, path, param)
