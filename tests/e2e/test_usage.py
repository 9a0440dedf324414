"""Usage analytics end to end: reads through the api → outbox → Kafka → analytics (ClickHouse engine)
→ back through the api's usage endpoints, with the right numbers within seconds."""

from __future__ import annotations

import time

from conftest import SEED_FILE as FILE
from conftest import seed_file


def poll(fn, check, wait_s: float = 20.0):
    deadline = time.monotonic() + wait_s
    while True:
        body = fn()
        if check(body):
            return body
        assert time.monotonic() < deadline, f"usage never matched: {body}"
        time.sleep(0.25)


def test_reads_show_up_in_both_usage_endpoints(registry, pg_settings, minio_settings):
    dev = registry.register("Owner")
    repos = [registry.create_model(dev, "private") for _ in range(2)]
    for repo in repos:
        registry.create_version(dev, repo, "v1")
        seed_file(pg_settings, minio_settings, repo, "v1")
    plat = registry.create_user("platform", "Usage Plat")
    for repo in repos:
        registry.grant(plat, repo)
    http = registry.http
    t0 = int(time.time())
    for _ in range(3):
        assert http.get(f"/v1/files/{repos[0]}/{FILE}/download", headers=plat.headers).status_code == 200
    assert http.get(f"/v1/files/{repos[1]}/{FILE}/download", headers=plat.headers).status_code == 200
    for _ in range(2):
        assert http.get(f"/v1/models/{repos[0]}/files", headers=plat.headers).status_code == 200
    assert http.get(f"/v1/manifest/{repos[1]}", headers=plat.headers).status_code == 200
    assert http.get("/v1/platform/manifest", headers=plat.headers).status_code == 200

    want = {"events": 8, "manifests": 2, "files_list": 2, "downloads": 4}
    me = poll(
        lambda: http.get("/v1/users/me/usage", headers=plat.headers).json(),
        lambda b: b.get("totals") == want,
    )
    assert me["distinct_models"] == 2
    assert me["top_models"][0] == {"repo_id": repos[0], "downloads": 3}
    assert {"repo_id": repos[1], "downloads": 1} in me["top_models"]
    assert me["last_seen_ts"] >= t0
    assert sum(d["events"] for d in me["timeseries_daily"]) == 8
    assert sum(d["downloads"] for d in me["timeseries_daily"]) == 4

    admin = poll(
        lambda: http.get("/v1/admin/usage", params={"filter_user_id": plat.user_id}, headers=registry.admin).json(),
        # the user's e-mail and name come with user.registered, on another topic than the access events
        lambda b: b.get("totals") == want and b.get("top_users") and b["top_users"][0]["email"],
    )
    (user,) = admin["top_users"]
    assert (user["user_id"], user["email"], user["name"]) == (plat.user_id, plat.email, "Usage Plat")
    assert (user["events"], user["downloads"]) == (8, 4)
    by_email = http.get("/v1/admin/usage", params={"filter_email": plat.email}, headers=registry.admin).json()
    assert by_email["totals"] == want
    # the developer did nothing countable
    mine = http.get("/v1/users/me/usage", headers=dev.headers).json()
    assert mine["totals"] == {"events": 0, "manifests": 0, "files_list": 0, "downloads": 0}
