"""/docs and /redoc render their operations in a real browser (Debian's headless Chromium) with no route to the
internet: every address but loopback goes to a proxy that does not exist, so a page that needs a CDN is blank."""

from __future__ import annotations

import functools
import http.server
import shutil
import subprocess
import threading
from pathlib import Path

import httpx
import pytest
from fastapi.openapi.docs import get_swagger_ui_html

CHROMIUM = shutil.which("chromium")
#: Every request that is not to loopback goes to this dead proxy (`<-loopback>` removes Chromium's implicit bypass
#: of loopback only for the rule, so the api itself is still reached directly through the bypass list).
OFFLINE = ["--proxy-server=http://127.0.0.1:9", "--proxy-bypass-list=127.0.0.1"]


def render(url: str) -> str:
    """The DOM of `url` once its scripts ran (up to 20 s of virtual time)."""
    assert CHROMIUM, "chromium is not installed (deploy/local/test.sh installs it)"
    done = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            *OFFLINE,
            "--virtual-time-budget=20000",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.parametrize(
    ("page", "rendered"),
    [
        # Swagger UI: one `opblock` per operation, with its summary
        ("/docs", ["opblock-summary", 'class="opblock opblock-get', "Liveness", "Register and get an API key"]),
        # ReDoc: the operations in its menu and their sections
        ("/redoc", ['data-section-id="tag/Health"', "Liveness", "Register and get an API key"]),
    ],
)
def test_docs_render_without_internet(api_base_url: str, page: str, rendered: list[str]) -> None:
    dom = render(f"{api_base_url}{page}")
    for marker in rendered:
        assert marker in dom, f"{page}: {marker!r} not rendered ({len(dom)} bytes of DOM)"


def test_a_page_that_needs_a_cdn_stays_blank_here(api_base_url: str, tmp_path: Path) -> None:
    """The check above can fail: FastAPI's default page (Swagger UI from a CDN), served with the api's own
    OpenAPI document from the same origin, renders no operation here."""
    (tmp_path / "openapi.json").write_bytes(httpx.get(f"{api_base_url}/openapi.json", timeout=10).content)
    (tmp_path / "docs.html").write_bytes(get_swagger_ui_html(openapi_url="/openapi.json", title="cdn").body)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        dom = render(f"http://127.0.0.1:{server.server_address[1]}/docs.html")
    finally:
        server.shutdown()
        server.server_close()
    assert "cdn.jsdelivr.net" in dom  # the CDN's script tag is there ...
    assert "opblock" not in dom and "Liveness" not in dom  # ... and no operation was rendered
