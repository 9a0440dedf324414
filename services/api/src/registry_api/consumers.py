"""What the api consumes from Kafka.

- Ingest's verdicts (`registry.verdicts.v1`): a verified upload becomes an available file; a rejected
  one keeps its reason for the developer. Each event applies once (consumed_events), offsets are
  committed after the transaction.
- Access events (`registry.access.v1`): the catalog's `downloads` counter, eventually consistent.
  Offsets live in Postgres next to the counters, so a restart neither loses nor double-counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import Counter
from collections.abc import Iterable

import orjson
import psycopg
from aiokafka import AIOKafkaConsumer, TopicPartition
from psycopg_pool import AsyncConnectionPool
from pydantic import ValidationError

from registry_api.audit import service as audit
from registry_api.catalog.cache import CATALOG_CHANNEL
from registry_api.catalog.repository import CURRENT_FILES
from registry_shared.background import BackgroundTask
from registry_shared.events import (
    CloudEvent,
    FileAccessed,
    Topics,
    UploadRejected,
    UploadVerified,
    decode_event,
)
from registry_shared.logging import correlation_id

log = logging.getLogger(__name__)
VERDICTS_GROUP = "registry-api-verdicts"
DOWNLOADS_GROUP = "registry-api-downloads"


async def _first_time(conn: psycopg.AsyncConnection, event: CloudEvent) -> bool:
    cur = await conn.execute(
        "insert into consumed_events (event_id) values (%s) on conflict do nothing", [uuid.UUID(event.id)]
    )
    return cur.rowcount == 1


async def refresh_model_files(conn: psycopg.AsyncConnection, model_id: int) -> None:
    """Recompute file_count / has_safetensors / has_bin from the current files; bump last_update_ts."""
    cur = await conn.execute(CURRENT_FILES, {"model_id": model_id})
    names = [r["rfilename"] for r in await cur.fetchall()]
    await conn.execute(
        "update models set file_count = %s, has_safetensors = %s, has_bin = %s, last_modified = now(),"
        " last_update_ts = greatest(last_update_ts, extract(epoch from now())::bigint) where id = %s",
        [len(names), any(n.endswith(".safetensors") for n in names), any(n.endswith(".bin") for n in names), model_id],
    )


async def apply_verified(conn: psycopg.AsyncConnection, v: UploadVerified) -> bool:
    """Publish the verified file; False if the upload was not waiting for a verdict."""
    cur = await conn.execute(
        "select id, model_id, version_id, rfilename, object_key, declared_size, declared_sha256, status"
        " from uploads where id = %s for update",
        [v.upload_id],
    )
    up = await cur.fetchone()
    if up is None or up["status"] != "pending_verification":
        return False
    if (up["declared_size"], up["declared_sha256"], up["object_key"]) != (v.size, v.sha256, v.object_key):
        log.error("verdict does not match the upload's declaration", extra={"fields": {"upload_id": v.upload_id}})
        return False
    now = int(time.time())
    await conn.execute("update uploads set status = 'available', verdict_ts = %s where id = %s", [now, v.upload_id])
    await conn.execute(
        "insert into files (model_id, version_id, rfilename, size, sha256, object_key, file_format, is_pickle, updated_ts)"
        " values (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
        " on conflict (model_id, version_id, rfilename) do update set size = excluded.size, sha256 = excluded.sha256,"
        " object_key = excluded.object_key, file_format = excluded.file_format, is_pickle = excluded.is_pickle,"
        " updated_ts = excluded.updated_ts",
        [
            up["model_id"],
            up["version_id"],
            up["rfilename"],
            v.size,
            v.sha256,
            v.object_key,
            v.file_format,
            v.is_pickle,
            now,
        ],
    )
    await refresh_model_files(conn, up["model_id"])
    await conn.execute(
        "select pg_notify(%s, m.repo_id) from models m where m.id = %s", [CATALOG_CHANNEL, up["model_id"]]
    )
    return True


async def apply_rejected(conn: psycopg.AsyncConnection, r: UploadRejected) -> bool:
    """Record why the upload was refused (the file is never served)."""
    status = "expired" if r.reason == "expired" else "rejected"
    cur = await conn.execute(
        "update uploads set status = %s, reason = %s, detail = %s, quarantine_key = %s, verdict_ts = %s"
        " where id = %s and status in ('initiated', 'pending_verification')",
        [status, r.reason, r.detail, r.quarantine_key, int(time.time()), r.upload_id],
    )
    return cur.rowcount == 1


async def apply_verdict(pool: AsyncConnectionPool, event: CloudEvent) -> None:
    """Apply one verdict event, once."""
    payload = event.payload()
    async with pool.connection() as conn, conn.transaction():
        if not await _first_time(conn, event):
            return
        applied = False
        if isinstance(payload, UploadVerified):
            applied = await apply_verified(conn, payload)
        elif isinstance(payload, UploadRejected):
            applied = await apply_rejected(conn, payload)
        if applied:
            await audit.record(
                conn, "upload.verdict", "upload", payload.upload_id, repo_id=payload.repo_id, after=payload.model_dump()
            )


class VerdictConsumer(BackgroundTask):
    """Applies ingest's verdicts to the catalog."""

    name = "verdict-consumer"

    def __init__(self, pool: AsyncConnectionPool, bootstrap: str, topic: str = Topics.VERDICTS) -> None:
        self._pool = pool
        self._bootstrap = bootstrap
        self._topic = topic

    async def run(self) -> None:
        while True:
            consumer = AIOKafkaConsumer(
                self._topic,
                bootstrap_servers=self._bootstrap,
                group_id=VERDICTS_GROUP,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
            )
            try:
                await consumer.start()
                while True:
                    batch = await consumer.getmany(timeout_ms=500, max_records=200)
                    for records in batch.values():
                        for msg in records:
                            await self._handle(msg.value)
                    if batch:
                        await consumer.commit()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Kafka or Postgres away: start over from the committed offsets
                log.warning("verdict consumer restarting: %s", exc)
                await asyncio.sleep(1.0)
            finally:
                with contextlib.suppress(Exception):
                    await consumer.stop()

    async def _handle(self, value: bytes) -> None:
        try:
            event = decode_event(value)
            event.payload()
        except (ValidationError, ValueError) as exc:
            log.error("unreadable verdict skipped: %s", exc)
            return
        token = correlation_id.set(event.id)
        try:
            await apply_verdict(self._pool, event)
        finally:
            correlation_id.reset(token)


