"""The shipped Postman collection runs green with newman against the running stack."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_postman_collection_passes_with_newman(api_base_url):
    newman = ROOT / "node_modules/.bin/newman"
    assert newman.exists(), "run `npm ci` (make test does)"
    result = subprocess.run(
        [
            str(newman),
            "run",
            str(ROOT / "postman/Model Registry API.postman_collection.json"),
            "-e",
            str(ROOT / "postman/Model Registry - Local.postman_environment.json"),
            "--env-var",
            f"baseUrl={api_base_url}",
            "--env-var",
            f"adminToken={os.environ.get('REGISTRY_ADMIN_TOKEN', 'changeme')}",
            "--reporters",
            "cli",
            "--color",
            "off",
            "--timeout-request",
            "30000",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "AssertionError" not in result.stdout
