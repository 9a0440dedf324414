"""Bad input answers 4xx with {"detail": "<message>"} and writes nothing."""

from __future__ import annotations

import uuid

import httpx
import psycopg
import pytest

from registry_shared.storage import quarantine_key, upload_object_key


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


# ---------------------------------------------------------------- text the database cannot hold (NUL)

NUL = "a\u0000b"
BIGINT_MAX = 2**63 - 1


@pytest.fixture(scope="module")
def hook(registry, dev):
    r = registry.http.post(
        "/v1/webhooks",
        headers=dev.headers,
        json={"url": "http://1.1.1.1/registry-test-hook", "event_types": ["upload.verified"], "repo_id": "no/such"},
    )
    assert r.status_code == 201, r.text
    yield r.json()
    registry.http.delete(f"/v1/webhooks/{r.json()['id']}", headers=dev.headers)


def _nul_requests(registry, dev, model, hook) -> list[tuple[str, str, dict]]:
    admin = registry.admin
    return [
        ("post", "/v1/users/register", {"json": {"email": "nul@example.com", "name": NUL}}),
        ("post", "/v1/users/register", {"json": {"email": f"n{NUL}@example.com", "name": "x"}}),
        ("post", "/v1/admin/users", {"headers": admin, "json": {"email": "nul@x.io", "name": NUL, "role": "platform"}}),
        ("post", "/v1/dev/models", {"headers": dev.headers, "json": {"repo_id": "nulns/m", "model_name": NUL}}),
        (
            "post",
            "/v1/dev/models",
            {"headers": dev.headers, "json": {"repo_id": "nulns/m", "model_name": "m", "tags": NUL}},
        ),
        ("patch", f"/v1/dev/models/{model}", {"headers": dev.headers, "json": {"model_name": NUL}}),
        ("patch", f"/v1/dev/models/{model}", {"headers": dev.headers, "json": {"license": NUL}}),
        (
            "post",
            "/v1/webhooks",
            {
                "headers": dev.headers,
                "json": {"url": "http://1.1.1.1/h", "event_types": ["upload.verified"], "description": NUL},
            },
        ),
        ("patch", f"/v1/webhooks/{hook['id']}", {"headers": dev.headers, "json": {"description": NUL}}),
        ("patch", f"/v1/webhooks/{hook['id']}", {"headers": dev.headers, "json": {"url": f"http://1.1.1.1/{NUL}"}}),
        ("get", "/v1/models", {"headers": dev.headers, "params": {"q": NUL}}),
        ("get", "/v1/admin/users", {"headers": admin, "params": {"email": NUL}}),
        ("get", "/v1/admin/grants", {"headers": admin, "params": {"repo_id": NUL}}),
        ("get", "/v1/admin/usage", {"headers": admin, "params": {"filter_email": NUL}}),
        ("get", "/v1/changes", {"headers": dev.headers, "params": {"since": 0, NUL: "x"}}),
        ("get", f"/v1/models/{model}", {"headers": dev.headers, "params": {"x": NUL}}),
    ]


def test_nul_in_any_text_is_refused_by_one_rule(registry, pg_settings, dev, model, hook):
    users = count(pg_settings, "select count(*) from users")
    models = count(pg_settings, "select count(*) from models")
    for method, path, kwargs in _nul_requests(registry, dev, model, hook):
        r = registry.http.request(method, path, **kwargs)
        assert_error(r, 422)
        assert "NUL" in r.json()["detail"], (method, path, r.text)
    assert count(pg_settings, "select count(*) from users") == users
    assert count(pg_settings, "select count(*) from models") == models


def test_nul_answer_names_where_it_was(registry, dev):
    r = registry.http.post("/v1/dev/models", headers=dev.headers, json={"repo_id": "nulns/m", "model_name": NUL})
    assert r.json()["detail"] == "model_name: text must not contain NUL (\\u0000) characters"
    r = registry.http.get("/v1/models", headers=dev.headers, params={"q": NUL})
    assert r.json()["detail"] == "q: text must not contain NUL (\\u0000) characters"


