"""The `registry` command against the real stack (api, ingest, MinIO, Kafka, Postgres), run as a subprocess
exactly as a user runs it: the installed console script, its own config and cache folders."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from conftest import ADMIN_TOKEN, Account, Registry

REGISTRY = str(Path(sys.executable).parent / "registry")
MiB = 1024 * 1024
BIG = 12 * MiB  # above the threshold below: 3 parts of 5 MiB (5, 5, 2)
SMALL_PARTS = {"REGISTRY_PART_SIZE": "5M", "REGISTRY_MULTIPART_THRESHOLD": "8M"}


@dataclass
class Cli:
    """Runs `registry` with a home of its own (config, cache) against the stack's api."""

    base_url: str
    home: Path

    def env(self, key: str | None = None, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_") and not k.startswith("XDG_")}
        env.update(
            REGISTRY_URL=self.base_url,
            XDG_CONFIG_HOME=str(self.home / "config"),
            XDG_CACHE_HOME=str(self.home / "cache"),
            COLUMNS="200",
            **SMALL_PARTS,
        )
        if key:
            env["REGISTRY_API_KEY"] = key
        env.update(extra)
        return env

    def run(
        self, *args: str, key: str | None = None, timeout: float = 180, **extra: str
    ) -> subprocess.CompletedProcess:
        return subprocess.run(
            [REGISTRY, *args], env=self.env(key, **extra), capture_output=True, text=True, timeout=timeout
        )

    def json(self, *args: str, key: str | None = None, **extra: str) -> dict:
        done = self.run(*args, "--json", key=key, **extra)
        assert done.returncode == 0, f"registry {' '.join(args)} → {done.returncode}: {done.stderr}"
        return json.loads(done.stdout)

    def start(self, *args: str, key: str | None = None, **extra: str) -> subprocess.Popen:
        return subprocess.Popen(
            [REGISTRY, *args], env=self.env(key, **extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )


@pytest.fixture
def cli(api_base_url: str, tmp_path: Path) -> Cli:
    return Cli(api_base_url, tmp_path / "home")


@pytest.fixture
def model_folder(tmp_path: Path) -> Path:
    """A model folder: one file above the multipart threshold, two small ones, one in a subfolder."""
    root = tmp_path / "model"
    (root / "tokenizer").mkdir(parents=True)
    (root / "model.safetensors.bin").write_bytes(os.urandom(BIG))
    (root / "config.json").write_text('{"architectures": ["Bert"]}')
    (root / "tokenizer" / "vocab.txt").write_text("hello\nworld\n")
    return root


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_line_error(done: subprocess.CompletedProcess) -> str:
    """The command failed with exactly one line on stderr and no traceback; that line."""
    assert done.returncode != 0, done
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert "Traceback" not in done.stderr, done.stderr
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: "), lines
    return lines[0]


def wait_until(check: Callable[[], object], timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def stored_parts(http: httpx.Client, dev: Account, repo_id: str, rfilename: str) -> int | None:
    """How many parts of the file's open multipart upload MinIO holds (via the API's list-parts), or None."""
    ups = http.get(f"/v1/dev/models/{repo_id}/versions/v1/uploads", headers=dev.headers).json()["items"]
    open_ups = [u for u in ups if u["rfilename"] == rfilename and u["status"] == "initiated"]
    if not open_ups:
        return None
    r = http.get(f"/v1/dev/uploads/{open_ups[-1]['upload_id']}/parts", headers=dev.headers)
    assert r.status_code == 200, r.text
    return len(r.json()["parts"])


def new_model(registry: Registry, dev: Account) -> str:
    repo_id = registry.create_model(dev)
    registry.create_version(dev, repo_id, "v1")
    return repo_id


# ---------------------------------------------------------------- login


def test_login_stores_the_key_0600_and_the_environment_wins(cli: Cli, registry: Registry) -> None:
    dev, other = registry.register("Dev"), registry.register("Other")
    bad = cli.run("login", "--api-key", "sk_live_wrong")
    assert "invalid or revoked api key" in one_line_error(bad)
    assert bad.returncode == 3
    assert not (cli.home / "config" / "registry" / "config.json").exists()

    done = cli.run("login", "--api-key", dev.api_key)
    assert done.returncode == 0, done.stderr
    stored = cli.home / "config" / "registry" / "config.json"
    assert stored.stat().st_mode & 0o777 == 0o600
    assert json.loads(stored.read_text())["api_key"] == dev.api_key
    assert cli.json("whoami")["email"] == dev.email
    assert cli.json("whoami", key=other.api_key)["email"] == other.email  # REGISTRY_API_KEY wins

    assert cli.run("logout").returncode == 0
    assert cli.run("whoami").returncode == 3


# ---------------------------------------------------------------- publish → grant → download


def test_publish_grant_download_byte_identical(
    cli: Cli, registry: Registry, model_folder: Path, tmp_path: Path
) -> None:
    dev = registry.register("Dev")
    repo_id = f"ns{os.urandom(5).hex()}/bert"
    assert cli.json("models", "create", repo_id, key=dev.api_key)["repo_id"] == repo_id
    assert cli.json("versions", "create", repo_id, "v1", key=dev.api_key)["version"] == "v1"

    up = cli.json("upload", repo_id, str(model_folder), "--version", "v1", key=dev.api_key)
    by_name = {f["rfilename"]: f for f in up["files"]}
    assert set(by_name) == {"model.safetensors.bin", "config.json", "tokenizer/vocab.txt"}  # relative paths kept
    assert all(f["status"] == "available" for f in up["files"]), up
    big = by_name["model.safetensors.bin"]
    assert (big["parts_total"], big["parts_sent"]) == (3, 3)  # multipart above the threshold
    assert big["sha256"] == sha256_of(model_folder / "model.safetensors.bin")
    assert by_name["config.json"]["parts_total"] == 1  # single PUT below it
    assert [v["version"] for v in cli.json("versions", "list", repo_id, key=dev.api_key)["items"]] == ["v1"]
    files = cli.json("files", "list", repo_id, key=dev.api_key)["items"]
    assert {f["rfilename"]: f["sha256"] for f in files}["model.safetensors.bin"] == big["sha256"]

    # The same upload again: nothing is sent, every file is already published.
    again = cli.json("upload", repo_id, str(model_folder), "--version", "v1", key=dev.api_key)
    assert all(f["skipped"] and f["status"] == "available" for f in again["files"]), again

    # An admin (REGISTRY_ADMIN_TOKEN) creates a platform user and grants it the model.
    plat = cli.json("users", "create", "--email", f"p{os.urandom(4).hex()}@partner.example", "--name", "Plat",
                    "--role", "platform", REGISTRY_ADMIN_TOKEN=ADMIN_TOKEN)  # fmt: skip
    assert cli.run("models", "show", repo_id, key=plat["api_key"]).returncode == 4  # not granted yet
    grant = cli.json("grants", "create", "--user-id", str(plat["user_id"]), "--repo", repo_id,
                     REGISTRY_ADMIN_TOKEN=ADMIN_TOKEN)  # fmt: skip
    assert grant["active"] is True
    listed = cli.json("grants", "list", "--repo", repo_id, REGISTRY_ADMIN_TOKEN=ADMIN_TOKEN)["items"]
    assert [g["grant_id"] for g in listed] == [grant["grant_id"]]

    # The platform user downloads it, verified, byte-identical.
    target = tmp_path / "download"
    down = cli.json("download", repo_id, "--local-dir", str(target), key=plat["api_key"])
    assert {f["status"] for f in down["files"]} == {"downloaded"}
    for rel in ("model.safetensors.bin", "config.json", "tokenizer/vocab.txt"):
        assert (target / rel).read_bytes() == (model_folder / rel).read_bytes(), rel
    assert not list(target.rglob("*.part"))
    manifest = cli.json("manifest", repo_id, key=plat["api_key"])
    assert len(manifest["files"]) == 3
    assert cli.json("manifest", key=plat["api_key"])["items"][0]["repo_id"] == repo_id

    # Present and verified: skipped; a file changed locally is fetched again.
    (target / "config.json").write_text("tampered")
    second = {f["rfilename"]: f["status"] for f in cli.json("download", repo_id, "--local-dir", str(target),
                                                             key=plat["api_key"])["files"]}  # fmt: skip
    assert second == {"model.safetensors.bin": "already verified", "tokenizer/vocab.txt": "already verified",
                      "config.json": "downloaded"}  # fmt: skip
    assert (target / "config.json").read_bytes() == (model_folder / "config.json").read_bytes()

    # By version, into the default cache layout: <cache>/models/<repo_id>/<version>/<rfilename>.
    by_version = cli.json("download", repo_id, "--version", "v1", key=plat["api_key"])
    cached = cli.home / "cache" / "registry" / "models" / repo_id / "v1" / "model.safetensors.bin"
    assert by_version["files"][0]["path"] == str(cached) or cached.is_file()
    assert sha256_of(cached) == big["sha256"]

    until = int(time.time()) + 3600
    updated = cli.json("grants", "update", str(grant["grant_id"]), "--until", str(until),
                       REGISTRY_ADMIN_TOKEN=ADMIN_TOKEN)  # fmt: skip
    assert (updated["permitted_until_ts"], updated["active"]) == (until, True)
    assert set(cli.json("usage", key=plat["api_key"])["totals"]) >= {"events", "downloads"}

    # Revoked: the platform user no longer sees it; the command says so in one line.
    cli.json("grants", "revoke", str(grant["grant_id"]), REGISTRY_ADMIN_TOKEN=ADMIN_TOKEN)
    gone = cli.run("download", repo_id, "--local-dir", str(tmp_path / "again"), key=plat["api_key"])
    assert gone.returncode == 4
    assert "model not found" in one_line_error(gone)


# ---------------------------------------------------------------- resume, re-signing, rejection


def test_upload_killed_halfway_resumes_sending_only_the_missing_parts(
    cli: Cli, registry: Registry, tmp_path: Path
) -> None:
    dev = registry.register("Dev")
    repo_id = new_model(registry, dev)
    big = tmp_path / "weights.bin"
    big.write_bytes(os.urandom(BIG))
    # One part at a time at 4 MiB/s: part 1 is stored after ~1.3 s, the whole file would take ~3 s.
    proc = cli.start("upload", repo_id, str(big), "-v", "v1", "--parallel", "1", "--limit-rate", "4M",
                     key=dev.api_key)  # fmt: skip
    with httpx.Client(base_url=cli.base_url, timeout=30) as http:
        try:
            wait_until(lambda: (stored_parts(http, dev, repo_id, "weights.bin") or 0) >= 1, 60, "a stored part")
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        before = stored_parts(http, dev, repo_id, "weights.bin")
    assert before is not None and 1 <= before < 3, before

    done = cli.json("upload", repo_id, str(big), "-v", "v1", key=dev.api_key)
    (res,) = done["files"]
    assert res["resumed"] is True
    assert res["parts_reused"] == before
    assert res["parts_sent"] == 3 - before  # only the missing parts went over the wire
    assert res["status"] == "available", res  # ingest streamed the assembled object: size and sha256 match
    assert res["sha256"] == sha256_of(big)
    assert not list((cli.home / "cache" / "registry" / "uploads").glob("*.json"))  # the resume state is gone


def test_ctrl_c_stops_with_one_line_and_the_same_command_resumes(cli: Cli, registry: Registry, tmp_path: Path) -> None:
    dev = registry.register("Dev")
    repo_id = new_model(registry, dev)
    big = tmp_path / "weights.bin"
    big.write_bytes(os.urandom(BIG))
    proc = cli.start("upload", repo_id, str(big), "-v", "v1", "--parallel", "1", "--limit-rate", "4M",
                     key=dev.api_key)  # fmt: skip
    with httpx.Client(base_url=cli.base_url, timeout=30) as http:
        wait_until(lambda: (stored_parts(http, dev, repo_id, "weights.bin") or 0) >= 1, 60, "a stored part")
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert [line for line in stderr.splitlines() if line.strip()] == [
        "error: interrupted: run the same command again to resume"
    ]
    assert len(list((cli.home / "cache" / "registry" / "uploads").glob("*.json"))) == 1  # the resume state

    (res,) = cli.json("upload", repo_id, str(big), "-v", "v1", key=dev.api_key)["files"]
    assert res["resumed"] is True and res["parts_reused"] >= 1
    assert res["parts_reused"] + res["parts_sent"] == 3
    assert res["status"] == "available", res


def test_an_expired_part_url_is_signed_again(cli: Cli, registry: Registry, tmp_path: Path) -> None:
    dev = registry.register("Dev")
    repo_id = new_model(registry, dev)
    big = tmp_path / "weights.bin"
    big.write_bytes(os.urandom(BIG))
    # Part URLs live 1 s; parts are asked for in a batch and sent one after another at 4 MiB/s (~1.3 s each),
    # so the URL of part 2 has expired by the time it is used: MinIO refuses it and the client signs it again.
    done = cli.json("upload", repo_id, str(big), "-v", "v1", "--parallel", "1", "--limit-rate", "4M",
                    "--url-expires", "1", key=dev.api_key)  # fmt: skip
    (res,) = done["files"]
    assert res["urls_resigned"] >= 1, res
    assert res["parts_sent"] == 3
    assert res["status"] == "available", res


@pytest.mark.parametrize("size", [BIG, 1000], ids=["multipart", "single-put"])
def test_bytes_changed_after_hashing_are_rejected_with_the_reason(
    cli: Cli, registry: Registry, tmp_path: Path, size: int
) -> None:
    dev = registry.register("Dev")
    repo_id = new_model(registry, dev)
    f = tmp_path / "weights.bin"
    f.write_bytes(os.urandom(size))
    # Test hook: the client flips a byte of what it sends after hashing it, so the declared sha256 is wrong.
    done = cli.run("upload", repo_id, str(f), "-v", "v1", key=dev.api_key,
                   REGISTRY_TEST_CORRUPT_AFTER_HASH="weights.bin")  # fmt: skip
    assert done.returncode == 6, done.stderr
    line = one_line_error(done)
    assert "weights.bin: rejected (sha256_mismatch" in line, line
    assert sha256_of(f) in line  # the declared sha256 in ingest's detail


def segments_done(part: Path) -> int:
    """Bytes of the blocks a segmented download recorded as written (its `<file>.part.json`), 0 if none yet."""
    try:
        state = json.loads(part.with_name(part.name + ".json").read_text())
    except (OSError, ValueError):
        return 0
    block, size = state["block"], state["size"]
    return sum(min(block, size - i * block) for i in state["done"])


@pytest.mark.parametrize("mode", ["one-stream", "segments"])
def test_download_interrupted_halfway_resumes(cli: Cli, registry: Registry, tmp_path: Path, mode: str) -> None:
    dev = registry.register("Dev")
    repo_id = new_model(registry, dev)
    data = os.urandom(BIG)
    registry.publish(dev, repo_id, "v1", "weights.bin", data)
    plat = registry.create_user("platform")
    registry.grant(plat, repo_id)
    target = tmp_path / "dl"
    part = target / "weights.bin.part"
    # One stream into the .part (a Range from its size on resume), or blocks 3 at a time (those done are kept).
    opts = {"REGISTRY_SEGMENT_THRESHOLD": "64M" if mode == "one-stream" else "4M"}
    fetched = (lambda: part.stat().st_size if part.is_file() else 0) if mode == "one-stream" else (
        lambda: segments_done(part))  # fmt: skip
    proc = cli.start("download", repo_id, "--local-dir", str(target), "--limit-rate", "4M", "--segments", "3",
                     key=plat.api_key, **opts)  # fmt: skip
    try:
        wait_until(lambda: fetched() >= 3 * MiB, 60, "half a download")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    have = fetched()
    assert 0 < have < BIG
    assert not (target / "weights.bin").exists()  # never renamed into place unverified

    done = cli.json("download", repo_id, "--local-dir", str(target), key=plat.api_key, **opts)
    (res,) = done["files"]
    assert res["resumed_from"] == have  # only the rest was asked for (Range)
    assert res["status"] == "downloaded"
    assert (target / "weights.bin").read_bytes() == data
    assert not part.exists() and not part.with_name(part.name + ".json").exists()


def test_a_corrupt_partial_download_is_refused_and_removed(cli: Cli, registry: Registry, tmp_path: Path) -> None:
    dev = registry.register("Dev")
    repo_id = new_model(registry, dev)
    data = os.urandom(2 * MiB)
    registry.publish(dev, repo_id, "v1", "weights.bin", data)
    plat = registry.create_user("platform")
    registry.grant(plat, repo_id)
    target = tmp_path / "dl"
    target.mkdir()
    (target / "weights.bin.part").write_bytes(b"X" * MiB)  # a partial file whose bytes are not the model's
    done = cli.run("download", repo_id, "--local-dir", str(target), key=plat.api_key)
    assert done.returncode == 7
    assert "do not match" in one_line_error(done)
    assert not (target / "weights.bin").exists() and not (target / "weights.bin.part").exists()
    again = cli.json("download", repo_id, "--local-dir", str(target), key=plat.api_key)
    assert again["files"][0]["status"] == "downloaded"
    assert (target / "weights.bin").read_bytes() == data


# ---------------------------------------------------------------- mistakes: one line, an exit code


def test_bad_arguments_give_one_clear_line_and_a_non_zero_exit(cli: Cli, registry: Registry, tmp_path: Path) -> None:
    dev = registry.register("Dev")
    repo_id = new_model(registry, dev)
    f = tmp_path / "x.bin"
    f.write_bytes(b"x")
    cases = [
        (("upload", repo_id, str(f)), dev.api_key, 2, "Missing option '--version'"),
        (("upload", repo_id, str(tmp_path / "nope"), "-v", "v1"), dev.api_key, 2, "no such file or folder"),
        (("upload", repo_id, str(f), "-v", "v1", "--part-size", "banana"), dev.api_key, 2, "--part-size"),
        (("upload", repo_id, str(f), "-v", "v9"), dev.api_key, 4, "version not found"),
        (("upload", "not-a-repo", str(f), "-v", "v1"), dev.api_key, 2, "invalid repo_id"),
        (("models", "show", "nobody/nothing"), dev.api_key, 4, "model not found"),
        (("whoami",), "sk_live_wrong", 3, "invalid or revoked api key"),
        (("whoami",), None, 3, "registry login"),
        (("grants", "list"), dev.api_key, 3, "REGISTRY_ADMIN_TOKEN"),
        (("grants", "create", "--user-id", "abc", "--repo", repo_id), None, 2, "--user-id"),
        (("grants", "create", "--user-id", "1", "--repo", repo_id, "--from", "yesterday"), None, 2, "--from"),
        (("usage", "--since", "soon"), dev.api_key, 2, "--since"),
        (("versions", "create", repo_id, "v1"), dev.api_key, 5, "version already exists"),
        (("nonsense",), None, 2, "No such command"),
    ]
    for args, key, code, text in cases:
        done = cli.run(*args, key=key)
        line = one_line_error(done)
        assert done.returncode == code, (args, done.returncode, line)
        assert text in line, (args, line)

    helped = cli.run("upload", "--help")
    assert helped.returncode == 0 and "--version" in helped.stdout
