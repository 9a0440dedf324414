"""One ingest process: its Postgres pool, MinIO client, producer, consumer and sweeper, started and stopped together."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid

from psycopg_pool import AsyncConnectionPool

from registry_ingest.bucket import Bucket
from registry_ingest.consumer import IngestConsumer
from registry_ingest.publisher import Publisher
from registry_ingest.service import IngestService
from registry_ingest.settings import IngestSettings
from registry_ingest.state import IngestStore
from registry_shared.settings import KafkaSettings, MinioSettings, PostgresSettings
from registry_shared.storage import minio_client

log = logging.getLogger(__name__)


class IngestWorker:
    """Everything one process runs; `start` then `stop` (from the app's lifespan)."""

    def __init__(self, settings: IngestSettings | None = None) -> None:
        self.settings = settings or IngestSettings()
        # Unique per process start: a restarted process never mistakes a dead predecessor's lease for its own.
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.pool: AsyncConnectionPool | None = None
        self.publisher: Publisher | None = None
        self.consumer: IngestConsumer | None = None
        self.service: IngestService | None = None
        self._stopping = asyncio.Event()
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Migrate the schema, connect everything, join the consumer group, start the sweeper."""
        s = self.settings
        kafka, minio = KafkaSettings(), MinioSettings()
        self.pool = AsyncConnectionPool(
            PostgresSettings().database_url, min_size=1, max_size=s.db_pool_max, open=False, name="ingest"
        )
        await self.pool.open(wait=True, timeout=30)
        store = IngestStore(self.pool)
        applied = await store.migrate()
        if applied:
            log.info("ingest schema migrated", extra={"fields": {"applied": applied}})
        client_id = f"{kafka.kafka_client_id}-ingest"
        self.publisher = Publisher(kafka.kafka_bootstrap_servers, client_id)
        await self.publisher.start()
        bucket = Bucket(minio_client(minio), minio.minio_bucket)
        self.service = IngestService(s, store, bucket, self.publisher, self.owner)
        self.consumer = IngestConsumer(s, kafka.kafka_bootstrap_servers, self.service, self.publisher, client_id)
        await self.consumer.start()
        self._sweeper = asyncio.create_task(self.service.run_sweeper(self._stopping), name="ingest-sweeper")
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
        """Finish or abandon in-flight work, give back every lease, leave the group, close connections."""
        timeout = self.settings.shutdown_timeout_seconds
        self._stopping.set()
        if self._sweeper is not None:
            await self._sweeper
        if self.consumer is not None:
            await self.consumer.stop(timeout)
        if self.service is not None:
            await self.service.stop_sweeps(timeout)
            try:
                await self.service.store.release_all(self.owner)
            except Exception:
                log.exception("could not release leases; they lapse on their own")
        if self.publisher is not None:
            await self.publisher.stop()
        if self.pool is not None:
            await self.pool.close()
        log.info("ingest stopped", extra={"fields": {"owner": self.owner}})

    def status(self) -> dict[str, object]:
        """What /healthz reports about the consumer."""
        return {
            "owner": self.owner,
            "group": self.settings.group_id,
            "partitions": self.consumer.assignment() if self.consumer else [],
            "handled": self.consumer.handled if self.consumer else 0,
        }
