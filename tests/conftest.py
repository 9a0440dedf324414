"""Fixtures shared by every suite. Settings come from the environment that `make test` exports
(deploy/local/env.sh); their defaults match the local stack's."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import psycopg
import pytest

from registry_shared.settings import KafkaSettings, MinioSettings, PostgresSettings
from registry_shared.storage import legacy_object_key, minio_client


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


# ---------------------------------------------------------------- the api over real HTTP

ADMIN_TOKEN = os.environ.get("REGISTRY_ADMIN_TOKEN", "changeme")


@dataclass
class Account:
    """A user of the running api and its key."""

    user_id: int
    api_key: str
    email: str
    role: str

    @property
    def headers(self) -> dict[str, str]:
        return {"x-api-key": self.api_key}


class Registry:
    """A thin client of the running api for tests: accounts, models, uploads."""

    def __init__(self, http: httpx.Client) -> None:
        self.http = http
        self.admin = {"x-admin-token": ADMIN_TOKEN}

    def register(self, name: str = "Dev") -> Account:
        email = f"{name.lower()}-{uuid.uuid4().hex[:12]}@example.com"
        r = self.http.post("/v1/users/register", json={"email": email, "name": name})
        assert r.status_code == 200, r.text
        return Account(r.json()["user_id"], r.json()["api_key"], email, "developer")

    def create_user(self, role: str, name: str = "User") -> Account:
        email = f"{role}-{uuid.uuid4().hex[:12]}@partner.example"
        r = self.http.post("/v1/admin/users", headers=self.admin, json={"email": email, "name": name, "role": role})
        assert r.status_code == 200, r.text
        return Account(r.json()["user_id"], r.json()["api_key"], email, role)

    def create_model(self, dev: Account, visibility: str = "private", **meta: object) -> str:
        repo_id = f"ns{uuid.uuid4().hex[:10]}/model-{uuid.uuid4().hex[:6]}"
        body = {"repo_id": repo_id, "model_name": f"Model {repo_id}", "visibility": visibility, **meta}
        r = self.http.post("/v1/dev/models", headers=dev.headers, json=body)
        assert r.status_code == 201, r.text
        return repo_id

    def create_version(self, dev: Account, repo_id: str, version: str = "v1") -> None:
        r = self.http.post(f"/v1/dev/models/{repo_id}/versions", headers=dev.headers, json={"version": version})
        assert r.status_code == 201, r.text

    def upload(self, dev: Account, repo_id: str, version: str, filename: str, data: bytes, **declared: object) -> dict:
        """initiate → presigned PUT of real bytes → complete (declared size/sha256 overridable)."""
        r = self.http.post(
            f"/v1/dev/models/{repo_id}/versions/{version}/uploads/initiate",
            params={"filename": filename, "expires": 900},
            headers=dev.headers,
        )
        assert r.status_code == 200, r.text
        put = httpx.put(r.json()["url"], content=data, timeout=60)
        assert put.status_code == 200, put.text
        body = {"rfilename": filename, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(), **declared}
        r = self.http.post(
            f"/v1/dev/models/{repo_id}/versions/{version}/uploads/complete", headers=dev.headers, json=body
        )
        assert r.status_code == 200, r.text
        return r.json()

    def wait_upload(self, dev: Account, upload_id: int, timeout: float = 30.0) -> dict:
        """Poll until ingest's verdict has been applied (available, rejected or expired)."""
        deadline = time.monotonic() + timeout
        while True:
            r = self.http.get(f"/v1/dev/uploads/{upload_id}", headers=dev.headers)
            assert r.status_code == 200, r.text
            if r.json()["status"] not in ("initiated", "pending_verification"):
                return r.json()
            assert time.monotonic() < deadline, f"no verdict for upload {upload_id} within {timeout}s: {r.json()}"
            time.sleep(0.1)

    def publish(self, dev: Account, repo_id: str, version: str, filename: str, data: bytes) -> dict:
        """Upload a correct file and wait until it is available."""
        up = self.upload(dev, repo_id, version, filename, data)
        done = self.wait_upload(dev, up["upload_id"])
        assert done["status"] == "available", done
        return done

    def grant(self, platform: Account, repo_id: str, from_ts: int | None = None, until_ts: int | None = None) -> dict:
        body = {
            "platform_user_id": platform.user_id,
            "repo_id": repo_id,
            "permitted_from_ts": from_ts or int(time.time()) - 5,
        }
        if until_ts is not None:
            body["permitted_until_ts"] = until_ts
        r = self.http.post("/v1/admin/grants", headers=self.admin, json=body)
        assert r.status_code == 201, r.text
        return r.json()


@pytest.fixture(scope="session")
def registry(api_base_url: str) -> Iterator[Registry]:
    with httpx.Client(base_url=api_base_url, timeout=30) as http:
        yield Registry(http)


def free_port() -> int:
    """A TCP port nobody listens on right now (loopback)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_api(**env: str) -> tuple[subprocess.Popen, str]:
    """Start an extra api process on a free port with `env` overrides; returns (process, base URL)."""
    port = free_port()
    full_env = {
        **os.environ,
        "API_PORT": str(port),
        "OUTBOX_RELAY": "false",
        "API_CONSUME_EVENTS": "false",
        "API_RUN_MIGRATIONS": "false",
        **env,
    }
    proc = subprocess.Popen(
        ["uv", "run", "--no-sync", "registry-api"], env=full_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"api did not start: {proc.stderr.read().decode()[-2000:] if proc.stderr else ''}")
        time.sleep(0.2)


def stop_process(proc: subprocess.Popen) -> None:
    """Stop a process the tests started (TERM, then KILL)."""
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def api_process_without_admin_token() -> Iterator[str]:
    proc, base = spawn_api(REGISTRY_ADMIN_TOKEN="")
    yield base
    stop_process(proc)


SEED_FILE = "config/model.safetensors"
SEED_BODY = b"seeded-bytes-" + uuid.uuid4().hex.encode()


def seed_file(pg_settings, minio_settings, repo_id: str, version: str) -> None:
    """Put SEED_FILE into a version straight into the catalog (Postgres + the object in MinIO under hf/),
    the way an operator loads an existing catalog: tests of authorization and caching then do not
    depend on the ingest worker's timing. hf/ objects are never judged by ingest."""
    key = legacy_object_key(repo_id, f"{version}/{SEED_FILE}")
    minio_client(minio_settings).put_object(minio_settings.minio_bucket, key, io.BytesIO(SEED_BODY), len(SEED_BODY))
    with psycopg.connect(pg_settings.database_url) as conn:
        conn.execute(
            "insert into files (model_id, version_id, rfilename, size, sha256, object_key)"
            " select m.id, v.id, %s, %s, %s, %s from models m join versions v on v.model_id = m.id"
            " where m.repo_id = %s and v.version = %s",
            [SEED_FILE, len(SEED_BODY), hashlib.sha256(SEED_BODY).hexdigest(), key, repo_id, version],
        )
