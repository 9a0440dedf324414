"""Every endpoint × role × relationship (owner / not owner / granted / not yet granted / revoked / expired).

Files are seeded straight into the catalog (Postgres + the object in MinIO under hf/), the way an operator loads
an existing 0.3.0 catalog, so this test does not depend on the ingest worker's timing.
"""

from __future__ import annotations

import time
import uuid

import httpx
import pytest
from conftest import SEED_FILE as FILE
from conftest import seed_file


@pytest.fixture(scope="module")
def world(registry, pg_settings, minio_settings):
    owner = registry.register("Owner")
    other = registry.register("Other")
    private = registry.create_model(owner, "private")
    public = registry.create_model(owner, "public")
    for repo in (private, public):
        registry.create_version(owner, repo, "v1")
        seed_file(pg_settings, minio_settings, repo, "v1")
    now = int(time.time())
    plat = {
        name: registry.create_user("platform", name) for name in ("granted", "future", "revoked", "expired", "none")
    }
    registry.grant(plat["granted"], private, now - 10)
    registry.grant(plat["future"], private, now + 3600)
    g = registry.grant(plat["revoked"], private, now - 10)
    assert registry.http.delete(f"/v1/admin/grants/{g['grant_id']}", headers=registry.admin).status_code == 200
    registry.grant(plat["expired"], private, now - 100, now - 50)
    admin_user = registry.create_user("admin", "Adm")
    return {
        "private": private,
        "public": public,
        "callers": {
            "owner": owner.headers,
            "other_dev": other.headers,
            "plat_granted": plat["granted"].headers,
            "plat_future": plat["future"].headers,
            "plat_revoked": plat["revoked"].headers,
            "plat_expired": plat["expired"].headers,
            "plat_none": plat["none"].headers,
            "admin_user": admin_user.headers,
            "admin_token": registry.admin,
            "anonymous": {},
            "bad_key": {"x-api-key": "sk_live_" + "x" * 44},
        },
    }


SEES_PRIVATE = {"owner", "plat_granted", "admin_user", "admin_token"}
AUTHENTICATED = {
    "owner",
    "other_dev",
    "plat_granted",
    "plat_future",
    "plat_revoked",
    "plat_expired",
    "plat_none",
    "admin_user",
    "admin_token",
}
CALLERS = sorted(AUTHENTICATED | {"anonymous", "bad_key"})
READS = [
    "/v1/models/{repo}",
    "/v1/models/{repo}/files",
    "/v1/manifest/{repo}",
    "/v1/files/{repo}/" + FILE + "/download",
    "/v1/files/{repo}/" + FILE + "/download?version=v1",
]


def expected_read(caller: str, which: str) -> int:
    if caller == "anonymous" or caller == "bad_key":
        return 401
    if which == "public" or caller in SEES_PRIVATE:
        return 200
    return 404


@pytest.mark.parametrize("caller", CALLERS)
@pytest.mark.parametrize("which", ["private", "public"])
def test_catalog_reads(world, registry, caller, which):
    repo = world[which]
    headers = world["callers"][caller]
    for template in READS:
        r = registry.http.get(template.format(repo=repo), headers=headers)
        want = expected_read(caller, which)
        assert r.status_code == want, (template, caller, which, r.text)
        if want == 401:
            assert r.json() == {
                "detail": "missing x-api-key" if caller == "anonymous" else "invalid or revoked api key"
            }
        if want == 404:
            assert r.json() == {"detail": "model not found"} or r.json() == {"detail": "file not found"}
    listed = registry.http.get("/v1/models", params={"q": repo, "limit": 500}, headers=headers)
    changes = registry.http.get("/v1/changes", params={"since": 0, "limit": 2000}, headers=headers)
    if expected_read(caller, which) == 401:
        assert listed.status_code == changes.status_code == 401
        return
    in_list = repo in [m["repo_id"] for m in listed.json()["items"]]
    in_changes = repo in [m["repo_id"] for m in changes.json()["items"]]
    assert in_list == (expected_read(caller, which) == 200), (caller, which)
    if caller != "admin_token" and caller != "admin_user":  # the whole catalog may exceed one page
        assert in_changes == (expected_read(caller, which) == 200), (caller, which)


