"""Run wrk against loopback and read its figures."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


@dataclass
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    requests: int = 0


def _ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s)", text)
    assert m, text
    return float(m.group(1)) * _UNITS[m.group(2)]


def run_wrk(
    url: str, connections: int, seconds: int, headers: dict[str, str] | None = None, threads: int = 1
) -> WrkResult:
    """Bounded load: `seconds` long, on loopback only."""
    assert url.startswith("http://127.0.0.1:"), "load goes to loopback only"
    wrk = shutil.which("wrk")
    assert wrk, "wrk is not installed (apt-get install wrk)"
    cmd = [wrk, "-t", str(threads), "-c", str(connections), "-d", f"{seconds}s", "--latency", url]
    for k, v in (headers or {}).items():
        cmd += ["-H", f"{k}: {v}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p50 = _ms(re.search(r"\s50%\s+(\S+)", out).group(1))
    p99 = _ms(re.search(r"\s99%\s+(\S+)", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    socket_err = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = int(non2xx.group(1)) if non2xx else 0
    if socket_err:
        errors += sum(int(x) for x in socket_err.groups())
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    return WrkResult(rps, p50, p99, errors, requests)
