"""The notifier service's process: an HTTP face (health) around its Kafka consumers."""

from __future__ import annotations

import time

from fastapi import FastAPI

app = FastAPI(title="Model Registry notifier", version="0.1.0")


@app.get("/healthz", summary="Liveness")
async def healthz() -> dict[str, object]:
    """Liveness probe."""
    return {"ok": True, "service": "notifier", "time": int(time.time())}