@pytest.mark.parametrize("caller", CALLERS)
def test_developer_writes_on_private_model(world, registry, caller):
    repo = world["private"]
    headers = world["callers"][caller]
    version = f"w{uuid.uuid4().hex[:6]}"
    r = registry.http.post(f"/v1/dev/models/{repo}/versions", headers=headers, json={"version": version})
    want = {
        "owner": 201,
        "admin_user": 201,
        "other_dev": 404,
        "anonymous": 401,
        "bad_key": 401,
        "admin_token": 401,
    }.get(caller, 403)  # platform users: not a developer
    assert r.status_code == want, (caller, r.text)
    if want == 201:
        calls = [
            ("post", f"/v1/dev/models/{repo}/versions/{version}/uploads/initiate?filename=a.bin", None, 200),
            ("get", f"/v1/dev/models/{repo}/versions/{version}/uploads", None, 200),
            ("get", f"/v1/dev/models/{repo}/versions", None, 200),
            ("patch", f"/v1/dev/models/{repo}", {"tags": "x"}, 200),
        ]
        for method, path, body, code in calls:
            resp = registry.http.request(method, path, headers=headers, json=body)
            assert resp.status_code == code, (caller, path, resp.text)


def test_other_developer_cannot_write_a_public_model_it_can_see(world, registry):
    headers = world["callers"]["other_dev"]
    repo = world["public"]
    r = registry.http.post(f"/v1/dev/models/{repo}/versions", headers=headers, json={"version": "v9"})
    assert r.status_code == 403
    r = registry.http.post(f"/v1/dev/models/{repo}/versions/v1/uploads/initiate?filename=x.bin", headers=headers)
    assert r.status_code == 403
    r = registry.http.post(
        f"/v1/dev/models/{repo}/versions/v1/uploads/complete",
        headers=headers,
        json={"rfilename": "x.bin", "size": 1, "sha256": "0" * 64},
    )
    assert r.status_code == 403


def test_namespace_belongs_to_its_first_developer(world, registry):
    ns = world["private"].split("/")[0]
    r = registry.http.post(
        "/v1/dev/models",
        headers=world["callers"]["other_dev"],
        json={"repo_id": f"{ns}/squatter", "model_name": "x"},
    )
    assert r.status_code == 403
    r = registry.http.post(
        "/v1/dev/models", headers=world["callers"]["owner"], json={"repo_id": f"{ns}/second", "model_name": "x"}
    )
    assert r.status_code == 201


@pytest.mark.parametrize("caller", CALLERS)
def test_admin_endpoints_need_the_admin_token(world, registry, caller):
    headers = world["callers"][caller]
    for method, path, body in [
        ("get", "/v1/admin/grants", None),
        ("get", "/v1/admin/users", None),
        ("post", "/v1/admin/users", {"email": f"x{uuid.uuid4().hex[:8]}@a.io", "name": "x", "role": "platform"}),
        ("get", "/v1/admin/usage", None),
    ]:
        r = registry.http.request(method, path, headers=headers, json=body)
        if caller == "admin_token":
            assert r.status_code == 200, (path, r.text)
        else:
            assert r.status_code == 401, (caller, path)
            assert r.json() == {"detail": "invalid admin token"}


@pytest.mark.parametrize("caller", CALLERS)
def test_platform_manifest(world, registry, caller):
    r = registry.http.get("/v1/platform/manifest", headers=world["callers"][caller])
    if caller in ("anonymous", "bad_key", "admin_token"):
        assert r.status_code == 401
        return
    if not caller.startswith("plat_"):
        assert r.status_code == 403
        return
    assert r.status_code == 200
    repos = [m["repo_id"] for m in r.json()["items"]]
    assert (world["private"] in repos) == (caller == "plat_granted")
    assert world["public"] not in repos  # the manifest lists grants, not the public catalog


def test_rotated_key_fails_at_once(registry):
    dev = registry.register("Rotator")
    assert registry.http.get("/v1/users/me", headers=dev.headers).status_code == 200
    r = registry.http.post("/v1/users/rotate-key", headers=dev.headers)
    assert r.status_code == 200
    new_key = r.json()["api_key"]
    assert new_key != dev.api_key and new_key.startswith("sk_live_")
    old = registry.http.get("/v1/users/me", headers=dev.headers)
    assert old.status_code == 401 and old.json() == {"detail": "invalid or revoked api key"}
    me = registry.http.get("/v1/users/me", headers={"x-api-key": new_key})
    assert me.status_code == 200 and me.json()["user_id"] == dev.user_id


def test_admin_token_not_configured_answers_503(api_process_without_admin_token):
    r = httpx.get(f"{api_process_without_admin_token}/v1/admin/grants", headers={"x-admin-token": "changeme"})
    assert r.status_code == 503
    assert r.json() == {"detail": "admin token not configured"}