def test_nul_in_a_path_is_refused(registry, dev, model):
    for path in (f"/v1/models/{model}%00", f"/v1/dev/models/{model}/versions/v%001/uploads", "/v1/webhooks/1%00"):
        assert_error(registry.http.get(path, headers=dev.headers), 422)


# ---------------------------------------------------------------- bodies that are not UTF-8 JSON


@pytest.mark.parametrize(
    "content",
    [
        b'{"email": "\xff@example.com", "name": "x"}',  # not UTF-8
        '{"email": "a@example.com", "name": "x"}'.encode("utf-16"),  # JSON, but not in UTF-8
        b"[" * 100_000,  # nested deeper than any parser goes
        b"\xef\xbb\xbf{}",  # a byte order mark
    ],
)
def test_a_body_that_is_not_utf8_json_is_invalid_json(registry, pg_settings, content):
    before = count(pg_settings, "select count(*) from users")
    for ctype in ("application/json", "application/json; charset=utf-8"):
        r = registry.http.post("/v1/users/register", headers={"content-type": ctype}, content=content)
        assert_error(r, 422)
        assert r.json()["detail"] == "invalid JSON body"
    assert count(pg_settings, "select count(*) from users") == before


def test_every_json_body_operation_documents_422(registry):
    spec = registry.http.get("/openapi.json").json()
    bodies = [
        (method, path, op) for path, ops in spec["paths"].items() for method, op in ops.items() if "requestBody" in op
    ]
    assert len(bodies) >= 8
    for method, path, op in bodies:
        assert "422" in op["responses"], (method, path)
        assert "invalid JSON body" in op["responses"]["422"]["description"], (method, path)


# ---------------------------------------------------------------- null where a field cannot be null


@pytest.mark.parametrize(
    "body",
    [{"visibility": None}, {"model_name": None}, {"model_name": "ok", "visibility": None}],
)
def test_patch_model_null_for_a_required_field(registry, pg_settings, dev, model, body):
    r = registry.http.patch(f"/v1/dev/models/{model}", headers=dev.headers, json=body)
    assert_error(r, 422)
    assert "null" in r.json()["detail"] or "valid" in r.json()["detail"], r.text
    assert count(pg_settings, "select count(*) from models where repo_id = %s and model_name = 'ok'", model) == 0


def test_patch_model_null_clears_an_optional_field(registry, dev, model):
    r = registry.http.patch(f"/v1/dev/models/{model}", headers=dev.headers, json={"license": "mit"})
    assert r.status_code == 200 and r.json()["license"] == "mit"
    r = registry.http.patch(f"/v1/dev/models/{model}", headers=dev.headers, json={"license": None})
    assert r.status_code == 200 and r.json()["license"] is None


def test_patch_grant_and_webhook_null_for_required_fields(registry, dev, model, hook):
    plat = registry.create_user("platform")
    grant = registry.grant(plat, model)
    for body in ({"permitted_from_ts": None},):
        assert_error(
            registry.http.patch(f"/v1/admin/grants/{grant['grant_id']}", headers=registry.admin, json=body), 422
        )
    for body in ({"url": None}, {"event_types": None}, {"description": None}, {"enabled": None}):
        assert_error(registry.http.patch(f"/v1/webhooks/{hook['id']}", headers=dev.headers, json=body), 422)
    r = registry.http.patch(f"/v1/webhooks/{hook['id']}", headers=dev.headers, json={"repo_id": None})
    assert r.status_code == 200 and r.json()["repo_id"] is None


def test_openapi_says_which_patch_fields_may_be_null(registry):
    schemas = registry.http.get("/openapi.json").json()["components"]["schemas"]

    def nullable(model: str, field: str) -> bool:
        prop = schemas[model]["properties"][field]
        return any(alt.get("type") == "null" for alt in prop.get("anyOf", []))

    assert not nullable("ModelUpdate", "visibility") and not nullable("ModelUpdate", "model_name")
    assert nullable("ModelUpdate", "license")
    assert not nullable("GrantUpdate", "permitted_from_ts") and nullable("GrantUpdate", "permitted_until_ts")
    assert not nullable("WebhookUpdate", "url") and nullable("WebhookUpdate", "repo_id")


