"""STORAGE_BACKEND picks the implementation; STORAGE_NOTIFICATIONS defaults to what the backend can do."""

from __future__ import annotations

import pytest

from registry_shared.settings import MinioSettings
from registry_shared.storage_backend import MinioBackend, SeaweedfsBackend, backend_for


@pytest.mark.parametrize(
    ("backend", "notifications", "mode", "cls"),
    [
        ("minio", None, "kafka", MinioBackend),
        ("minio", "none", "none", MinioBackend),
        ("seaweedfs", None, "none", SeaweedfsBackend),
    ],
)
def test_mode_follows_the_backend_unless_set(backend, notifications, mode, cls):
    s = MinioSettings(storage_backend=backend, storage_notifications=notifications)
    assert s.notifications == mode
    assert type(backend_for(s)) is cls


def test_settings_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("STORAGE_BACKEND", "seaweedfs")
    monkeypatch.setenv("STORAGE_NOTIFICATIONS", "")  # as .env.example has it: follow the backend
    assert MinioSettings().notifications == "none"
    monkeypatch.setenv("STORAGE_NOTIFICATIONS", "kafka")
    assert MinioSettings().notifications == "kafka"
    monkeypatch.setenv("STORAGE_BACKEND", "ceph")
    with pytest.raises(ValueError, match="storage_backend"):
        MinioSettings()


def test_seaweedfs_refuses_kafka_notifications():
    backend = backend_for(MinioSettings(storage_backend="seaweedfs", storage_notifications="kafka"))
    assert backend.can_notify is False
    with pytest.raises(RuntimeError, match="no S3 bucket notifications"):
        backend.setup_notifications()