def count_downloads(values: Iterable[bytes | None]) -> Counter[str]:
    """Downloads per repo_id in raw access-event messages. Every access event passes here: only the three
    fields a count needs are read, the rest is not validated (the analytics service does that); a message
    that is not a download event (junk included) is not counted."""
    counts: Counter[str] = Counter()
    for value in values:
        try:
            doc = orjson.loads(value)
            data = doc["data"] if doc.get("type") == FileAccessed.event_type else None
            if isinstance(data, dict) and data.get("kind") == "download":
                repo = data.get("repo_id")
                if repo and isinstance(repo, str):
                    counts[repo] += 1
        except (ValueError, TypeError, KeyError, AttributeError):
            continue
    return counts


class DownloadCounter(BackgroundTask):
    """Adds real downloads to models.downloads, exactly once, with offsets stored beside the counts."""

    name = "download-counter"

    def __init__(self, pool: AsyncConnectionPool, bootstrap: str, topic: str = Topics.ACCESS) -> None:
        self._pool = pool
        self._bootstrap = bootstrap
        self._topic = topic

    async def _seek_stored(self, consumer: AIOKafkaConsumer) -> None:
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "select partition, next_offset from consumer_offsets where group_id = %s and topic = %s",
                [DOWNLOADS_GROUP, self._topic],
            )
            stored = {r["partition"]: r["next_offset"] for r in await cur.fetchall()}
        for tp in consumer.assignment():
            if tp.partition in stored:
                consumer.seek(tp, stored[tp.partition])
            else:
                await consumer.seek_to_beginning(tp)

    async def _store(self, batch: dict[TopicPartition, list]) -> None:
        counts = count_downloads(msg.value for records in batch.values() for msg in records)
        async with self._pool.connection() as conn, conn.transaction():
            for repo_id, n in sorted(counts.items()):
                await conn.execute("update models set downloads = downloads + %s where repo_id = %s", [n, repo_id])
            for tp, records in batch.items():
                await conn.execute(
                    "insert into consumer_offsets (group_id, topic, partition, next_offset) values (%s, %s, %s, %s)"
                    " on conflict (group_id, topic, partition) do update set next_offset = excluded.next_offset",
                    [DOWNLOADS_GROUP, tp.topic, tp.partition, records[-1].offset + 1],
                )

    async def run(self) -> None:
        while True:
            consumer = AIOKafkaConsumer(
                bootstrap_servers=self._bootstrap, group_id=DOWNLOADS_GROUP, enable_auto_commit=False
            )
            try:
                await consumer.start()
                # Manual assignment of every partition: the offsets of record are in Postgres.
                partitions = consumer.partitions_for_topic(self._topic)
                while not partitions:
                    await consumer._client.force_metadata_update()
                    partitions = consumer.partitions_for_topic(self._topic)
                    await asyncio.sleep(0.5)
                consumer.assign([TopicPartition(self._topic, p) for p in sorted(partitions)])
                await self._seek_stored(consumer)
                while True:
                    batch = await consumer.getmany(timeout_ms=1000, max_records=5000)
                    if batch:
                        await self._store(batch)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("download counter restarting: %s", exc)
                await asyncio.sleep(1.0)
            finally:
                with contextlib.suppress(Exception):
                    await consumer.stop()
