"""The observability stack (`OBSERVABILITY=1 make test`; skipped without it): Prometheus loads the alert rules and scrapes the
four services, the Operations dashboard's PromQL evaluates against it, the alerts fire on the series they are
meant for (promtool's rule tests), and one upload is one trace in Jaeger from the api's `complete` through
ingest's verification to the notifier's webhook delivery."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import uuid
from pathlib import Path

import httpx
import pytest
from conftest import Registry
from notifier_helpers import api_process, notifier_process, receiver, wait_consumer_ready, wait_for

ROOT = Path(__file__).resolve().parents[2]
OBSERVABILITY = ROOT / "deploy" / "observability"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "registry-operations.json"
CACHE = Path(os.environ.get("REGISTRY_CACHE_DIR", Path.home() / ".cache" / "model-registry"))
PROMTOOL = CACHE / f"prometheus-{os.environ.get('PROMETHEUS_VERSION', 'v0.316.0')}" / "promtool"
PROMETHEUS = f"http://127.0.0.1:{os.environ.get('PROMETHEUS_PORT', 9090)}"
JAEGER = f"http://127.0.0.1:{os.environ.get('JAEGER_UI_PORT', 16686)}"

pytestmark = pytest.mark.skipif(
    os.environ.get("OBSERVABILITY") != "1", reason="the observability stack is off (OBSERVABILITY=1 starts it)"
)


def promql(expr: str) -> list[dict]:
    r = httpx.get(f"{PROMETHEUS}/api/v1/query", params={"query": expr}, timeout=10)
    assert r.status_code == 200, (expr, r.text)
    body = r.json()
    assert body["status"] == "success", (expr, body)
    return body["data"]["result"]


def test_promtool_checks_the_rules_and_their_tests() -> None:
    check = subprocess.run([PROMTOOL, "check", "rules", OBSERVABILITY / "alerts.yml"], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 8 rules found" in check.stdout
    tests = subprocess.run(
        [PROMTOOL, "test", "rules", "alerts_test.yml"], cwd=OBSERVABILITY, capture_output=True, text=True
    )
    assert tests.returncode == 0, tests.stdout + tests.stderr
    assert "SUCCESS" in tests.stdout


def test_prometheus_loaded_the_rules_and_scrapes_the_four_services() -> None:
    rules = httpx.get(f"{PROMETHEUS}/api/v1/rules", timeout=10).json()["data"]["groups"]
    (group,) = [g for g in rules if g["name"] == "model-registry"]
    names = {r["name"] for r in group["rules"]}
    assert names >= {"ConsumerLagHigh", "OutboxBacklog", "DeadLettersGrowing", "VerificationFailures"}
    assert all(r["health"] in ("ok", "unknown") for r in group["rules"]), group["rules"]

    def all_up() -> dict[str, str] | None:
        targets = httpx.get(f"{PROMETHEUS}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
        health = {t["labels"]["job"]: t["health"] for t in targets}
        return health if health == dict.fromkeys(("api", "ingest", "analytics", "notifier"), "up") else None

    wait_for(all_up, 60, "the four services scraped", interval=1)
    assert {s["metric"]["job"] for s in promql("registry_http_requests_total")} >= {"api", "analytics", "notifier"}


def test_every_operations_panel_evaluates_against_prometheus() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["panels"]
    with_data = 0
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            result = promql(target["expr"].replace("$__rate_interval", "1m"))
            with_data += bool(result)
    # The services have been scraped: lag, HTTP rates and latency, outbox depth have series at least.
    assert with_data >= 5
    assert promql("sum by (group) (registry_consumer_lag)")


def _trace_spans(trace_id: str) -> list[tuple[str, str]]:
    r = httpx.get(f"{JAEGER}/api/traces/{trace_id}", timeout=10)
    if r.status_code != 200:
        return []
    (trace,) = r.json()["data"]
    return [(trace["processes"][s["processID"]]["serviceName"], s["operationName"]) for s in trace["spans"]]


def test_one_upload_is_one_trace_in_jaeger(registry: Registry) -> None:
    token = uuid.uuid4().hex[:10]
    notifier = notifier_process(f"test-traces-{token}", f"traces-{token}", None).start()
    try:
        wait_consumer_ready(notifier)
        dev = registry.register("Traced")
        repo = registry.create_model(dev)
        registry.create_version(dev, repo, "v1")
        with receiver() as target:
            api = api_process(allow_private="127.0.0.0/8").start()
            try:
                r = httpx.post(
                    f"{api.url}/v1/webhooks",
                    headers={"x-api-key": dev.api_key},
                    json={"url": target.url, "event_types": ["upload.verified"]},
                    timeout=10,
                )
                assert r.status_code == 201, r.text
            finally:
                api.stop()
            data = os.urandom(2048)
            up = registry.upload(dev, repo, "v1", "traced.bin", data)
            assert registry.wait_upload(dev, up["upload_id"], timeout=60)["status"] == "available"
            (delivered,) = wait_for(lambda: target.events("registry.upload.verified.v1"), 60, "the webhook")
        # The receiver got the trace context in the event; its trace id names the trace in Jaeger.
        traceparent = delivered.event["traceparent"]
        trace_id = traceparent.split("-")[1]
        assert hashlib.sha256(data).hexdigest() == delivered.event["data"]["sha256"]

        wanted = {
            ("api", "POST /v1/dev/models/{repo_id}/versions/{version}/uploads/complete"),
            ("ingest", "ingest verify"),
            ("notifier", "webhook deliver"),
        }

        def complete() -> list[tuple[str, str]] | None:
            spans = _trace_spans(trace_id)
            return spans if wanted <= set(spans) else None

        spans = wait_for(complete, 60, f"trace {trace_id} with {wanted}", interval=1)
        assert ("ingest", "ingest registry.upload.completed.v1") in spans
        assert ("api", "apply registry.upload.verified.v1") in spans
        # SQL spans (psycopg's instrumentation) are in it too
        assert any(service == "api" and op.lower().startswith(("select", "insert", "update")) for service, op in spans)
    finally:
        notifier.stop()
