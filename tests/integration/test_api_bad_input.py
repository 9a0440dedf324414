"""Bad input answers 4xx with {"detail": "<message>"} and writes nothing."""

from __future__ import annotations

import uuid

import psycopg
import pytest


@pytest.fixture(scope="module")
def dev(registry):
    return registry.register("Bad")


@pytest.fixture(scope="module")
def model(registry, dev):
    repo = registry.create_model(dev, "private")
    registry.create_version(dev, repo, "v1")
    return repo


def assert_error(r, status: int) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"detail"} and isinstance(body["detail"], str) and body["detail"], body


def count(pg_settings, sql: str, *params) -> int:
    with psycopg.connect(pg_settings.database_url) as conn:
        return conn.execute(sql, params).fetchone()[0]


@pytest.mark.parametrize(
    "body",
    [
        {"email": "a@b.co", "name": "x", "role": "admin"},  # unknown field
        {"email": "not-an-email", "name": "x"},
        {"email": "a@b.co"},  # missing name
        {"email": 42, "name": "x"},  # wrong type
        {"email": "a@b.co", "name": ""},
        [],
    ],
)
def test_register_rejects_bad_bodies(registry, pg_settings, body):
    before = count(pg_settings, "select count(*) from users where email = 'a@b.co'")
    assert_error(registry.http.post("/v1/users/register", json=body), 422)
    assert count(pg_settings, "select count(*) from users where email = 'a@b.co'") == before


def test_junk_json_is_refused(registry, dev):
    r = registry.http.post(
        "/v1/dev/models", headers={**dev.headers, "content-type": "application/json"}, content=b'{"repo_id": "a/b",'
    )
    assert_error(r, 422)
    assert r.json()["detail"] == "invalid JSON body"


def test_duplicate_email_is_a_conflict(registry, dev):
    assert_error(registry.http.post("/v1/users/register", json={"email": dev.email.upper(), "name": "x"}), 409)


@pytest.mark.parametrize(
    "params",
    [
        {"limit": 0},
        {"limit": 501},
        {"limit": "ten"},
        {"offset": -1},
        {"updated_since": "yesterday"},
    ],
)
def test_models_list_bounds(registry, dev, params):
    assert_error(registry.http.get("/v1/models", params=params, headers=dev.headers), 422)


@pytest.mark.parametrize("params", [{}, {"since": "x"}, {"since": 0, "limit": 2001}, {"since": 0, "limit": 0}])
def test_changes_needs_since_and_bounds(registry, dev, params):
    assert_error(registry.http.get("/v1/changes", params=params, headers=dev.headers), 422)


@pytest.mark.parametrize("expires", [59, 86401, -5, "soon"])
def test_expires_bounds(registry, dev, model, expires):
    for path in (f"/v1/models/{model}/files", f"/v1/manifest/{model}", f"/v1/files/{model}/a.bin/download"):
        assert_error(registry.http.get(path, params={"expires": expires}, headers=dev.headers), 422)
    r = registry.http.post(
        f"/v1/dev/models/{model}/versions/v1/uploads/initiate",
        params={"filename": "x.bin", "expires": expires},
        headers=dev.headers,
    )
    assert_error(r, 422)


@pytest.mark.parametrize(
    "filename",
    ["../etc/passwd", "a/../../b", "/abs.bin", "a\\b.bin", "a\x00b", "a\nb", "./a", "a//b", ""],
)
def test_traversal_and_junk_in_rfilename(registry, pg_settings, dev, model, filename):
    before = count(
        pg_settings, "select count(*) from uploads u join models m on m.id = u.model_id where m.repo_id = %s", model
    )
    r = registry.http.post(
        f"/v1/dev/models/{model}/versions/v1/uploads/initiate", params={"filename": filename}, headers=dev.headers
    )
    assert_error(r, 422)
    after = count(
        pg_settings, "select count(*) from uploads u join models m on m.id = u.model_id where m.repo_id = %s", model
    )
    assert after == before


@pytest.mark.parametrize("path", ["..%2Fsecret/download", "a/..%2F..%2Fb/download", "%2Fabs/download"])
def test_traversal_in_download_path(registry, dev, model, path):
    r = registry.http.get(f"/v1/files/{model}/{path}", headers=dev.headers)
    assert r.status_code in (404, 422), r.text
    assert set(r.json()) == {"detail"}


@pytest.mark.parametrize("repo_id", ["noslash", "a/b/c", "../x", "a/..", "-a/b", "a b/c", "a/" + "x" * 200, "ä/b"])
def test_malformed_repo_id(registry, pg_settings, dev, repo_id):
    r = registry.http.post("/v1/dev/models", headers=dev.headers, json={"repo_id": repo_id, "model_name": "x"})
    assert_error(r, 422)
    assert count(pg_settings, "select count(*) from models where repo_id = %s", repo_id) == 0


def test_malformed_repo_id_in_read_paths(registry, dev):
    for path in ("/v1/models/a/b/c", "/v1/manifest/..%2Fx", "/v1/models/a%20b/c/files"):
        r = registry.http.get(path, headers=dev.headers)
        assert r.status_code in (404, 422), (path, r.text)
        assert set(r.json()) == {"detail"}


