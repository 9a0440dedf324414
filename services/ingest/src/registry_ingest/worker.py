"""One ingest process: its Postgres pool, MinIO client, FastStream broker (producer and subscribers) and sweeper.

The app (`registry_ingest.app`) runs the broker and calls the hooks here around it:
`start` before the broker starts, `started` once it consumes, `stop` before it stops, `close` after.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid

from psycopg_pool import AsyncConnectionPool

from registry_ingest.bucket import Bucket
from registry_ingest.consumer import IngestConsumer, make_broker
from registry_ingest.publisher import Publisher
from registry_ingest.service import IngestService, Sweeper
from registry_ingest.settings import IngestSettings
from registry_ingest.state import IngestStore
from registry_shared.settings import KafkaSettings, MinioSettings, PostgresSettings
from registry_shared.storage import minio_client

log = logging.getLogger(__name__)

#: How long startup waits for the consumers' partitions of every topic.
_SETTLE_SECONDS = 30.0


class IngestWorker:
    """Everything one process runs; its subscribers are on `broker` from construction on."""

    def __init__(self, settings: IngestSettings | None = None) -> None:
        self.settings = s = settings or IngestSettings()
        kafka = KafkaSettings()
        # Unique per process start: a restarted process never mistakes a dead predecessor's lease for its own.
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.broker = make_broker(
            kafka.kafka_bootstrap_servers, f"{kafka.kafka_client_id}-ingest", s.shutdown_timeout_seconds
        )
        self.publisher = Publisher(self.broker)
        self._stopping = asyncio.Event()
        self.consumer = IngestConsumer(s, self.broker, self.publisher, self._stopping)
        self.pool: AsyncConnectionPool | None = None
        self.service: IngestService | None = None
        self._sweeper: Sweeper | None = None
        #: Set once started (the broker consumes, the sweeper runs); /healthz answers 503 until then.
        self.ready = False

    async def start(self) -> None:
        """Before the broker starts: connect Postgres (migrating the schema) and MinIO."""
        s = self.settings
        minio = MinioSettings().for_service("ingest")  # INGEST_MINIO_ACCESS_KEY / INGEST_MINIO_SECRET_KEY
        database_url = PostgresSettings().database_url
        self.pool = AsyncConnectionPool(database_url, min_size=1, max_size=s.db_pool_max, open=False, name="ingest")
        await self.pool.open(wait=True, timeout=30)
        store = IngestStore(self.pool)
        applied = await store.migrate(database_url)
        if applied:
            log.info("ingest schema migrated", extra={"fields": {"applied": applied}})
        bucket = Bucket(minio_client(minio), minio.minio_bucket)
        self.service = IngestService(s, store, bucket, self.publisher, self.owner)
        self.consumer.service = self.service

    async def started(self) -> None:
        """Once the broker is connected and its consumers are joining the group: start the sweeper."""
        assert self.service is not None
        s = self.settings
        if self._stopping.is_set():  # shut down while the broker was still starting
            return
        self._sweeper = Sweeper(self.service)
        self._sweeper.start()
        # FastStream's ASGI app serves HTTP while the broker starts; /healthz (the readiness signal of the stack
        # and the tests) says ok once this process is a settled member of the group (or that took too long).
        if not await self.consumer.wait_assigned(_SETTLE_SECONDS):
            log.warning("no partitions of some topic yet; starting anyway", extra={"fields": self.status()})
        self.ready = True
        for policy in self.consumer.policies.values():
            policy.health.ok()  # consuming: "starting" until now
        log.info(
            "ingest started",
            extra={
                "fields": {
                    "owner": self.owner,
                    "group": s.group_id,
                    "topics": [s.uploads_topic, s.minio_topic],
                    "prefix": s.upload_prefix,
                }
            },
        )

    async def stop(self) -> None:
        """Before the broker stops: stop consuming and sweeping, let work in flight finish (or abandon it), give
        back every lease. The broker's producer is still there for what finishes meanwhile."""
        timeout = self.settings.shutdown_timeout_seconds
        self.ready = False
        self._stopping.set()
        if self._sweeper is not None:
            await self._sweeper.stop()
        sweeps = self.service.stop_sweeps(timeout) if self.service is not None else asyncio.sleep(0)
        await asyncio.gather(self.consumer.stop(), sweeps)
        if self.service is not None:
            try:
                await self.service.store.release_all(self.owner)
            except Exception:
                log.exception("could not release leases; they lapse on their own")

    async def close(self) -> None:
        """After the broker stopped: close the verification pool and the Postgres pool."""
        if self.service is not None:
            self.service.close()
        if self.pool is not None:
            await self.pool.close()
        log.info("ingest stopped", extra={"fields": {"owner": self.owner}})

    def status(self) -> dict[str, object]:
        """What /healthz reports about the consumers (their health is in registry_shared.health.HEALTH)."""
        return {
            "owner": self.owner,
            "group": self.settings.group_id,
            "partitions": self.consumer.assignment(),
            "handled": self.consumer.handled,
        }
