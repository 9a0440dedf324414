"""The audit log (issue 15): every state-changing action leaves exactly one row with the right actor and
target, written in the transaction of the change (a refused change leaves none); /v1/admin/audit filters
and pages; the rows are published on Kafka; the api's database role cannot change or delete them."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from collections.abc import Callable, Iterator

import httpx
import psycopg
import pytest
from aiokafka import AIOKafkaConsumer
from conftest import Account, Registry, spawn_api, stop_process
from psycopg.rows import dict_row

from registry_shared.events import AuditRecorded, Topics, decode_event


def _mark(pg_settings) -> int:
    with psycopg.connect(pg_settings.database_url) as conn:
        return conn.execute("select coalesce(max(id), 0) from audit_log").fetchone()[0]


def _rows_after(pg_settings, mark: int) -> list[dict]:
    with psycopg.connect(pg_settings.database_url, row_factory=dict_row) as conn:
        return conn.execute("select * from audit_log where id > %s order by id", [mark]).fetchall()


def _one_row(pg_settings, mark: int, action: str) -> dict:
    """The one row an action wrote (verdicts of earlier uploads, written by the system, are left aside)."""
    rows = [r for r in _rows_after(pg_settings, mark) if r["actor_kind"] != "system"]
    assert len(rows) == 1, rows
    assert rows[0]["action"] == action, rows
    return rows[0]


def _wait_row(pg_settings, mark: int, action: str, target_id: str, timeout: float = 60) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        rows = [r for r in _rows_after(pg_settings, mark) if r["action"] == action and r["target_id"] == target_id]
        if rows or time.monotonic() > deadline:
            return rows
        time.sleep(0.2)


@pytest.fixture(scope="module")
def webhook_api() -> Iterator[httpx.Client]:
    """An api process that accepts loopback webhook targets (the table creates one)."""
    proc, base = spawn_api(WEBHOOK_ALLOW_PRIVATE_TARGETS="127.0.0.1/32")
    with httpx.Client(base_url=base, timeout=30) as http:
        yield http
    stop_process(proc)


def test_every_action_leaves_one_row_with_actor_and_target(
    registry: Registry, pg_settings, webhook_api: httpx.Client
) -> None:
    http = webhook_api
    state: dict[str, object] = {}

    def register() -> tuple[httpx.Response, str, int | None, str, str | None]:
        email = f"audit-{uuid.uuid4().hex[:10]}@example.com"
        r = http.post("/v1/users/register", json={"email": email, "name": "Aud"})
        state["dev"] = Account(r.json()["user_id"], r.json()["api_key"], email, "developer")
        return r, "anonymous", None, str(r.json()["user_id"]), None

    def rotate() -> tuple:
        dev: Account = state["dev"]
        r = http.post("/v1/users/rotate-key", headers=dev.headers)
        dev.api_key = r.json()["api_key"]
        return r, "user", dev.user_id, str(dev.user_id), None

    def admin_create() -> tuple:
        body = {"email": f"p-{uuid.uuid4().hex[:10]}@p.example", "name": "P", "role": "platform"}
        r = http.post("/v1/admin/users", headers=registry.admin, json=body)
        state["plat"] = Account(r.json()["user_id"], r.json()["api_key"], body["email"], "platform")
        return r, "admin-token", None, str(r.json()["user_id"]), None

    def reissue() -> tuple:
        plat: Account = state["plat"]
        r = http.post(f"/v1/admin/users/{plat.user_id}/keys", headers=registry.admin, json={"key_scope": "read-only"})
        return r, "admin-token", None, str(plat.user_id), None

    def model_create() -> tuple:
        dev: Account = state["dev"]
        repo_id = f"aud{uuid.uuid4().hex[:8]}/m"
        state["repo"] = repo_id
        r = http.post("/v1/dev/models", headers=dev.headers, json={"repo_id": repo_id, "model_name": "M"})
        return r, "user", dev.user_id, repo_id, repo_id

    def model_visibility() -> tuple:
        dev: Account = state["dev"]
        r = http.patch(f"/v1/dev/models/{state['repo']}", headers=dev.headers, json={"visibility": "public"})
        return r, "user", dev.user_id, state["repo"], state["repo"]

    def version_create() -> tuple:
        dev: Account = state["dev"]
        r = http.post(f"/v1/dev/models/{state['repo']}/versions", headers=dev.headers, json={"version": "v1"})
        return r, "user", dev.user_id, f"{state['repo']}@v1", state["repo"]

    def upload_complete() -> tuple:
        dev: Account = state["dev"]
        base = f"/v1/dev/models/{state['repo']}/versions/v1/uploads"
        r = http.post(f"{base}/initiate", params={"filename": "w.bin"}, headers=dev.headers)
        data = b"audited bytes"
        assert httpx.put(r.json()["url"], content=data, timeout=30).status_code == 200
        body = {"rfilename": "w.bin", "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        r = http.post(f"{base}/complete", headers=dev.headers, json=body)
        state["upload_id"] = r.json()["upload_id"]
        return r, "user", dev.user_id, str(r.json()["upload_id"]), state["repo"]

    def grant_create() -> tuple:
        plat: Account = state["plat"]
        body = {"platform_user_id": plat.user_id, "repo_id": state["repo"], "permitted_from_ts": 1}
        r = http.post("/v1/admin/grants", headers=registry.admin, json=body)
        state["grant"] = r.json()["grant_id"]
        return r, "admin-token", None, str(r.json()["grant_id"]), state["repo"]

    def grant_update() -> tuple:
        r = http.patch(f"/v1/admin/grants/{state['grant']}", headers=registry.admin, json={"permitted_from_ts": 2})
        return r, "admin-token", None, str(state["grant"]), state["repo"]

    def grant_revoke() -> tuple:
        r = http.delete(f"/v1/admin/grants/{state['grant']}", headers=registry.admin)
        return r, "admin-token", None, str(state["grant"]), state["repo"]

    def webhook_create() -> tuple:
        dev: Account = state["dev"]
        body = {"url": "http://127.0.0.1:9/hook", "event_types": ["version.created"]}
        r = http.post("/v1/webhooks", headers=dev.headers, json=body)
        state["hook"] = r.json()["id"]
        return r, "user", dev.user_id, str(state["hook"]), None

    def webhook_update() -> tuple:
        dev: Account = state["dev"]
        r = http.patch(f"/v1/webhooks/{state['hook']}", headers=dev.headers, json={"enabled": False})
        return r, "user", dev.user_id, str(state["hook"]), None

    def webhook_delete() -> tuple:
        dev: Account = state["dev"]
        r = http.delete(f"/v1/webhooks/{state['hook']}", headers=dev.headers)
        return r, "user", dev.user_id, str(state["hook"]), None

    table: list[tuple[str, str, Callable[[], tuple]]] = [
        ("user.register", "user", register),
        ("user.rotate_key", "user", rotate),
        ("user.create", "user", admin_create),
        ("user.reissue_key", "user", reissue),
        ("model.create", "model", model_create),
        ("model.update", "model", model_visibility),
        ("version.create", "version", version_create),
        ("upload.complete", "upload", upload_complete),
        ("grant.create", "grant", grant_create),
        ("grant.update", "grant", grant_update),
        ("grant.revoke", "grant", grant_revoke),
        ("webhook.create", "webhook", webhook_create),
        ("webhook.update", "webhook", webhook_update),
        ("webhook.delete", "webhook", webhook_delete),
    ]
    for action, target_type, step in table:
        mark = _mark(pg_settings)
        r, actor_kind, actor_user_id, target_id, repo_id = step()
        assert r.status_code < 300, (action, r.status_code, r.text)
        row = _one_row(pg_settings, mark, action)
        assert (row["actor_kind"], row["actor_user_id"]) == (actor_kind, actor_user_id), (action, row)
        assert (row["target_type"], row["target_id"], row["repo_id"]) == (target_type, target_id, repo_id), row
        assert row["request_id"] == r.headers["x-request-id"], row
        assert row["client_ip"] == "127.0.0.1", row
        assert not any("secret" in k for k in (row["after"] or {})), row  # no secret copied
    # before/after of the visibility change, and the grant window change
    with psycopg.connect(pg_settings.database_url, row_factory=dict_row) as conn:
        vis = conn.execute(
            "select before, after from audit_log where action = 'model.update' and repo_id = %s", [state["repo"]]
        ).fetchone()
        grant = conn.execute(
            "select before, after from audit_log where action = 'grant.update' and target_id = %s",
            [str(state["grant"])],
        ).fetchone()
    assert (vis["before"]["visibility"], vis["after"]["visibility"]) == ("private", "public")
    assert (grant["before"]["permitted_from_ts"], grant["after"]["permitted_from_ts"]) == (1, 2)
    # ingest's verdict is applied by the api: one row, by the system
    verdicts = _wait_row(pg_settings, 0, "upload.verdict", str(state["upload_id"]))
    assert len(verdicts) == 1 and verdicts[0]["actor_kind"] == "system", verdicts
    assert verdicts[0]["after"]["upload_id"] == state["upload_id"]


def test_a_refused_change_leaves_no_row(registry: Registry, pg_settings) -> None:
    dev = registry.register()
    repo_id = registry.create_model(dev)
    mark = _mark(pg_settings)
    body = {"platform_user_id": dev.user_id, "repo_id": repo_id, "permitted_from_ts": 1}  # not a platform user
    r = registry.http.post("/v1/admin/grants", headers=registry.admin, json=body)
    assert r.status_code == 422
    r = registry.http.post("/v1/dev/models", headers=dev.headers, json={"repo_id": repo_id, "model_name": "again"})
    assert r.status_code == 409
    assert [x for x in _rows_after(pg_settings, mark) if x["actor_kind"] != "system"] == []


def test_audit_endpoint_filters_and_pages(registry: Registry) -> None:
    http = registry.http
    started = time.time() - 1
    dev = registry.register()
    repos = [registry.create_model(dev) for _ in range(5)]
    page = http.get("/v1/admin/audit", headers=registry.admin, params={"actor": dev.user_id, "limit": 2})
    assert page.status_code == 200, page.text
    seen: list[dict] = []
    while True:
        body = page.json()
        seen += body["items"]
        if body["next_cursor"] is None:
            break
        page = http.get(
            "/v1/admin/audit",
            headers=registry.admin,
            params={"actor": dev.user_id, "limit": 2, "cursor": body["next_cursor"]},
        )
    assert [e["repo_id"] for e in seen] == list(reversed(repos))  # newest first, every page, no repeats
    assert all(e["action"] == "model.create" and e["actor_kind"] == "user" for e in seen)
    one = http.get("/v1/admin/audit", headers=registry.admin, params={"repo_id": repos[2].upper()}).json()["items"]
    assert [e["repo_id"] for e in one] == [repos[2]]
    reg = http.get(
        "/v1/admin/audit",
        headers=registry.admin,
        params={"action": "user.register", "actor": "anonymous", "since": started},
    ).json()["items"]
    assert str(dev.user_id) in {e["target_id"] for e in reg}
    future = http.get("/v1/admin/audit", headers=registry.admin, params={"since": time.time() + 3600}).json()
    assert future == {"items": [], "next_cursor": None}
    past = http.get("/v1/admin/audit", headers=registry.admin, params={"until": started, "actor": dev.user_id})
    assert past.json()["items"] == []
    assert http.get("/v1/admin/audit", headers=registry.admin, params={"actor": "nobody"}).status_code == 422
    assert http.get("/v1/admin/audit", headers=dev.headers).status_code == 401  # admins only


@pytest.mark.parametrize(
    "statement",
    [
        "update audit_log set action = 'forged' where id = %s",
        "delete from audit_log where id = %s",
        "truncate audit_log",
    ],
)
def test_the_api_role_cannot_change_or_delete_rows(registry: Registry, pg_settings, statement: str) -> None:
    registry.register()
    mark = _mark(pg_settings)
    with psycopg.connect(pg_settings.database_url) as conn:  # the api's own DATABASE_URL
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
            conn.execute(statement, [mark] if "%s" in statement else None)
        conn.rollback()
        assert conn.execute("select action from audit_log where id = %s", [mark]).fetchone()[0] != "forged"


def test_audit_rows_are_published_on_kafka(registry: Registry, kafka_settings, pg_settings) -> None:
    mark = _mark(pg_settings)
    dev = registry.register()
    row = _one_row(pg_settings, mark, "user.register")

    async def find() -> AuditRecorded | None:
        consumer = AIOKafkaConsumer(
            Topics.AUDIT,
            bootstrap_servers=kafka_settings.kafka_bootstrap_servers,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        await consumer.start()
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                batch = await consumer.getmany(timeout_ms=500)
                for records in batch.values():
                    for rec in records:
                        payload = decode_event(rec.value).payload()
                        if isinstance(payload, AuditRecorded) and payload.audit_id == row["id"]:
                            return payload
            return None
        finally:
            await consumer.stop()

    event = asyncio.run(find())
    assert event is not None, "audit event not published"
    assert (event.action, event.target_id, event.actor_kind) == ("user.register", str(dev.user_id), "anonymous")
    assert json.loads(json.dumps(event.after))["email"] == dev.email