@pytest.mark.parametrize(
    "body",
    [
        {"rfilename": "a.bin", "size": -1, "sha256": "0" * 64},
        {"rfilename": "a.bin", "size": 1, "sha256": "xyz"},
        {"rfilename": "a.bin", "size": "big", "sha256": "0" * 64},
        {"rfilename": "a.bin", "size": 1, "sha256": "0" * 64, "extra": True},
        {"rfilename": "../a.bin", "size": 1, "sha256": "0" * 64},
    ],
)
def test_complete_rejects_bad_declarations(registry, pg_settings, dev, model, body):
    name = f"c{uuid.uuid4().hex[:6]}.bin"
    r = registry.http.post(
        f"/v1/dev/models/{model}/versions/v1/uploads/initiate", params={"filename": name}, headers=dev.headers
    )
    assert r.status_code == 200
    upload_id = r.json()["upload_id"]
    body = {**body, "rfilename": body["rfilename"].replace("a.bin", name)}
    assert_error(
        registry.http.post(f"/v1/dev/models/{model}/versions/v1/uploads/complete", headers=dev.headers, json=body), 422
    )
    assert registry.http.get(f"/v1/dev/uploads/{upload_id}", headers=dev.headers).json()["status"] == "initiated"


def test_complete_without_initiate_is_404_and_twice_is_409(registry, dev, model):
    body = {"rfilename": "never.bin", "size": 1, "sha256": "0" * 64}
    assert_error(
        registry.http.post(f"/v1/dev/models/{model}/versions/v1/uploads/complete", headers=dev.headers, json=body), 404
    )
    r = registry.http.post(
        f"/v1/dev/models/{model}/versions/v1/uploads/initiate", params={"filename": "twice.bin"}, headers=dev.headers
    )
    assert r.status_code == 200
    body = {"rfilename": "twice.bin", "size": 1, "sha256": "0" * 64}
    assert (
        registry.http.post(
            f"/v1/dev/models/{model}/versions/v1/uploads/complete", headers=dev.headers, json=body
        ).status_code
        == 200
    )
    assert_error(
        registry.http.post(f"/v1/dev/models/{model}/versions/v1/uploads/complete", headers=dev.headers, json=body), 409
    )


def test_duplicates_are_conflicts(registry, dev, model):
    assert_error(
        registry.http.post("/v1/dev/models", headers=dev.headers, json={"repo_id": model, "model_name": "x"}), 409
    )
    assert_error(
        registry.http.post(f"/v1/dev/models/{model}/versions", headers=dev.headers, json={"version": "v1"}), 409
    )


@pytest.mark.parametrize("version", ["../v1", "v 1", "", "v/1", "x" * 65])
def test_bad_versions(registry, dev, model, version):
    r = registry.http.post(f"/v1/dev/models/{model}/versions", headers=dev.headers, json={"version": version})
    assert_error(r, 422)


@pytest.mark.parametrize(
    "body",
    [
        {"platform_user_id": "x", "repo_id": "a/b", "permitted_from_ts": 0},
        {"platform_user_id": 1, "repo_id": "a/b"},
        {"platform_user_id": 1, "repo_id": "a/b", "permitted_from_ts": 100, "permitted_until_ts": 50},
        {"platform_user_id": 1, "repo_id": "bad", "permitted_from_ts": 0},
        {"platform_user_id": 1, "repo_id": "a/b", "permitted_from_ts": 0, "note": "x"},
    ],
)
def test_bad_grants(registry, body):
    assert_error(registry.http.post("/v1/admin/grants", headers=registry.admin, json=body), 422)


def test_grant_needs_a_platform_user_and_a_model(registry, pg_settings, dev, model):
    plat = registry.create_user("platform")
    before = count(pg_settings, "select count(*) from grants")
    body = {"platform_user_id": dev.user_id, "repo_id": model, "permitted_from_ts": 0}
    assert_error(registry.http.post("/v1/admin/grants", headers=registry.admin, json=body), 422)
    body = {"platform_user_id": plat.user_id, "repo_id": "no/such-model", "permitted_from_ts": 0}
    assert_error(registry.http.post("/v1/admin/grants", headers=registry.admin, json=body), 404)
    body = {"platform_user_id": 10**12, "repo_id": model, "permitted_from_ts": 0}
    assert_error(registry.http.post("/v1/admin/grants", headers=registry.admin, json=body), 404)
    assert count(pg_settings, "select count(*) from grants where platform_user_id = %s", plat.user_id) == 0
    assert count(pg_settings, "select count(*) from grants") >= before


@pytest.mark.parametrize("role", ["root", "", None])
def test_admin_user_bad_role(registry, role):
    body = {"email": f"r{uuid.uuid4().hex[:8]}@x.io", "name": "x", "role": role}
    assert_error(registry.http.post("/v1/admin/users", headers=registry.admin, json=body), 422)


@pytest.mark.parametrize(
    "params",
    [{"since": 10, "until": 5}, {"top_models_limit": 0}, {"top_models_limit": 201}, {"since": "x"}],
)
def test_usage_bounds(registry, dev, params):
    assert_error(registry.http.get("/v1/users/me/usage", params=params, headers=dev.headers), 422)


def test_unknown_routes_keep_the_error_shape(registry, dev):
    assert_error(registry.http.get("/v1/nothing-here", headers=dev.headers), 404)
    assert_error(registry.http.put("/v1/models", headers=dev.headers), 405)
