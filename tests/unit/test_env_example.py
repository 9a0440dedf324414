"""`.env.example` lists every variable the services read (their pydantic-settings fields)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic_settings import BaseSettings

from registry_analytics.settings import AnalyticsSettings
from registry_api.hf.service import HfSettings
from registry_api.settings import ApiSettings
from registry_api.webhooks.targets import TargetSettings
from registry_ingest.settings import IngestSettings
from registry_notifier.settings import NotifierSettings

ROOT = Path(__file__).resolve().parents[2]
LISTED = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]*)=", (ROOT / ".env.example").read_text(), re.MULTILINE))


def _variables(cls: type[BaseSettings]) -> set[str]:
    prefix = cls.model_config.get("env_prefix", "")
    names = set()
    for name, field in cls.model_fields.items():
        alias = field.validation_alias if isinstance(field.validation_alias, str) else field.alias
        names.add((alias or f"{prefix}{name}").upper())
    return names


@pytest.mark.parametrize(
    "cls", [ApiSettings, HfSettings, TargetSettings, IngestSettings, AnalyticsSettings, NotifierSettings]
)
def test_every_setting_is_in_env_example(cls):
    missing = sorted(_variables(cls) - LISTED)
    assert not missing, f"{cls.__name__} reads variables .env.example does not list: {missing}"


def test_the_spec_variables_are_listed():
    spec = {"MINIO_ENDPOINT", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD", "MINIO_BUCKET", "MINIO_SECURE"}
    assert spec | {"REGISTRY_ADMIN_TOKEN"} <= LISTED
