"""The stack's own scripts: `up` is idempotent and fast when warm, `down` leaves no process,
`reset` leaves no data. Runs a second, private stack (own folder, own ports) beside the main one."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

from conftest import free_port

STACK = Path(__file__).resolve().parents[2] / "deploy/local/stack.sh"
INFRA = ["postgres", "kafka", "minio"]


def processes_under(folder: Path) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(folder) in cmd and "pytest" not in cmd:
            found.append(f"{pid}: {cmd[:160]}")
    return found


def test_up_down_reset(tmp_path):
    # tmp_path's parent is private to root; the stack must still work there (it lets `postgres` traverse).
    local = tmp_path / "stack"
    env = {
        **os.environ,
        "LOCAL_DIR": str(local),
        "PG_PORT": str(free_port()),
        "KAFKA_PORT": str(free_port()),
        "KAFKA_CONTROLLER_PORT": str(free_port()),
        "MINIO_PORT": str(free_port()),
        "MINIO_CONSOLE_PORT": str(free_port()),
    }
    for var in ("DATABASE_URL", "KAFKA_BOOTSTRAP_SERVERS", "MINIO_ENDPOINT", "CHDB_PATH", "API_BASE_URL"):
        env.pop(var, None)  # derived from the ports above by env.sh

    def stack(*args: str) -> str:
        r = subprocess.run(["bash", str(STACK), *args], env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        return r.stdout + r.stderr

    try:
        stack("up", *INFRA)
        pids = {c: (local / "run" / f"{c}.pid").read_text().strip() for c in INFRA}
        t0 = time.monotonic()
        out = stack("up", *INFRA)  # warm: starts nothing, just checks
        warm = time.monotonic() - t0
        assert warm < 60, f"a second `up` took {warm:.1f}s"
        assert re.search(r"ready in \d+ s", out)
        assert {c: (local / "run" / f"{c}.pid").read_text().strip() for c in INFRA} == pids, "restarted something"
        assert set(stack("running").split()) == set(INFRA)
        assert (local / "data" / "postgres" / "PG_VERSION").exists()
    finally:
        stack("down")
    deadline = time.monotonic() + 20
    while processes_under(local):
        assert time.monotonic() < deadline, "left running: " + "; ".join(processes_under(local))
        time.sleep(0.2)
    assert stack("running").strip() == ""
    stack("reset")
    assert not (local / "data").exists() and not (local / "run").exists()
