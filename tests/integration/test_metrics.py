"""Every service's Prometheus `/metrics` after a seed flow: register, model, uploads (good and bad), verdicts,
downloads, a webhook delivery. The counters are process-wide and the stack's services serve other tests too,
so each assertion is on the difference between a scrape before and one after the flow."""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
from conftest import Registry
from notifier_helpers import ServiceProcess, api_process, notifier_process, receiver, wait_consumer_ready, wait_for
from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _url(env: str, default: int) -> str:
    return f"http://127.0.0.1:{os.environ.get(env, default)}"


API = _url("API_PORT", 8081)
INGEST = _url("INGEST_PORT", 8082)
ANALYTICS = _url("ANALYTICS_PORT", 8083)


def scrape(base: str) -> Samples:
    r = httpx.get(f"{base}/metrics", timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    out: Samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def series(samples: Samples, name: str) -> list[dict[str, str]]:
    return [dict(labels) for (n, labels) in samples if n == name]


@pytest.fixture(scope="module")
def notifier() -> Iterator[ServiceProcess]:
    token = uuid.uuid4().hex[:10]
    proc = notifier_process(f"test-metrics-{token}", f"metrics-{token}", None).start()
    wait_consumer_ready(proc)
    try:
        yield proc
    finally:
        proc.stop()


def test_every_service_counts_the_seed_flow(registry: Registry, notifier: ServiceProcess) -> None:
    before = {name: scrape(url) for name, url in (("api", API), ("ingest", INGEST), ("analytics", ANALYTICS))}
    before["notifier"] = scrape(notifier.url)
    started = time.time()

    dev = registry.register("Metrics")
    repo = registry.create_model(dev)
    registry.create_version(dev, repo, "v1")
    with receiver() as hook_target:
        # A webhook on the verdicts of this developer's uploads, delivered by the notifier of this test (the
        # stack's notifier does not deliver to loopback). Subscribed through an api that allows loopback.
        api_proc = api_process(allow_private="127.0.0.0/8").start()
        try:
            r = httpx.post(
                f"{api_proc.url}/v1/webhooks",
                headers={"x-api-key": dev.api_key},
                json={"url": hook_target.url, "event_types": ["upload.verified", "upload.rejected"]},
                timeout=10,
            )
            assert r.status_code == 201, r.text
        finally:
            api_proc.stop()

        good = [os.urandom(1000), os.urandom(2500)]
        bad = os.urandom(700)
        uploads = [registry.upload(dev, repo, "v1", f"w{i}.bin", data) for i, data in enumerate(good)]
        uploads.append(registry.upload(dev, repo, "v1", "bad.bin", bad, sha256=hashlib.sha256(b"other").hexdigest()))
        verdicts = [registry.wait_upload(dev, u["upload_id"], timeout=60)["status"] for u in uploads]
        assert verdicts == ["available", "available", "rejected"]

        downloads = 4
        for _ in range(downloads):
            r = registry.http.get(f"/v1/files/{repo}/w0.bin/download", headers=dev.headers)
            assert r.status_code == 200, r.text
        r = registry.http.get("/v1/files/no/such/file/download", headers=dev.headers)
        assert r.status_code == 404

        wait_for(lambda: len(hook_target.events()) >= 3, 60, "the three verdict webhooks")

    # ingest: verdicts by verdict and reason equal the uploads made, bytes those streamed
    ingest = scrape(INGEST)
    assert delta(before["ingest"], ingest, "registry_verifications_total", verdict="verified", reason="ok") == 2
    assert (
        delta(before["ingest"], ingest, "registry_verifications_total", verdict="rejected", reason="sha256_mismatch")
        == 1
    )
    assert delta(before["ingest"], ingest, "registry_verification_bytes_total", verdict="verified") == sum(
        map(len, good)
    )
    assert delta(before["ingest"], ingest, "registry_verification_bytes_total", verdict="rejected") == len(bad)
    assert (
        delta(
            before["ingest"],
            ingest,
            "registry_consumer_messages_total",
            consumer="ingest-uploads",
            group="registry-ingest",
            outcome="handled",
        )
        >= 3  # initiated + completed of each upload (at least the completions)
    )
    assert {"group": "registry-ingest", "topic": "registry.uploads.v1"}.items() <= next(
        iter(s for s in series(ingest, "registry_consumer_lag") if s["topic"] == "registry.uploads.v1")
    ).items()

    # api: HTTP by route template (never the raw path), downloads, the verdicts applied, outbox, lag
    api = scrape(API)
    download_route = "/v1/files/{file_path:path}/download"
    assert (
        delta(before["api"], api, "registry_http_requests_total", method="POST", route="/v1/dev/models", status="201")
        == 1
    )
    assert (
        delta(before["api"], api, "registry_http_requests_total", method="GET", route=download_route, status="200")
        == downloads
    )
    assert (
        delta(before["api"], api, "registry_http_requests_total", method="GET", route=download_route, status="404") == 1
    )
    assert (
        delta(before["api"], api, "registry_http_request_duration_seconds_count", method="GET", route=download_route)
        == downloads + 1
    )
    assert not any(repo in s.get("route", "") for s in series(api, "registry_http_requests_total"))
    assert delta(before["api"], api, "registry_downloads_total") == downloads
    assert (
        delta(
            before["api"],
            api,
            "registry_consumer_messages_total",
            consumer="verdict-consumer",
            group="registry-api-verdicts",
            outcome="handled",
        )
        >= 3
    )
    assert delta(before["api"], api, "registry_outbox_published_total") >= 3 + downloads
    assert ("registry_outbox_depth", frozenset()) in api
    assert value(api, "registry_outbox_oldest_age_seconds") >= 0
    groups = {s["group"] for s in series(api, "registry_consumer_lag")}
    assert {"registry-api-verdicts", "registry-api-downloads"} <= groups

    # analytics: the download events loaded, and how fresh the newest is
    def loaded() -> Samples | None:
        now = scrape(ANALYTICS)
        return now if delta(before["analytics"], now, "registry_analytics_rows_loaded_total") >= downloads else None

    analytics = wait_for(loaded, 60, "the download events loaded by analytics")
    assert value(analytics, "registry_analytics_newest_event_timestamp_seconds") >= started - 1
    assert value(analytics, "registry_analytics_last_load_timestamp_seconds") >= started
    assert any(s["group"] == "registry-analytics" for s in series(analytics, "registry_consumer_lag"))
    r = httpx.get(f"{ANALYTICS}/v1/usage/users/{dev.user_id}", timeout=10)
    assert r.status_code == 200
    analytics = scrape(ANALYTICS)
    assert (
        value(analytics, "registry_http_requests_total", method="GET", route="/v1/usage/users/{user_id}", status="200")
        >= 1
    )

    # notifier: three deliveries, no failure, no retry
    notified = scrape(notifier.url)
    assert delta(before["notifier"], notified, "registry_webhook_delivery_attempts_total", outcome="delivered") == 3
    assert delta(before["notifier"], notified, "registry_webhook_delivery_attempts_total", outcome="failed") == 0
    assert delta(before["notifier"], notified, "registry_webhook_retries_total") == 0
    handled = [
        value(notified, "registry_consumer_messages_total", **labels)
        - value(before["notifier"], "registry_consumer_messages_total", **labels)
        for labels in series(notified, "registry_consumer_messages_total")
        if labels["consumer"] == "notifier-events" and labels["outcome"] == "handled"
    ]
    assert handled and handled[0] >= 3
