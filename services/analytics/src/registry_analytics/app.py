"""The analytics service's process: an HTTP face (health) around its Kafka consumers."""

from __future__ import annotations

import time

from fastapi import FastAPI

app = FastAPI(title="Model Registry analytics", version="0.1.0")


@app.get("/healthz", summary="Liveness")
async def healthz() -> dict[str, object]:
    """Liveness probe."""
    return {"ok": True, "service": "analytics", "time": int(time.time())}
