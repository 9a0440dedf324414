"""The webhook subscription API over real HTTP, against an api process of our own on the shared database
(no outbox relay, no consumers: it only answers)."""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator

import httpx
import psycopg
import pytest
from conftest import spawn_api, stop_process
from notifier_helpers import Api, ServiceProcess, User, api_process

from registry_shared.secretbox import SecretBox


@pytest.fixture(scope="module")
def api_proc() -> Iterator[ServiceProcess]:
    proc = api_process(allow_private="127.0.0.1/32").start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def api(api_proc: ServiceProcess) -> Iterator[Api]:
    client = Api(api_proc.url)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def alice(api: Api) -> User:
    return api.register("Alice")


@pytest.fixture
def bob(api: Api) -> User:
    return api.register("Bob")


def test_create_shows_the_secret_once(api: Api, alice: User) -> None:
    r = api.http.post(
        "/v1/webhooks",
        headers=alice.headers,
        json={
            "url": "http://127.0.0.1:9/hook",
            "event_types": ["upload.verified", "upload.rejected", "upload.verified"],
            "description": "ci",
        },
    )
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["event_types"] == ["upload.rejected", "upload.verified"]
    assert body["enabled"] is True and body["consecutive_failures"] == 0 and body["repo_id"] is None
    assert body["secret"].startswith("whsec_")
    assert len(base64.b64decode(body["secret"].removeprefix("whsec_"))) == 32
    got = api.webhook(alice, body["id"])
    assert "secret" not in got
    assert got["url"] == "http://127.0.0.1:9/hook" and got["description"] == "ci"
    listed = api.http.get("/v1/webhooks", headers=alice.headers).json()["items"]
    assert [w["id"] for w in listed] == [body["id"]]
    assert all("secret" not in w for w in listed)


def test_the_secret_is_stored_sealed_and_clear_ones_are_sealed_at_start(api: Api, alice: User, pg_settings) -> None:
    r = api.http.post(
        "/v1/webhooks",
        headers=alice.headers,
        json={"url": "http://127.0.0.1:9/hook", "event_types": ["upload.verified"]},
    )
    assert r.status_code == 201, r.text
    hook_id, secret = r.json()["id"], r.json()["secret"]
    box = SecretBox(os.environ["WEBHOOK_SECRET_KEY"])
    with psycopg.connect(pg_settings.database_url, autocommit=True) as conn:

        def stored() -> str:
            return conn.execute("select secret from webhooks where id = %s", [hook_id]).fetchone()[0]

        assert stored().startswith("enc:v1:") and secret not in stored()
        assert box.open(stored()) == secret
        # A secret an older version stored in clear is sealed when an api starts.
        conn.execute("update webhooks set secret = 'whsec_c2VjcmV0LXN0b3JlZC1pbi1jbGVhcg==' where id = %s", [hook_id])
        proc, _ = spawn_api()
        stop_process(proc)
        assert stored().startswith("enc:v1:")
        assert box.open(stored()) == "whsec_c2VjcmV0LXN0b3JlZC1pbi1jbGVhcg=="


def test_without_a_secret_key_no_webhook_is_created(alice: User) -> None:
    proc, base = spawn_api(WEBHOOK_SECRET_KEY="")
    try:
        r = httpx.post(
            f"{base}/v1/webhooks",
            headers=alice.headers,
            json={"url": "http://127.0.0.1:9/hook", "event_types": ["upload.verified"]},
        )
    finally:
        stop_process(proc)
    assert r.status_code == 503 and r.json() == {"detail": "webhook secret key not configured"}


def test_a_user_sees_only_their_own(api: Api, alice: User, bob: User) -> None:
    hook = api.subscribe(alice, "http://127.0.0.1:9/a", ["user.key_rotated"])
    assert api.http.get("/v1/webhooks", headers=bob.headers).json()["items"] == []
    for method, path, body in (
        ("GET", f"/v1/webhooks/{hook['id']}", None),
        ("PATCH", f"/v1/webhooks/{hook['id']}", {"enabled": False}),
        ("DELETE", f"/v1/webhooks/{hook['id']}", None),
        ("GET", f"/v1/webhooks/{hook['id']}/deliveries", None),
        ("GET", f"/v1/webhooks/{hook['id']}/deliveries/1", None),
        ("POST", f"/v1/webhooks/{hook['id']}/deliveries/1/redeliver", None),
    ):
        r = api.http.request(method, path, headers=bob.headers, json=body)
        assert r.status_code == 404, (method, path, r.text)
        assert r.json() == {"detail": "webhook not found"}
    assert api.webhook(alice, hook["id"])["enabled"] is True


