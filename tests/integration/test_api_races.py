"""Invariants that must hold under real concurrency against the running api: many requests sent at the
same moment (httpx.AsyncClient, one connection each), then the state checked through the api and Postgres.

- rotating one key N times at once leaves exactly one working key (one rotation wins, the others 401);
- a namespace belongs to its first developer even when N developers claim it at once, and namespaces
  and repo ids are case-insensitive (one owner per namespace whatever the case, `ACME/x` finds `acme/x`);
- there is at most one unrevoked grant per (platform user, model), however many identical grants are
  created at once, so revoking it leaves no access.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import httpx
import psycopg
import pytest
from conftest import SEED_FILE, seed_file

N = 30


def _count(pg_settings, sql: str, *params) -> int:
    with psycopg.connect(pg_settings.database_url) as conn:
        return conn.execute(sql, params).fetchone()[0]


async def _at_once(api_base_url: str, requests: list[tuple[str, str, dict]]) -> list[httpx.Response]:
    """Send every (method, path, kwargs) at the same moment, each on its own connection."""
    limits = httpx.Limits(max_connections=len(requests), max_keepalive_connections=len(requests))
    async with httpx.AsyncClient(base_url=api_base_url, timeout=60, limits=limits) as client:
        # Open the connections first, so the requests themselves leave together.
        await asyncio.gather(*(client.get("/healthz") for _ in requests))
        start = asyncio.Event()

        async def one(method: str, path: str, kwargs: dict) -> httpx.Response:
            await start.wait()
            return await client.request(method, path, **kwargs)

        tasks = [asyncio.create_task(one(m, p, kw)) for m, p, kw in requests]
        await asyncio.sleep(0.05)
        start.set()
        return await asyncio.gather(*tasks)


async def test_concurrent_rotations_of_one_key_leave_exactly_one_working_key(registry, api_base_url, pg_settings):
    dev = registry.register("Rotor")
    answers = await _at_once(api_base_url, [("POST", "/v1/users/rotate-key", {"headers": dev.headers})] * N)
    codes = sorted(r.status_code for r in answers)
    assert codes.count(200) == 1 and codes.count(401) == N - 1, codes
    for r in answers:
        if r.status_code == 401:
            assert r.json() == {"detail": "invalid or revoked api key"}
    new_key = next(r.json()["api_key"] for r in answers if r.status_code == 200)
    assert registry.http.get("/v1/users/me", headers={"x-api-key": new_key}).status_code == 200
    assert registry.http.get("/v1/users/me", headers=dev.headers).status_code == 401
    live = _count(pg_settings, "select count(*) from api_keys where user_id = %s and revoked_ts is null", dev.user_id)
    assert live == 1


async def test_many_developers_claiming_one_fresh_namespace_leave_one_owner(registry, api_base_url, pg_settings):
    devs = [registry.register(f"Claim{i}") for i in range(N)]
    ns = f"race{uuid.uuid4().hex[:8]}"
    # Some claim it in another case: ownership does not depend on it.
    bodies = [
        {"repo_id": f"{ns.upper() if i % 3 == 0 else ns}/m{i}", "model_name": f"m{i}", "visibility": "public"}
        for i in range(N)
    ]
    answers = await _at_once(
        api_base_url,
        [("POST", "/v1/dev/models", {"headers": d.headers, "json": b}) for d, b in zip(devs, bodies, strict=True)],
    )
    codes = [r.status_code for r in answers]
    assert codes.count(201) == 1 and codes.count(403) == N - 1, codes
    for r in answers:
        if r.status_code == 403:
            assert "belongs to another developer" in r.json()["detail"]
    owners = _count(
        pg_settings, "select count(distinct owner_id) from models where lower(repo_id) like %s", ns.lower() + "/%"
    )
    models = _count(pg_settings, "select count(*) from models where lower(repo_id) like %s", ns.lower() + "/%")
    assert (owners, models) == (1, 1)


def test_namespaces_and_repo_ids_are_case_insensitive(registry):
    owner, other = registry.register("CaseOwner"), registry.register("CaseOther")
    ns = f"Case{uuid.uuid4().hex[:8]}"
    r = registry.http.post("/v1/dev/models", headers=owner.headers, json={"repo_id": f"{ns}/x", "model_name": "x"})
    assert r.status_code == 201, r.text
    assert r.json()["repo_id"] == f"{ns}/x"  # the case given at creation is kept for display
    # Someone else can use the namespace in no spelling.
    for spelling in (ns.lower(), ns.upper()):
        r = registry.http.post(
            "/v1/dev/models", headers=other.headers, json={"repo_id": f"{spelling}/y", "model_name": "y"}
        )
        assert r.status_code == 403, r.text
    # The owner can (the namespace is theirs), but not a model that differs only by case.
    r = registry.http.post(
        "/v1/dev/models", headers=owner.headers, json={"repo_id": f"{ns.lower()}/y", "model_name": "y"}
    )
    assert r.status_code == 201, r.text
    r = registry.http.post(
        "/v1/dev/models", headers=owner.headers, json={"repo_id": f"{ns.upper()}/X", "model_name": "x"}
    )
    assert r.status_code == 409, r.text
    # Look-ups in any case find the model, and answer with its own spelling.
    for path in (f"/v1/models/{ns.upper()}/X", f"/v1/models/{ns.lower()}/x"):
        r = registry.http.get(path, headers=owner.headers)
        assert r.status_code == 200 and r.json()["repo_id"] == f"{ns}/x", (path, r.text)
    r = registry.http.post(f"/v1/dev/models/{ns.upper()}/X/versions", headers=owner.headers, json={"version": "v1"})
    assert r.status_code == 201 and r.json()["repo_id"] == f"{ns}/x", r.text
    r = registry.http.post(
        f"/v1/dev/models/{ns.lower()}/X/versions/v1/uploads/initiate",
        params={"filename": "a.bin"},
        headers=owner.headers,
    )
    assert r.status_code == 200, r.text
    assert r.json()["repo_id"] == f"{ns}/x" and r.json()["object_key"].startswith(f"uploads/{ns}/x/v1/")
    r = registry.http.patch(f"/v1/dev/models/{ns.lower()}/X", headers=owner.headers, json={"visibility": "public"})
    assert r.status_code == 200 and r.json()["repo_id"] == f"{ns}/x", r.text


async def test_identical_grants_created_at_once_are_one_grant_and_revoking_it_ends_access(
    registry, api_base_url, pg_settings
):
    dev = registry.register("GrantRace")
    repo = registry.create_model(dev, "private")
    plat = registry.create_user("platform", "GrantRacePlat")
    body = {"platform_user_id": plat.user_id, "repo_id": repo, "permitted_from_ts": int(time.time()) - 5}
    answers = await _at_once(
        api_base_url, [("POST", "/v1/admin/grants", {"headers": registry.admin, "json": body})] * N
    )
    assert {r.status_code for r in answers} == {201}, [r.text for r in answers if r.status_code != 201]
    ids = {r.json()["grant_id"] for r in answers}
    assert len(ids) == 1, ids
    assert (
        _count(
            pg_settings,
            "select count(*) from grants where platform_user_id = %s and revoked_ts is null",
            plat.user_id,
        )
        == 1
    )
    assert registry.http.get(f"/v1/models/{repo}", headers=plat.headers).status_code == 200
    r = registry.http.delete(f"/v1/admin/grants/{ids.pop()}", headers=registry.admin)
    assert r.status_code == 200 and r.json()["active"] is False
    assert registry.http.get(f"/v1/models/{repo}", headers=plat.headers).status_code == 404


def test_creating_a_grant_again_updates_it_in_place(registry):
    dev = registry.register("GrantAgain")
    repo = registry.create_model(dev, "private")
    plat = registry.create_user("platform", "GrantAgainPlat")
    now = int(time.time())
    first = registry.grant(plat, repo, now - 100)
    second = registry.grant(plat, repo.upper(), now - 50, now + 3600)  # the repo_id in another case: same model
    assert second["grant_id"] == first["grant_id"]
    assert (second["permitted_from_ts"], second["permitted_until_ts"]) == (now - 50, now + 3600)
    assert second["repo_id"] == repo
    listed = registry.http.get(
        "/v1/admin/grants", params={"platform_user_id": plat.user_id}, headers=registry.admin
    ).json()["items"]
    assert [g["grant_id"] for g in listed] == [first["grant_id"]]
    # Once revoked, a new grant is a new row; the revoked one stays for audit.
    registry.http.delete(f"/v1/admin/grants/{first['grant_id']}", headers=registry.admin)
    third = registry.grant(plat, repo, now - 10)
    assert third["grant_id"] != first["grant_id"]
    listed = registry.http.get(
        "/v1/admin/grants", params={"platform_user_id": plat.user_id}, headers=registry.admin
    ).json()["items"]
    assert [(g["grant_id"], g["revoked_ts"] is None) for g in listed] == [
        (first["grant_id"], False),
        (third["grant_id"], True),
    ]


@pytest.mark.parametrize("lookup", ["upper", "lower"])
def test_catalog_lookups_ignore_case(registry, pg_settings, minio_settings, lookup):
    dev = registry.register("CaseReader")
    ns = f"Mixed{uuid.uuid4().hex[:6]}"
    r = registry.http.post(
        "/v1/dev/models",
        headers=dev.headers,
        json={"repo_id": f"{ns}/Model", "model_name": "m", "visibility": "public"},
    )
    assert r.status_code == 201, r.text
    repo = f"{ns}/Model"
    registry.create_version(dev, repo, "v1")
    seed_file(pg_settings, minio_settings, repo, "v1")
    asked = repo.upper() if lookup == "upper" else repo.lower()
    reader = registry.register("CaseReader2")
    r = registry.http.get(f"/v1/files/{asked}/{SEED_FILE}/download", headers=reader.headers)
    assert r.status_code == 200 and r.json()["repo_id"] == repo, r.text
    r = registry.http.get(f"/v1/manifest/{asked}", headers=reader.headers)
    assert r.status_code == 200 and r.json()["repo_id"] == repo, r.text
    r = registry.http.get(f"/v1/models/{asked}/files", headers=reader.headers)
    assert r.status_code == 200 and r.json()["repo_id"] == repo and len(r.json()["items"]) == 1, r.text


def test_a_webhook_filter_takes_the_spelling_of_a_model_its_owner_may_see(registry):
    dev, other = registry.register("HookCase"), registry.register("HookCaseOther")
    repo = registry.create_model(dev, "private")
    hook = {"url": "http://1.1.1.1/registry-test-hook", "event_types": ["upload.verified"], "repo_id": repo.upper()}
    r = registry.http.post("/v1/webhooks", headers=dev.headers, json=hook)
    assert r.status_code == 201 and r.json()["repo_id"] == repo, r.text  # events carry the model's spelling
    r = registry.http.patch(f"/v1/webhooks/{r.json()['id']}", headers=dev.headers, json={"repo_id": repo.upper()})
    assert r.status_code == 200 and r.json()["repo_id"] == repo, r.text
    # Someone who may not see the model learns nothing about it: their filter stays as they wrote it.
    r2 = registry.http.post("/v1/webhooks", headers=other.headers, json=hook)
    assert r2.status_code == 201 and r2.json()["repo_id"] == repo.upper(), r2.text
    for who, created in ((dev, r), (other, r2)):
        assert registry.http.delete(f"/v1/webhooks/{created.json()['id']}", headers=who.headers).status_code == 204
