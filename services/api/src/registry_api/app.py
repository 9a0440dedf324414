"""The api service's ASGI app."""

from __future__ import annotations

import time

from fastapi import FastAPI

app = FastAPI(title="Model Registry API", version="1.0.0")


@app.get("/healthz", summary="Liveness", tags=["Health"])
async def healthz() -> dict[str, object]:
    """Minimal liveness payload."""
    return {"ok": True, "time": int(time.time())}
