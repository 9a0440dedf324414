"""Benchmark of the `registry` command's transfers (run with `make bench B=tests/bench/test_bench_cli.py`).

The same bytes (4 GiB by default; `BENCH_CLI_BYTES` for another size) against the stack's MinIO:

1. Upload: `registry upload` (multipart, parts in parallel, sha256 computed in the same pass) against
   `curl --upload-file` of the file to one presigned PUT (no hashing at all). Target: ≥ 0.9x curl's rate.
2. Download: `registry download` (sha256 verified before the file is renamed into place) against `curl` of the
   file's presigned URL to a file (no verification). Target: ≥ 0.9x curl's rate. curl writes its file into the
   same folder (the same disk) as the CLI writes its own, not to /dev/null: that is the fair comparison, both
   paying for the page cache and the disk.

Every measure is the wall time of the command, process start-up included; the rounds alternate, and each
figure is the best of its rounds (`BENCH_CLI_ROUNDS`, default 2).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))

from conftest import Registry
from test_cli import REGISTRY, Cli

MiB = 1024 * 1024
SIZE = int(os.environ.get("BENCH_CLI_BYTES", str(4 * 1024 * MiB)))
ROUNDS = int(os.environ.get("BENCH_CLI_ROUNDS", "2"))


def write_file(path: Path, size: int) -> str:
    """`size` bytes (a 64 MiB random block repeated; MinIO does not compress) and their sha256."""
    block = os.urandom(64 * MiB)
    sha = hashlib.sha256()
    with path.open("wb") as f:
        left = size
        while left:
            chunk = block[: min(left, len(block))]
            f.write(chunk)
            sha.update(chunk)
            left -= len(chunk)
    return sha.hexdigest()


def timed(args: list[str], env: dict[str, str] | None = None) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=3600)
    elapsed = time.perf_counter() - t0
    assert done.returncode == 0, f"{args[0]} {args[1]} → {done.returncode}: {done.stderr[-2000:]}"
    return elapsed, done


def rate(seconds: float) -> str:
    return f"{SIZE / MiB / seconds:8.1f} MiB/s ({seconds:6.2f} s)"


@pytest.mark.bench
@pytest.mark.timeout(7200)
def test_bench_cli_transfers(api_base_url: str, registry: Registry, tmp_path: Path) -> None:
    dev = registry.register("Bench")
    repo_id = registry.create_model(dev)
    cli = Cli(api_base_url, tmp_path / "home")
    # As installed for a user, with bytecode: let the first run write it (this environment may forbid it).
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    subprocess.run([REGISTRY, "--help"], env=cli.env(dev.api_key), capture_output=True, check=True, timeout=300)
    src = tmp_path / "model.bin"
    digest = write_file(src, SIZE)
    http = httpx.Client(base_url=api_base_url, headers=dev.headers, timeout=60)

    # ------------------------------------------------------------ upload
    curl_up, cli_up = [], []
    for r in range(ROUNDS):
        version = f"v{r + 1}"
        registry.create_version(dev, repo_id, version)
        # Baseline: one presigned PUT of the whole file (another name, so both can live in the version).
        init = http.post(
            f"/v1/dev/models/{repo_id}/versions/{version}/uploads/initiate",
            params={"filename": "curl.bin", "expires": 3600},
        )
        assert init.status_code == 200, init.text
        t, _ = timed(["curl", "-sSf", "-o", "/dev/null", "--upload-file", str(src), init.json()["url"]])
        curl_up.append(t)
        # The client: multipart, sha256 in the same pass; it returns once the parts are assembled (--no-wait).
        t, done = timed(
            [REGISTRY, "upload", repo_id, str(src), "-v", version, "--no-wait", "--json"], cli.env(dev.api_key)
        )
        cli_up.append(t)
        (res,) = json.loads(done.stdout)["files"]
        assert res["sha256"] == digest and res["parts_sent"] == res["parts_total"] > 1, res
    verdict = registry.wait_upload(dev, res["upload_id"], timeout=1200)
    assert verdict["status"] == "available", verdict

    # ------------------------------------------------------------ download (of the last version's file)
    plat = registry.create_user("platform")
    registry.grant(plat, repo_id)
    curl_down, cli_down = [], []
    for r in range(ROUNDS):
        url = httpx.get(
            f"{api_base_url}/v1/files/{repo_id}/model.bin/download",
            params={"version": version, "expires": 3600},
            headers=plat.headers,
        ).json()["url"]
        out = tmp_path / f"curl-{r}.bin"
        t, _ = timed(["curl", "-sSf", "-o", str(out), url])
        curl_down.append(t)
        out.unlink()
        target = tmp_path / f"dl-{r}"
        t, done = timed(
            [REGISTRY, "download", repo_id, "-v", version, "--local-dir", str(target), "--json"],
            cli.env(plat.api_key),
        )
        cli_down.append(t)
        (res,) = json.loads(done.stdout)["files"]
        assert res["status"] == "downloaded" and res["sha256"] == digest, res
        assert (target / "model.bin").stat().st_size == SIZE
        (target / "model.bin").unlink()

    up_ratio = min(curl_up) / min(cli_up)
    down_ratio = min(curl_down) / min(cli_down)
    print(f"\n[bench cli] {SIZE / MiB:.0f} MiB, best of {ROUNDS} alternating rounds, process start-up included")
    print(f"  upload    curl --upload-file (one PUT, no hash) {rate(min(curl_up))}")
    print(
        f"            registry upload (multipart + sha256)  {rate(min(cli_up))}   ratio {up_ratio:.2f}x (target ≥ 0.9x)"
    )
    print(f"  download  curl -o (no verification)             {rate(min(curl_down))}")
    print(
        f"            registry download (sha256 verified)   {rate(min(cli_down))}   ratio {down_ratio:.2f}x (target ≥ 0.9x)"
    )
    print(f"  rounds: curl up {curl_up}, cli up {cli_up}, curl down {curl_down}, cli down {cli_down}")
    assert up_ratio >= 0.9, f"upload at {up_ratio:.2f}x curl"
    assert down_ratio >= 0.9, f"download at {down_ratio:.2f}x curl"
