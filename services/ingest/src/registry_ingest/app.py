"""The ingest service's process: a FastStream app on Kafka, served as ASGI (uvicorn) with `GET /healthz`.

The app starts the worker's broker (its subscribers join the consumer group) between the worker's hooks,
and stops it on shutdown (SIGTERM) after the worker has stopped consuming and given its leases back.
FastStream's ASGI app answers HTTP as soon as the startup hooks ran, while the broker is still starting:
`/healthz` says 503 (`"ok": false`) until the worker is consuming, and while a consumer or background
task is dead (`registry_shared.health`).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from faststream.asgi import AsgiFastStream, AsgiResponse, get
from faststream.asgi.response import JSONResponse

from registry_ingest.worker import IngestWorker
from registry_shared.health import HEALTH
from registry_shared.metrics import metrics_app

worker = IngestWorker()


@get
async def healthz(scope: Any) -> AsgiResponse:
    """Health, with the partitions this process consumes and the state of each consumer and background task;
    503 until the worker has started (and once it stops), and while a consumer or task is dead."""
    status, consumers = HEALTH.report()
    ok = worker.ready and status == 200
    body: dict[str, object] = {"ok": ok, "service": "ingest", "time": int(time.time())}
    body.update(worker.status())
    body.update(consumers)
    return JSONResponse(body, 200 if ok else 503)


app = AsgiFastStream(
    worker.broker,
    asgi_routes=[("/healthz", healthz), ("/metrics", metrics_app())],
    logger=logging.getLogger("registry_ingest.app"),
    on_startup=[worker.start],
    after_startup=[worker.started],
    on_shutdown=[worker.stop],
    after_shutdown=[worker.close],
)
