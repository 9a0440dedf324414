"""Rate limits (issue 15): two api processes of their own with low limits, sharing one Postgres.

A key over its budget gets 429 with Retry-After and RateLimit-* headers (on the routed endpoints and on
the download fast path alike), other keys are unaffected, the two processes share one budget (together
they do not let through more than one bucket's worth), and after Retry-After the key works again.
Self-registration is limited per client IP; the admin token is exempt."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest
from conftest import Registry, spawn_api, stop_process

PER_MINUTE = 12  # a token every 5 s
REGISTER_PER_MINUTE = 3


@pytest.fixture(scope="module")
def two_apis() -> Iterator[tuple[str, str]]:
    env = {
        "RATE_LIMITS_ENABLED": "true",
        "RATE_LIMIT_DEVELOPER_PER_MINUTE": str(PER_MINUTE),
        "RATE_LIMIT_PLATFORM_PER_MINUTE": str(PER_MINUTE),
        "RATE_LIMIT_ADMIN_PER_MINUTE": str(PER_MINUTE),
        "RATE_LIMIT_REGISTER_PER_MINUTE": str(REGISTER_PER_MINUTE),
    }
    a, base_a = spawn_api(**env)
    try:
        b, base_b = spawn_api(**env)
    except Exception:
        stop_process(a)
        raise
    yield base_a, base_b
    stop_process(b)
    stop_process(a)


def _assert_limited(r: httpx.Response) -> int:
    assert r.status_code == 429, r.text
    assert r.json()["detail"].startswith("rate limit exceeded")
    retry_after = int(r.headers["retry-after"])
    assert 1 <= retry_after <= 60 // PER_MINUTE + 1
    assert r.headers["ratelimit-limit"] == str(PER_MINUTE)
    assert r.headers["ratelimit-remaining"] == "0"
    assert int(r.headers["ratelimit-reset"]) == retry_after
    return retry_after


def test_two_processes_share_one_budget_and_it_refills(registry: Registry, two_apis: tuple[str, str]) -> None:
    dev = registry.create_user("developer")  # the admin token, on the main api
    other = registry.create_user("developer")
    ok = 0
    limited: httpx.Response | None = None
    started = time.monotonic()
    for i in range(4 * PER_MINUTE):
        r = httpx.get(f"{two_apis[i % 2]}/v1/users/me", headers=dev.headers, timeout=10)
        if r.status_code == 429:
            limited = r
            break
        assert r.status_code == 200, r.text
        ok += 1
    assert limited is not None, "never limited"
    elapsed = time.monotonic() - started
    refilled = int(elapsed * PER_MINUTE / 60) + 1
    # One budget between the two processes: never two buckets' worth (2 x 12)
    assert PER_MINUTE // 2 <= ok <= PER_MINUTE + refilled, ok
    retry_after = _assert_limited(limited)
    # both processes refuse the key now, the routed endpoints and the download fast path alike
    for base in two_apis:
        _assert_limited(httpx.get(f"{base}/v1/models", headers=dev.headers, timeout=10))
        _assert_limited(httpx.get(f"{base}/v1/files/a/b/c.bin/download", headers=dev.headers, timeout=10))
    # another key is unaffected, on both
    for base in two_apis:
        assert httpx.get(f"{base}/v1/users/me", headers=other.headers, timeout=10).status_code == 200
    # the admin token is exempt
    for _ in range(3 * PER_MINUTE):
        r = httpx.get(f"{two_apis[0]}/v1/models", headers=registry.admin, timeout=10)
        assert r.status_code == 200, r.text
    time.sleep(retry_after + 0.5)
    r = httpx.get(f"{two_apis[1]}/v1/users/me", headers=dev.headers, timeout=10)
    assert r.status_code == 200, r.text


def test_registration_is_limited_per_client_ip(two_apis: tuple[str, str]) -> None:
    import uuid

    statuses = []
    for i in range(3 * REGISTER_PER_MINUTE):
        email = f"rl-{uuid.uuid4().hex[:10]}@example.com"
        r = httpx.post(f"{two_apis[i % 2]}/v1/users/register", json={"email": email, "name": "R"}, timeout=10)
        statuses.append(r.status_code)
        if r.status_code == 429:
            assert int(r.headers["retry-after"]) >= 1
            assert r.headers["ratelimit-limit"] == str(REGISTER_PER_MINUTE)
            break
    assert statuses[-1] == 429, statuses
    assert statuses.count(200) <= REGISTER_PER_MINUTE + 1, statuses


def test_openapi_documents_429(registry: Registry) -> None:
    spec = registry.http.get("/openapi.json").json()
    for path, method in [("/v1/users/me", "get"), ("/v1/users/register", "post"), ("/v1/dev/models", "post")]:
        answer = spec["paths"][path][method]["responses"]["429"]
        assert {"Retry-After", "RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset"} <= set(answer["headers"])
    download = spec["paths"]["/v1/files/{file_path}/download"]["get"]["responses"]
    assert "429" in download
