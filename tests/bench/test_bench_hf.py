"""Benchmark of the Hugging Face–compatible surface, each against its baseline in the same run:

- `HEAD /hf/{repo}/resolve/main/{file}` (what `hf_hub_download` asks for every file) against the native
  `GET /v1/files/{repo}/{file}/download`, same caller, same file, same load tool, alternating rounds.
  Target: resolve ≥ 0.8× the native requests/s.
- `snapshot_download` of a 200-file model against fetching the same presigned URLs directly with the same
  concurrency (and writing the files). Target: wall time ≤ 1.3× the direct fetch.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psycopg
import pytest
from huggingface_hub import constants, snapshot_download
from huggingface_hub.utils import _detect_agent
from test_bench_api_download import _wait_until_caught_up, paused
from wrk import WrkResult, _ms, run_wrk

from registry_shared.storage import legacy_object_key, minio_client

pytestmark = pytest.mark.bench
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
SECONDS = int(os.environ.get("BENCH_SECONDS", "5"))
CONNS = 64
FILES = 200
FILE_SIZE = int(os.environ.get("BENCH_HF_FILE_KIB", "1024")) * 1024
WORKERS = 8  # snapshot_download's default max_workers


def _head_wrk(url: str, headers: dict[str, str], connections: int) -> WrkResult:
    """wrk with HEAD requests (a one-line script), figures read as tests/bench/wrk.py reads them."""
    assert url.startswith("http://127.0.0.1:")
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write('wrk.method = "HEAD"\n')
        script = f.name
    try:
        cmd = [
            shutil.which("wrk") or "wrk",
            "-t",
            "1",
            "-c",
            str(CONNS),
            "-d",
            f"{SECONDS}s",
            "--latency",
            "-s",
            script,
            url,
        ]
        for k, v in headers.items():
            cmd += ["-H", f"{k}: {v}"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=SECONDS + 30, check=True).stdout
    finally:
        os.unlink(script)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return WrkResult(
        float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        _ms(re.search(r"\s50%\s+(\S+)", out).group(1)),
        _ms(re.search(r"\s99%\s+(\S+)", out).group(1)),
        int(non2xx.group(1)) if non2xx else 0,
        int(re.search(r"(\d+) requests in", out).group(1)),
    )


def _seed(registry, pg_settings, minio_settings, n: int, size: int) -> tuple[str, dict[str, bytes]]:
    """A private model whose version v1 holds `n` files, loaded like the operator's catalog (objects under
    hf/, rows as ingest would publish them: the verification itself is not what is measured)."""
    dev = registry.register("HfBench")
    repo = registry.create_model(dev, "private")
    registry.create_version(dev, repo, "v1")
    client = minio_client(minio_settings)
    files = {f"shard/{i // 50}/part-{i:04d}.bin": os.urandom(size) for i in range(n)}
    rows = []
    for name, data in files.items():
        key = legacy_object_key(repo, f"v1/{name}")
        client.put_object(minio_settings.minio_bucket, key, io.BytesIO(data), len(data))
        rows.append((name, len(data), hashlib.sha256(data).hexdigest(), key))
    with psycopg.connect(pg_settings.database_url) as conn:
        for name, length, sha, key in rows:
            conn.execute(
                "insert into files (model_id, version_id, rfilename, size, sha256, object_key)"
                " select m.id, v.id, %s, %s, %s, %s from models m join versions v on v.model_id = m.id"
                " where m.repo_id = %s",
                [name, length, sha, key, repo],
            )
        conn.execute("select pg_notify('registry_catalog_changed', %s)", [repo])
    return repo, files


def test_resolve_vs_native_download(registry, pg_settings, minio_settings, api_base_url):
    """wrk loses every connection on HEAD answers above a few connections (on any endpoint: its parser does
    not know the request was a HEAD), so the load at 64 connections, the asserted figure, is the resolve's
    GET, the same code path (`resolve_answer`, the redirect) as its HEAD; the HEAD itself is measured at 8
    connections and printed."""
    repo, files = _seed(registry, pg_settings, minio_settings, 1, 1024)
    name = next(iter(files))
    plat = registry.create_user("platform", "HfBenchPlat")
    registry.grant(plat, repo, int(time.time()) - 5)
    native = f"{api_base_url}/v1/files/{repo}/{name}/download"
    resolve = f"{api_base_url}/hf/{repo}/resolve/main/{name}"
    h = {"x-api-key": plat.api_key}
    # As `localhost`: the answer is the redirect (the object store is on another host name). On the store's
    # own host name HEAD answers 200 with the object's Content-Length.
    rh = {"authorization": f"Bearer {plat.api_key}", "host": f"localhost:{api_base_url.rsplit(':', 1)[1]}"}
    assert httpx.get(native, headers=h).status_code == 200
    assert httpx.head(resolve, headers=rh).status_code == 302
    assert httpx.get(resolve, headers=rh).status_code == 302
    runs = {
        "native": lambda: run_wrk(native, CONNS, SECONDS, h),
        "resolve GET": lambda: run_wrk(resolve, CONNS, SECONDS, rh),
        "native c8": lambda: run_wrk(native, 8, SECONDS, h),
        "resolve HEAD c8": lambda: _head_wrk(resolve, rh, 8),
    }
    results: dict[str, list[WrkResult]] = {k: [] for k in runs}
    with paused("analytics"):
        for i in range(ROUNDS):  # alternating which goes first: the machine's load drifts
            for k in list(runs) if i % 2 == 0 else list(runs)[::-1]:
                results[k].append(runs[k]())
    _wait_until_caught_up(f"http://127.0.0.1:{os.environ.get('ANALYTICS_PORT', '8083')}/healthz")
    # A HEAD round that wrk lost entirely (every connection dropped by its parser, 0 requests) says nothing
    # about the server: it is reported and left out of the HEAD median.
    lost = [r for r in results["resolve HEAD c8"] if r.requests == 0]
    results["resolve HEAD c8"] = [r for r in results["resolve HEAD c8"] if r.requests > 0] or lost
    med = {k: statistics.median(r.rps for r in v) for k, v in results.items()}
    p99 = {k: statistics.median(r.p99_ms for r in v) for k, v in results.items()}
    ratio = med["resolve GET"] / med["native"]
    ratio_head = med["resolve HEAD c8"] / med["native c8"]
    for k in runs:
        print(f"\n[bench hf] {k}: {med[k]:.0f} req/s, p99 {p99[k]:.1f} ms; rounds {[round(r.rps) for r in results[k]]}")
    print(
        f"[bench hf] resolve / native download: {ratio:.2f}x at {CONNS} connections (target >= 0.8x);"
        f" HEAD {ratio_head:.2f}x at 8 ({len(lost)} HEAD rounds lost by wrk)"
    )
    assert all(r.errors == 0 for k, v in results.items() if k != "resolve HEAD c8" for r in v)
    assert ratio >= 0.8


def test_snapshot_download_vs_direct_presigned(registry, pg_settings, minio_settings, api_base_url, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_PROGRESS_BARS", True)
    monkeypatch.setattr(_detect_agent, "_registry", _detect_agent._EMPTY_REGISTRY)
    repo, files = _seed(registry, pg_settings, minio_settings, FILES, FILE_SIZE)
    dev_key = registry.create_user("admin", "HfBenchAdmin").api_key  # sees every model
    endpoint = f"{api_base_url}/hf"

    def snapshot(root: Path) -> float:
        t = time.perf_counter()
        out = Path(snapshot_download(repo, endpoint=endpoint, token=dev_key, cache_dir=root, max_workers=WORKERS))
        took = time.perf_counter() - t
        assert {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()} == files
        return took

    def direct(root: Path) -> float:
        t = time.perf_counter()
        r = httpx.get(
            f"{api_base_url}/v1/models/{repo}/files",
            params={"presign": "true"},
            headers={"x-api-key": dev_key},
            timeout=60,
        )
        items = r.json()["items"]
        with httpx.Client(timeout=60) as http:

            def fetch(item: dict) -> None:
                target = root / item["rfilename"]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(http.get(item["presigned_url"]).content)

            with ThreadPoolExecutor(WORKERS) as pool:
                list(pool.map(fetch, items))
        took = time.perf_counter() - t
        assert len(items) == FILES
        return took

    times: dict[str, list[float]] = {"snapshot": [], "direct": []}
    with paused("analytics"), tempfile.TemporaryDirectory() as tmp:
        for i in range(ROUNDS):  # alternating which goes first
            runs = [("direct", direct, f"d{i}"), ("snapshot", snapshot, f"s{i}")]
            for name, run, sub in runs if i % 2 == 0 else runs[::-1]:
                times[name].append(run(Path(tmp) / sub))
            shutil.rmtree(Path(tmp) / f"d{i}")
            shutil.rmtree(Path(tmp) / f"s{i}")
    _wait_until_caught_up(f"http://127.0.0.1:{os.environ.get('ANALYTICS_PORT', '8083')}/healthz")
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["snapshot"] / med["direct"]
    print(
        f"\n[bench hf] snapshot_download of {FILES} files x {FILE_SIZE // 1024} KiB: {med['snapshot']:.2f} s vs"
        f" direct presigned fetch {med['direct']:.2f} s ({WORKERS} workers): {ratio:.2f}x (target <= 1.3x);"
        f" rounds snapshot={[round(x, 2) for x in times['snapshot']]} direct={[round(x, 2) for x in times['direct']]}"
    )
    assert ratio <= 1.3