# ---------------------------------------------------------------- integers the database cannot hold


@pytest.mark.parametrize("big", [2**63, 2**64, 10**30])
def test_integers_beyond_bigint_are_refused(registry, dev, model, hook, big):
    admin = registry.admin
    cases = [
        ("get", "/v1/admin/users", {"headers": admin, "params": {"offset": big}}),
        ("get", "/v1/admin/grants", {"headers": admin, "params": {"offset": big}}),
        ("get", "/v1/admin/grants", {"headers": admin, "params": {"platform_user_id": big}}),
        ("get", f"/v1/admin/grants/{big}", {"headers": admin}),
        ("patch", f"/v1/admin/grants/{big}", {"headers": admin, "json": {"permitted_until_ts": None}}),
        ("delete", f"/v1/admin/grants/{big}", {"headers": admin}),
        ("get", "/v1/admin/usage", {"headers": admin, "params": {"filter_user_id": big}}),
        ("get", "/v1/models", {"headers": dev.headers, "params": {"updated_since": big}}),
        ("get", "/v1/changes", {"headers": dev.headers, "params": {"since": big}}),
        ("get", f"/v1/dev/uploads/{big}", {"headers": dev.headers}),
        ("get", f"/v1/webhooks/{big}", {"headers": dev.headers}),
        ("get", f"/v1/webhooks/{hook['id']}/deliveries", {"headers": dev.headers, "params": {"offset": big}}),
        ("get", f"/v1/webhooks/{hook['id']}/deliveries/{big}", {"headers": dev.headers}),
        (
            "post",
            "/v1/admin/grants",
            {"headers": admin, "json": {"platform_user_id": big, "repo_id": model, "permitted_from_ts": 0}},
        ),
    ]
    for method, path, kwargs in cases:
        r = registry.http.request(method, path, **kwargs)
        assert r.status_code == 422, (method, path, r.status_code, r.text)
        assert_error(r, 422)


def test_the_largest_bigint_is_a_valid_id(registry, dev):
    assert_error(registry.http.get(f"/v1/admin/grants/{BIGINT_MAX}", headers=registry.admin), 404)
    assert_error(registry.http.get(f"/v1/dev/uploads/{BIGINT_MAX}", headers=dev.headers), 404)
    r = registry.http.get("/v1/admin/users", headers=registry.admin, params={"offset": BIGINT_MAX})
    assert r.status_code == 200 and r.json()["items"] == []


# ---------------------------------------------------------------- object keys the store cannot hold


def test_initiate_refuses_a_file_name_whose_object_key_the_store_cannot_hold(registry, pg_settings, dev, model):
    def initiate(filename: str):
        return registry.http.post(
            f"/v1/dev/models/{model}/versions/v1/uploads/initiate", params={"filename": filename}, headers=dev.headers
        )

    def uploads() -> int:
        return count(
            pg_settings, "select count(*) from uploads u join models m on m.id = u.model_id where m.repo_id = %s", model
        )

    before = uploads()
    too_long = "/".join(["é" * 100] * 6)  # 605 characters (under the 1,024 allowed), 1,205 bytes
    r = initiate(too_long)
    assert_error(r, 422)
    assert "too long" in r.json()["detail"]
    r = initiate("a/" + "b" * 256)  # MinIO refuses a segment over 255 bytes
    assert_error(r, 422)
    assert "segment" in r.json()["detail"]
    assert uploads() == before
    # The longest name that fits is accepted, and the store takes its object.
    room = 1024 - len(quarantine_key(upload_object_key(model, "v1", "")).encode())
    name = ("f" * 200 + "/") * 6
    name = name[: room - 1] + "f"
    assert len(quarantine_key(upload_object_key(model, "v1", name)).encode()) == 1024
    r = initiate(name)
    assert r.status_code == 200, r.text
    put = httpx.put(r.json()["url"], content=b"x", timeout=30)
    assert put.status_code == 200, put.text
