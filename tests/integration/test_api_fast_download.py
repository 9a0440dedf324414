"""The download hot path (catalog.fast_download, plain ASGI ahead of routing) answers exactly as the
documented FastAPI route does: same statuses, same bodies, same error messages, for every case."""

from __future__ import annotations

import time
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest
from conftest import SEED_FILE, seed_file

from registry_api.app import create_app
from registry_api.settings import ApiSettings


def _comparable(response: httpx.Response) -> tuple[int, dict]:
    body = response.json()
    if "url" in body:  # signed at the second each request was served: compare what it grants
        url = urlsplit(body.pop("url"))
        query = {k: v for k, v in parse_qsl(url.query) if k not in ("X-Amz-Date", "X-Amz-Signature")}
        body["url"] = (url.scheme, url.netloc, url.path, query)
    return response.status_code, body


async def test_fast_path_and_documented_route_answer_alike(registry, pg_settings, minio_settings):
    dev = registry.register("Fast")
    repo = registry.create_model(dev, "private")
    registry.create_version(dev, repo, "v1")
    seed_file(pg_settings, minio_settings, repo, "v1")
    plat = registry.create_user("platform")
    registry.grant(plat, repo, int(time.time()) - 5)
    stranger = registry.create_user("platform")
    later = registry.create_user("platform")
    registry.grant(later, repo, int(time.time()) + 3600)

    file = f"/v1/files/{repo}/{SEED_FILE}/download"
    cases = [
        (file, plat.headers),
        (file, dev.headers),
        (file, registry.admin),
        (file, {"x-admin-token": "wrong"}),
        (file, {}),
        (file, {"x-api-key": "sk_live_nope"}),
        (file, {"x-api-key": "junk"}),
        (file, stranger.headers),
        (file, later.headers),
        (f"{file}?expires=60", plat.headers),
        (f"{file}?expires=86400&version=v1", plat.headers),
        (f"{file}?expires=59", plat.headers),
        (f"{file}?expires=86401", plat.headers),
        (f"{file}?expires=abc", plat.headers),
        (f"{file}?expires=", plat.headers),
        (f"{file}?version=v2", plat.headers),
        (f"{file}?version={'v' * 65}", plat.headers),
        (f"{file}?version=bad%20label", plat.headers),
        (f"/v1/files/{repo}/../secret/download", plat.headers),
        (f"/v1/files/{repo}/a%5Cb/download", plat.headers),
        (f"/v1/files/{repo}/nope.bin/download", plat.headers),
        (f"/v1/files/{repo}/download", plat.headers),
        ("/v1/files/bad repo/x/f.bin/download", plat.headers),
    ]
    settings = ApiSettings(outbox_relay=False, api_consume_events=False, api_run_migrations=False)
    fast, routed = create_app(settings), create_app(settings, fast_download=False)
    async with fast.router.lifespan_context(fast), routed.router.lifespan_context(routed):
        async with (
            httpx.AsyncClient(transport=httpx.ASGITransport(app=fast), base_url="http://api") as a,
            httpx.AsyncClient(transport=httpx.ASGITransport(app=routed), base_url="http://api") as b,
        ):
            seen = set()
            for path, headers in cases:
                ra, rb = await a.get(path, headers=headers), await b.get(path, headers=headers)
                assert _comparable(ra) == _comparable(rb), path
                assert ra.headers["content-type"] == "application/json"
                assert len(ra.headers["x-request-id"]) == 32
                seen.add(ra.status_code)
    assert seen == {200, 401, 404, 422}, seen


@pytest.mark.parametrize("method", ["HEAD", "POST"])
async def test_other_methods_go_to_the_router(registry, method):
    settings = ApiSettings(outbox_relay=False, api_consume_events=False, api_run_migrations=False)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as c:
            r = await c.request(method, "/v1/files/a/b/c.bin/download")
    assert r.status_code == 405


async def test_fast_path_and_documented_route_refuse_alike_while_the_database_or_the_access_log_is_away(
    registry, pg_settings, minio_settings
):
    dev = registry.register("FastDown")
    repo = registry.create_model(dev, "private")
    registry.create_version(dev, repo, "v1")
    seed_file(pg_settings, minio_settings, repo, "v1")
    file = f"/v1/files/{repo}/{SEED_FILE}/download"
    settings = ApiSettings(outbox_relay=False, api_consume_events=False, api_run_migrations=False)
    fast, routed = create_app(settings), create_app(settings, fast_download=False)
    async with fast.router.lifespan_context(fast), routed.router.lifespan_context(routed):
        async with (
            httpx.AsyncClient(transport=httpx.ASGITransport(app=fast), base_url="http://api") as a,
            httpx.AsyncClient(transport=httpx.ASGITransport(app=routed), base_url="http://api") as b,
        ):
            for app in (fast, routed):  # what the monitor does when a probe fails
                app.state.db_monitor.down = True
            try:
                ra, rb = await a.get(file, headers=dev.headers), await b.get(file, headers=dev.headers)
            finally:
                for app in (fast, routed):
                    app.state.db_monitor.down = False
            assert (
                (ra.status_code, ra.json()) == (rb.status_code, rb.json()) == (503, {"detail": "database unavailable"})
            )
            assert ra.headers["retry-after"] == rb.headers["retry-after"] == "2"

            for app in (fast, routed):  # a full access-event buffer
                app.state.access.max_buffered = 0
            ra, rb = await a.get(file, headers=dev.headers), await b.get(file, headers=dev.headers)
            assert (
                (ra.status_code, ra.json())
                == (rb.status_code, rb.json())
                == (503, {"detail": "access log unavailable"})
            )
            assert ra.headers["retry-after"] == rb.headers["retry-after"] == "2"
