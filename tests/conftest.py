"""Fixtures shared by every suite. Settings come from the environment that `make test` exports
(deploy/local/env.sh); their defaults match the local stack's."""

from __future__ import annotations

import os
import uuid

import pytest
from registry_shared.settings import KafkaSettings, MinioSettings, PostgresSettings


@pytest.fixture(scope="session")
def pg_settings() -> PostgresSettings:
    return PostgresSettings()


@pytest.fixture(scope="session")
def kafka_settings() -> KafkaSettings:
    return KafkaSettings()


@pytest.fixture(scope="session")
def minio_settings() -> MinioSettings:
    return MinioSettings()


@pytest.fixture(scope="session")
def api_base_url() -> str:
    return os.environ.get("API_BASE_URL", "http://127.0.0.1:8081")


@pytest.fixture
def unique() -> str:
    """A short unique token for names that must not collide between tests or runs."""
    return uuid.uuid4().hex[:10]