def test_update_and_delete(api: Api, alice: User) -> None:
    hook = api.subscribe(alice, "http://127.0.0.1:9/a", ["grant.created"])
    r = api.http.patch(
        f"/v1/webhooks/{hook['id']}",
        headers=alice.headers,
        json={"event_types": ["grant.revoked", "grant.created"], "repo_id": "acme/bert", "enabled": False},
    )
    assert r.status_code == 200, r.text
    assert r.json()["event_types"] == ["grant.created", "grant.revoked"]
    assert r.json()["repo_id"] == "acme/bert" and r.json()["enabled"] is False
    r = api.http.patch(f"/v1/webhooks/{hook['id']}", headers=alice.headers, json={"enabled": True})
    assert r.json()["enabled"] is True and r.json()["disabled_reason"] is None
    r = api.http.patch(f"/v1/webhooks/{hook['id']}", headers=alice.headers, json={"url": None})
    assert r.status_code == 422 and r.json() == {"detail": "url cannot be null"}
    assert api.http.delete(f"/v1/webhooks/{hook['id']}", headers=alice.headers).status_code == 204
    assert api.http.get(f"/v1/webhooks/{hook['id']}", headers=alice.headers).status_code == 404
    assert api.http.delete(f"/v1/webhooks/{hook['id']}", headers=alice.headers).status_code == 404


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        ({"url": "http://127.0.0.1:9/a", "event_types": ["model.deleted"]}, "event_types.0: Input should be"),
        ({"url": "http://127.0.0.1:9/a", "event_types": []}, "event_types"),
        ({"url": "http://127.0.0.1:9/a"}, "missing required field: event_types"),
        ({"url": "http://127.0.0.1:9/a", "event_types": ["grant.created"], "repo_id": "no-slash"}, "repo_id"),
        ({"url": "http://127.0.0.1:9/a", "event_types": ["grant.created"], "secret": "x"}, "unknown field: secret"),
        ({"url": "ftp://example.com/x", "event_types": ["grant.created"]}, "must be http or https"),
        ({"url": "http://u:p@example.com/x", "event_types": ["grant.created"]}, "credentials"),
    ],
)
def test_invalid_bodies_are_refused(api: Api, alice: User, body: dict, detail: str) -> None:
    r = api.http.post("/v1/webhooks", headers=alice.headers, json=body)
    assert r.status_code == 422, r.text
    assert set(r.json()) == {"detail"} and detail in r.json()["detail"]


@pytest.mark.parametrize(
    "url",
    [
        "http://10.0.0.1/hook",
        "http://192.168.1.10/hook",
        "http://172.16.0.1/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://127.0.0.2:8080/hook",  # loopback outside the allowlist (127.0.0.1/32)
        "http://2130706434/hook",  # 127.0.0.2 written as a number: resolved, then refused
        "http://[::1]/hook",
        "http://[fe80::1]/hook",
        "http://[::ffff:10.0.0.1]/hook",
        "http://0.0.0.0/hook",
        "http://224.0.0.1/hook",
        "http://nonexistent-host.invalid/hook",
    ],
)
def test_ssrf_targets_are_refused_at_creation(api: Api, alice: User, url: str) -> None:
    r = api.http.post("/v1/webhooks", headers=alice.headers, json={"url": url, "event_types": ["grant.created"]})
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith("webhook url refused: ")


def test_ssrf_target_refused_when_the_url_changes(api: Api, alice: User) -> None:
    hook = api.subscribe(alice, "http://127.0.0.1:9/a", ["grant.created"])
    r = api.http.patch(f"/v1/webhooks/{hook['id']}", headers=alice.headers, json={"url": "http://10.1.2.3/x"})
    assert r.status_code == 422 and "10.1.2.3 is not a public address" in r.json()["detail"]
    assert api.webhook(alice, hook["id"])["url"] == "http://127.0.0.1:9/a"


def test_deliveries_log_and_redeliver_errors(api: Api, alice: User) -> None:
    hook = api.subscribe(alice, "http://127.0.0.1:9/a", ["grant.created"])
    r = api.http.get(f"/v1/webhooks/{hook['id']}/deliveries", headers=alice.headers)
    assert r.status_code == 200 and r.json() == {"items": [], "limit": 100, "offset": 0}
    r = api.http.get(f"/v1/webhooks/{hook['id']}/deliveries", headers=alice.headers, params={"status": "nope"})
    assert r.status_code == 422
    r = api.http.get(f"/v1/webhooks/{hook['id']}/deliveries/999999999", headers=alice.headers)
    assert r.status_code == 404 and r.json() == {"detail": "delivery not found"}
    r = api.http.post(f"/v1/webhooks/{hook['id']}/deliveries/999999999/redeliver", headers=alice.headers)
    assert r.status_code == 404 and r.json() == {"detail": "delivery not found"}


def test_event_types_and_auth(api: Api, alice: User) -> None:
    r = api.http.get("/v1/webhooks/event-types", headers=alice.headers)
    assert r.status_code == 200
    names = {t["name"]: t["cloudevents_type"] for t in r.json()["items"]}
    assert names["upload.verified"] == "registry.upload.verified.v1"
    assert {"upload.rejected", "grant.created", "grant.revoked", "version.created", "user.key_rotated"} <= set(names)
    for method, path in (("GET", "/v1/webhooks"), ("POST", "/v1/webhooks"), ("GET", "/v1/webhooks/1")):
        r = api.http.request(method, path, json={})
        assert r.status_code == 401 and r.json() == {"detail": "missing x-api-key"}
    r = api.http.get("/v1/webhooks", headers={"x-api-key": "sk_live_" + "x" * 44})
    assert r.status_code == 401


def test_openapi_documents_the_webhooks(api: Api) -> None:
    doc = api.http.get("/openapi.json").json()
    assert any(t["name"] == "Webhooks" for t in doc["tags"])
    for path, method in (
        ("/v1/webhooks", "post"),
        ("/v1/webhooks", "get"),
        ("/v1/webhooks/{webhook_id}", "patch"),
        ("/v1/webhooks/{webhook_id}", "delete"),
        ("/v1/webhooks/{webhook_id}/deliveries", "get"),
        ("/v1/webhooks/{webhook_id}/deliveries/{delivery_id}/redeliver", "post"),
    ):
        op = doc["paths"][path][method]
        assert op["tags"] == ["Webhooks"] and op["summary"]
        assert "404" in op["responses"] or path == "/v1/webhooks"
    assert "webhook-signature" in doc["paths"]["/v1/webhooks"]["post"]["description"]
