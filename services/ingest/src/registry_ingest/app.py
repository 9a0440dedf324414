"""The ingest service's process: an HTTP face (health) around its Kafka consumers."""

from __future__ import annotations

import time

from fastapi import FastAPI

app = FastAPI(title="Model Registry ingest", version="0.1.0")


@app.get("/healthz", summary="Liveness")
async def healthz() -> dict[str, object]:
    """Liveness probe."""
    return {"ok": True, "service": "ingest", "time": int(time.time())}
