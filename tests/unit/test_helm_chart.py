"""The Helm chart (deploy/helm/model-registry): `helm lint` and `helm template` pass, and the rendered manifests
give the services every variable they read (their settings, .env.example's service variables), with probes on
/healthz and /readyz, resources, replicas, PodDisruptionBudgets and the secrets in a Secret."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from pydantic_settings import BaseSettings

from registry_analytics.settings import AnalyticsSettings
from registry_api.settings import ApiSettings
from registry_ingest.settings import IngestSettings
from registry_notifier.settings import NotifierSettings
from registry_shared.settings import ClickHouseSettings, ServiceSettings

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "model-registry"
CACHE = Path(os.environ.get("REGISTRY_CACHE_DIR", Path.home() / ".cache" / "model-registry"))
HELM = CACHE / f"helm-{os.environ.get('HELM_VERSION', 'v4.3.2')}" / "helm"
SERVICES = ("api", "ingest", "analytics", "notifier")
#: Read by the services outside their settings classes: each one's port, and the OpenTelemetry exporter.
OTHER_VARIABLES = {"API_PORT", "INGEST_PORT", "ANALYTICS_PORT", "NOTIFIER_PORT", "OTEL_EXPORTER_OTLP_ENDPOINT"}
#: Variables of .env.example that only the local stack reads (ports and versions of its servers, test URLs).
LOCAL_ONLY = {
    "PG_PORT",
    "PG_USER",
    "PG_PASSWORD",
    "PG_DATABASE",
    "KAFKA_VERSION",
    "KAFKA_PORT",
    "KAFKA_CONTROLLER_PORT",
}
LOCAL_ONLY |= {"MINIO_VERSION", "MINIO_PORT", "MINIO_CONSOLE_PORT", "API_BASE_URL", "LOCAL_DIR", "REGISTRY_CACHE_DIR"}
LOCAL_ONLY |= {"OBSERVABILITY", "PROMETHEUS_VERSION", "PROMETHEUS_PORT", "PROMETHEUS_SCRAPE_INTERVAL", "HELM_VERSION"}
LOCAL_ONLY |= {"JAEGER_VERSION", "JAEGER_UI_PORT", "JAEGER_GRPC_PORT", "JAEGER_OTLP_PORT"}
LOCAL_ONLY |= {"SEAWEEDFS_VERSION", "SEAWEEDFS_PORT", "TEST_SECOND_STORE", "TEST_SECOND_STORE_SUBSET"}
LOCAL_ONLY |= {"API_REPLICAS", "INGEST_REPLICAS", "NOTIFIER_REPLICAS"}  # the chart's services.<name>.replicas
SECRET_KEYS = {"DATABASE_URL", "MINIO_ROOT_PASSWORD", "REGISTRY_ADMIN_TOKEN", "WEBHOOK_SECRET_KEY", "SMTP_PASSWORD"}


def _variables(cls: type[BaseSettings]) -> set[str]:
    prefix = cls.model_config.get("env_prefix", "")
    names = set()
    for name, field in cls.model_fields.items():
        alias = field.validation_alias if isinstance(field.validation_alias, str) else field.alias
        names.add((alias or f"{prefix}{name}").upper())
    return names


def helm(*args: str) -> str:
    assert HELM.exists(), f"{HELM} is missing (deploy/local/test.sh builds it with go install)"
    done = subprocess.run([HELM, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def manifests() -> list[dict]:
    out = helm("template", "reg", str(CHART), "--set", "secrets.REGISTRY_ADMIN_TOKEN=t0ken")
    return [doc for doc in yaml.safe_load_all(out) if doc]


def test_helm_lint_passes() -> None:
    assert "0 chart(s) failed" in helm("lint", "--strict", str(CHART))


def test_lint_fails_on_a_broken_values_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("services:\n  api:\n    replicas: [not, a, number\n")
    done = subprocess.run([HELM, "lint", str(CHART), "-f", str(bad)], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0


def _env_of(manifests: list[dict], service: str) -> set[str]:
    by_kind = {(d["kind"], d["metadata"]["name"]): d for d in manifests}
    deployment = by_kind[("Deployment", f"reg-model-registry-{service}")]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    names = {e["name"] for e in container.get("env", [])}
    for source in container["envFrom"]:
        if "configMapRef" in source:
            names |= set(by_kind[("ConfigMap", source["configMapRef"]["name"])]["data"])
        else:
            names |= set(by_kind[("Secret", source["secretRef"]["name"])]["stringData"])
    return names


def test_the_manifests_name_every_variable_the_services_read(manifests: list[dict]) -> None:
    read = set().union(
        *(_variables(c) for c in (ApiSettings, IngestSettings, AnalyticsSettings, NotifierSettings)),
        _variables(ClickHouseSettings),
        _variables(ServiceSettings),
    )
    example = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]*)=", (ROOT / ".env.example").read_text(), re.MULTILINE))
    for service in SERVICES:
        env = _env_of(manifests, service)
        missing = sorted(((read | example) - LOCAL_ONLY - OTHER_VARIABLES) - env)
        assert not missing, f"{service} lacks {missing}"
        assert {f"{service.upper()}_PORT", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_SERVICE_NAME"} <= env


def test_probes_resources_replicas_disruption_budgets_and_secrets(manifests: list[dict]) -> None:
    kinds = [(d["kind"], d["metadata"]["name"]) for d in manifests]
    for service in SERVICES:
        name = f"reg-model-registry-{service}"
        assert ("Service", name) in kinds and ("PodDisruptionBudget", name) in kinds
        deployment = next(d for d in manifests if d["kind"] == "Deployment" and d["metadata"]["name"] == name)
        spec = deployment["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert container["readinessProbe"]["httpGet"]["path"] == ("/readyz" if service == "api" else "/healthz")
        assert container["resources"]["requests"]["memory"]
        assert deployment["spec"]["replicas"] >= 1
        assert container["command"] == [f"registry-{service}"]
    (secret,) = [d for d in manifests if d["kind"] == "Secret"]
    assert SECRET_KEYS <= set(secret["stringData"])
    assert secret["stringData"]["REGISTRY_ADMIN_TOKEN"] == "t0ken"
    (config,) = [d for d in manifests if d["kind"] == "ConfigMap"]
    assert not SECRET_KEYS & set(config["data"])
    assert config["data"]["ANALYTICS_URL"] == "http://reg-model-registry-analytics:8083"


def test_an_existing_secret_replaces_the_charts(tmp_path: Path) -> None:
    out = helm("template", "reg", str(CHART), "--set", "existingSecret=prod-registry")
    docs = [d for d in yaml.safe_load_all(out) if d]
    assert not [d for d in docs if d["kind"] == "Secret"]
    refs = {
        s["secretRef"]["name"]
        for d in docs
        if d["kind"] == "Deployment"
        for s in d["spec"]["template"]["spec"]["containers"][0]["envFrom"]
        if "secretRef" in s
    }
    assert refs == {"prod-registry"}
