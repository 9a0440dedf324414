"""The ingest service's process: an HTTP face (health) around its Kafka consumer and sweeper."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from registry_ingest.worker import IngestWorker


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Run the worker for as long as the server runs."""
    worker = IngestWorker()
    await worker.start()
    app.state.worker = worker
    try:
        yield
    finally:
        await worker.stop()


app = FastAPI(title="Model Registry ingest", version="0.1.0", lifespan=lifespan)


@app.get("/healthz", summary="Liveness")
async def healthz() -> dict[str, object]:
    """Liveness probe, with the partitions this process consumes."""
    worker: IngestWorker | None = getattr(app.state, "worker", None)
    body: dict[str, object] = {"ok": True, "service": "ingest", "time": int(time.time())}
    if worker is not None:
        body.update(worker.status())
    return body
