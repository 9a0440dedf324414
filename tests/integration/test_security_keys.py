"""Keys with a lifetime and a scope (issue 15): admin-created keys may expire and may be read-only;
/v1/users/me shows both; an expired key answers 401 `api key expired`; a read-only key gets 403 on every
state-changing call; keys created without options behave as before."""

from __future__ import annotations

import time
import uuid

import pytest
from conftest import Account, Registry


def _admin_user(registry: Registry, role: str, **options: object) -> Account:
    email = f"{role}-{uuid.uuid4().hex[:12]}@partner.example"
    body = {"email": email, "name": "Keyed", "role": role, **options}
    r = registry.http.post("/v1/admin/users", headers=registry.admin, json=body)
    assert r.status_code == 200, r.text
    return Account(r.json()["user_id"], r.json()["api_key"], email, role)


def test_default_key_is_full_and_never_expires(registry: Registry) -> None:
    dev = registry.register()
    me = registry.http.get("/v1/users/me", headers=dev.headers).json()
    assert me["key_scope"] == "full" and me["key_expires_ts"] is None
    registry.create_model(dev)  # still changes state


def test_expired_key_answers_401_api_key_expired(registry: Registry) -> None:
    expires = int(time.time()) + 3
    plat = _admin_user(registry, "platform", key_expires_ts=expires)
    me = registry.http.get("/v1/users/me", headers=plat.headers)
    assert me.status_code == 200, me.text
    assert me.json()["key_expires_ts"] == expires and me.json()["key_scope"] == "full"
    time.sleep(max(0.0, expires - time.time()) + 0.2)
    for path in ("/v1/users/me", "/v1/models", "/v1/files/a/b/c/download"):
        r = registry.http.get(path, headers=plat.headers)
        assert r.status_code == 401, (path, r.text)
        assert r.json() == {"detail": "api key expired"}
    r = registry.http.post("/v1/users/rotate-key", headers=plat.headers)
    assert r.status_code == 401 and r.json()["detail"] == "api key expired"


def test_expiry_must_be_in_the_future(registry: Registry) -> None:
    body = {"email": f"x-{uuid.uuid4().hex[:8]}@p.example", "name": "X", "role": "platform"}
    r = registry.http.post("/v1/admin/users", headers=registry.admin, json={**body, "key_expires_ts": 1000})
    assert r.status_code == 422 and "future" in r.json()["detail"]
    r = registry.http.get("/v1/admin/users", headers=registry.admin, params={"email": body["email"]})
    assert r.json()["items"] == []  # nothing written


def test_read_only_key_reads_but_cannot_change_anything(registry: Registry) -> None:
    dev = registry.register()
    repo_id = registry.create_model(dev, visibility="public")
    ro = _admin_user(registry, "developer", key_scope="read-only")
    me = registry.http.get("/v1/users/me", headers=ro.headers).json()
    assert me["key_scope"] == "read-only"
    assert registry.http.get("/v1/models", headers=ro.headers).status_code == 200
    assert registry.http.get(f"/v1/models/{repo_id}", headers=ro.headers).status_code == 200
    calls = [
        ("POST", "/v1/dev/models", {"repo_id": f"ro{uuid.uuid4().hex[:8]}/m", "model_name": "m"}),
        ("POST", "/v1/users/rotate-key", None),
        ("POST", "/v1/webhooks", {"url": "https://example.com/h", "event_types": ["registry.model.created.v1"]}),
        ("PATCH", "/v1/webhooks/1", {"enabled": False}),
        ("DELETE", "/v1/webhooks/1", None),
    ]
    for method, path, body in calls:
        r = registry.http.request(method, path, headers=ro.headers, json=body)
        assert r.status_code == 403, (method, path, r.text)
        assert r.json() == {"detail": "api key is read-only"}
    assert registry.http.get("/v1/users/me", headers=ro.headers).status_code == 200  # the key still works


@pytest.mark.parametrize("scope", ["read-only", "full"])
def test_admin_reissues_a_key_with_options(registry: Registry, scope: str) -> None:
    plat = registry.create_user("platform")
    expires = int(time.time()) + 3600
    r = registry.http.post(
        f"/v1/admin/users/{plat.user_id}/keys",
        headers=registry.admin,
        json={"key_scope": scope, "key_expires_ts": expires},
    )
    assert r.status_code == 200, r.text
    new = r.json()["api_key"]
    assert registry.http.get("/v1/users/me", headers=plat.headers).status_code == 401  # the old key is gone
    me = registry.http.get("/v1/users/me", headers={"x-api-key": new}).json()
    assert me["key_scope"] == scope and me["key_expires_ts"] == expires


def test_reissue_for_unknown_user_is_404(registry: Registry) -> None:
    r = registry.http.post("/v1/admin/users/999999999/keys", headers=registry.admin, json={})
    assert r.status_code == 404


def test_rotation_keeps_the_expiry(registry: Registry) -> None:
    expires = int(time.time()) + 3600
    dev = _admin_user(registry, "developer", key_expires_ts=expires)
    r = registry.http.post("/v1/users/rotate-key", headers=dev.headers)
    assert r.status_code == 200, r.text
    me = registry.http.get("/v1/users/me", headers={"x-api-key": r.json()["api_key"]}).json()
    assert me["key_expires_ts"] == expires
