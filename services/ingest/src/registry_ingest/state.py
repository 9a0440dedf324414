"""Ingest's durable state in Postgres, schema `ingest` (SQL only; the rules live in service.py).

Three tables (migrations/0001_ingest_state.sql): `uploads` (what the api declared, and the verdict),
`objects` (what MinIO reported) and `verdicts` (an outbox: a verdict is claimed once, by a row-level
transition, and kept until Kafka acknowledged it). Work is handed out with leases (lease_owner,
lease_until) so two processes never verify one upload at once and a dead process's work lapses back.
Every sweeper query is scoped to the worker's key prefix, so workers owning other prefixes (a test's)
can share the schema.
"""

from __future__ import annotations

import asyncio
import importlib.resources
import uuid
from dataclasses import dataclass
from datetime import datetime

from psycopg import AsyncConnection
from psycopg.rows import class_row
from psycopg_pool import AsyncConnectionPool

from registry_ingest.notifications import ObjectNotification
from registry_shared.events import UploadCompleted, UploadInitiated
from registry_shared.migrations import apply_migrations

#: Serializes concurrent migrations of processes starting together (the lock ingest has always used).
_MIGRATION_LOCK = 0x1A6E57  # arbitrary, fixed


@dataclass
class UploadRow:
    """A row of ingest.uploads, plus the database's clock."""

    upload_id: int
    object_key: str
    repo_id: str
    version: str
    rfilename: str
    initiated_event_id: str | None
    initiated_at: datetime | None
    completed_event_id: str | None
    completed_at: datetime | None
    declared_size: int | None
    declared_sha256: str | None
    missing_since: datetime | None
    due_at: datetime | None
    attempts: int
    lease_owner: str | None
    lease_until: datetime | None
    bytes_read: int
    verdict: str | None
    reason: str | None
    judged_etag: str | None
    verdict_event_id: uuid.UUID | None
    verdict_at: datetime | None
    created_at: datetime
    failures: int
    last_error: str | None
    db_now: datetime
    multipart_upload_id: str | None = None  # the S3 upload id of a multipart upload


@dataclass
class ObjectRow:
    """A row of ingest.objects."""

    object_key: str
    present: bool
    etag: str | None
    size: int | None
    sequencer: str | None
    version_id: str | None
    event_name: str
    changed_at: datetime
    judged: bool
    lease_owner: str | None
    lease_until: datetime | None


@dataclass
class VerdictRow:
    """A row of ingest.verdicts: a claimed verdict and what remains to do for it."""

    event_id: uuid.UUID
    dedupe_key: str
    object_key: str
    topic: str
    message_key: str
    event: bytes
    action: str
    action_etag: str | None
    quarantine_key: str | None
    created_at: datetime
    published_at: datetime | None
    lease_owner: str | None
    lease_until: datetime | None


@dataclass(frozen=True)
class NewVerdict:
    """A verdict to claim: the encoded event and the action on the object that must precede it."""

    event_id: str
    dedupe_key: str
    object_key: str
    topic: str
    message_key: str
    event: bytes
    action: str = "none"
    action_etag: str | None = None
    quarantine_key: str | None = None


_INSERT_VERDICT = """
    INSERT INTO ingest.verdicts (event_id, dedupe_key, object_key, topic, message_key, event, action,
                                 action_etag, quarantine_key, lease_owner, lease_until)
    VALUES (%(event_id)s, %(dedupe_key)s, %(object_key)s, %(topic)s, %(message_key)s, %(event)s, %(action)s,
            %(action_etag)s, %(quarantine_key)s, %(owner)s, now() + make_interval(secs => %(lease)s))
    ON CONFLICT (dedupe_key) DO NOTHING
    RETURNING *
"""


class IngestStore:
    """The SQL of ingest, over a psycopg 3 async pool."""

    def __init__(self, pool: AsyncConnectionPool) -> None:
        self.pool = pool

    # ------------------------------------------------------------ schema
    async def migrate(self, database_url: str) -> list[str]:
        """Apply ingest's pending migrations (schema `ingest`) with the shared runner; return those applied."""
        folder = importlib.resources.files("registry_ingest") / "migrations"
        return await asyncio.to_thread(
            apply_migrations, database_url, folder, table="schema_migrations", schema="ingest", lock_id=_MIGRATION_LOCK
        )

    # ------------------------------------------------------------ facts
    async def record_initiated(self, p: UploadInitiated, event_id: str) -> UploadRow:
        """Remember an UploadInitiated (idempotent: the first one's id and time stay)."""
        async with self.pool.connection() as conn:
            cur = conn.cursor(row_factory=class_row(UploadRow))
            await cur.execute(
                """
                INSERT INTO ingest.uploads (upload_id, object_key, repo_id, version, rfilename,
                                            initiated_event_id, initiated_at, multipart_upload_id)
                VALUES (%(id)s, %(key)s, %(repo)s, %(version)s, %(file)s, %(event_id)s, now(), %(multipart)s)
                ON CONFLICT (upload_id) DO UPDATE
                   SET initiated_event_id = coalesce(ingest.uploads.initiated_event_id, excluded.initiated_event_id),
                       initiated_at = coalesce(ingest.uploads.initiated_at, excluded.initiated_at),
                       multipart_upload_id = coalesce(ingest.uploads.multipart_upload_id,
                                                      excluded.multipart_upload_id)
                RETURNING *, now() AS db_now
                """,
                {
                    "id": p.upload_id,
                    "key": p.object_key,
                    "repo": p.repo_id,
                    "version": p.version,
                    "file": p.rfilename,
                    "event_id": event_id,
                    "multipart": p.multipart_upload_id,
                },
            )
            row = await cur.fetchone()
            assert row is not None
            return row

    async def record_completed(self, p: UploadCompleted, event_id: str, grace: float) -> tuple[UploadRow, bool]:
        """Remember an UploadCompleted; return the row and whether this event was the one recorded.

        The first UploadCompleted of an upload wins; a duplicate or a late one (after a verdict) changes nothing,
        nor does one naming another object than the upload's (the caller refuses it).
        """
        async with self.pool.connection() as conn:
            cur = conn.cursor(row_factory=class_row(UploadRow))
            await cur.execute(
                """
                INSERT INTO ingest.uploads (upload_id, object_key, repo_id, version, rfilename, completed_event_id,
                                            completed_at, declared_size, declared_sha256, due_at)
                VALUES (%(id)s, %(key)s, %(repo)s, %(version)s, %(file)s, %(event_id)s, now(), %(size)s, %(sha)s,
                        now() + make_interval(secs => %(grace)s))
                ON CONFLICT (upload_id) DO UPDATE
                   SET completed_event_id = excluded.completed_event_id, completed_at = excluded.completed_at,
                       declared_size = excluded.declared_size, declared_sha256 = excluded.declared_sha256,
                       due_at = excluded.due_at
                 WHERE ingest.uploads.completed_event_id IS NULL AND ingest.uploads.verdict IS NULL
                   AND ingest.uploads.object_key = excluded.object_key
                RETURNING *, now() AS db_now
                """,
                {
                    "id": p.upload_id,
                    "key": p.object_key,
                    "repo": p.repo_id,
                    "version": p.version,
                    "file": p.rfilename,
                    "event_id": event_id,
                    "size": p.size,
                    "sha": p.sha256.lower(),
                    "grace": grace,
                },
            )
            row = await cur.fetchone()
            if row is not None:
                return row, True
            await cur.execute("SELECT *, now() AS db_now FROM ingest.uploads WHERE upload_id = %s", [p.upload_id])
            row = await cur.fetchone()
            assert row is not None
            return row, False

    async def record_object(self, n: ObjectNotification) -> bool:
        """Apply a MinIO notification unless an equal or newer one (by sequencer) was applied; True if applied."""
        created = n.kind == "created"
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                """
                INSERT INTO ingest.objects AS o (object_key, present, etag, size, sequencer, version_id, event_name,
                                                 changed_at, judged)
                VALUES (%(key)s, %(present)s, %(etag)s, %(size)s, %(seq)s, %(vid)s, %(name)s, now(),
                        NOT %(present)s OR EXISTS (SELECT 1 FROM ingest.uploads u
                                                    WHERE u.object_key = %(key)s AND u.judged_etag = %(etag)s))
                ON CONFLICT (object_key) DO UPDATE
                   SET present = excluded.present, etag = excluded.etag, size = excluded.size,
                       sequencer = excluded.sequencer, version_id = excluded.version_id,
                       event_name = excluded.event_name, changed_at = now(), judged = excluded.judged
                 WHERE o.sequencer IS NULL OR excluded.sequencer IS NULL
                    OR (length(excluded.sequencer), excluded.sequencer COLLATE "C")
                       > (length(o.sequencer), o.sequencer COLLATE "C")
                RETURNING o.object_key
                """,
                {
                    "key": n.key,
                    "present": created,
                    "etag": n.etag if created else None,
                    "size": n.size if created else None,
                    "seq": n.sequencer,
                    "vid": n.version_id,
                    "name": n.event_name,
                },
            )
            return await cur.fetchone() is not None

    async def pending_completed_uploads(self, object_key: str) -> list[int]:
        """Completed uploads of a key still waiting for a verdict."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT upload_id FROM ingest.uploads WHERE object_key = %s AND verdict IS NULL"
                " AND completed_at IS NOT NULL ORDER BY upload_id",
                [object_key],
            )
            return [r[0] for r in await cur.fetchall()]

    async def other_pending_upload(self, object_key: str, upload_id: int) -> bool:
        """Whether another upload of the same key (a retry) still waits for a verdict."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT 1 FROM ingest.uploads WHERE object_key = %s AND upload_id <> %s AND verdict IS NULL LIMIT 1",
                [object_key, upload_id],
            )
            return await cur.fetchone() is not None

    # ------------------------------------------------------------ leases on uploads
    async def lease_upload(self, upload_id: int, owner: str, lease: float) -> UploadRow | None:
        """Take the upload for verification unless it has a verdict or a live lease of another process."""
        async with self.pool.connection() as conn:
            cur = conn.cursor(row_factory=class_row(UploadRow))
            await cur.execute(
                """
                UPDATE ingest.uploads
                   SET lease_owner = %(owner)s, lease_until = now() + make_interval(secs => %(lease)s),
                       attempts = attempts + 1, bytes_read = 0
                 WHERE upload_id = %(id)s AND verdict IS NULL AND (lease_until IS NULL OR lease_until < now())
                RETURNING *, now() AS db_now
                """,
                {"id": upload_id, "owner": owner, "lease": lease},
            )
            return await cur.fetchone()

    async def lease_due_uploads(self, prefix: str, owner: str, lease: float, limit: int) -> list[UploadRow]:
        """Completed uploads without verdict whose time has come (grace over, retry due, or owner died)."""
        return await self._lease_uploads(
            "completed_at IS NOT NULL AND due_at <= now()", {"prefix": prefix, "owner": owner, "lease": lease}, limit
        )

    async def lease_expired_uploads(
        self, prefix: str, owner: str, lease: float, ttl: float, limit: int
    ) -> list[UploadRow]:
        """Uploads initiated more than `ttl` seconds ago and never completed."""
        return await self._lease_uploads(
            "completed_at IS NULL AND initiated_at < now() - make_interval(secs => %(ttl)s)",
            {"prefix": prefix, "owner": owner, "lease": lease, "ttl": ttl},
            limit,
        )

    async def lease_expired_multipart(
        self, prefix: str, owner: str, lease: float, ttl: float, limit: int
    ) -> list[UploadRow]:
        """Multipart uploads initiated more than `ttl` seconds ago and never completed (their parts linger)."""
        return await self._lease_uploads(
            "completed_at IS NULL AND multipart_upload_id IS NOT NULL"
            " AND initiated_at < now() - make_interval(secs => %(ttl)s)",
            {"prefix": prefix, "owner": owner, "lease": lease, "ttl": ttl},
            limit,
        )

    async def _lease_uploads(self, condition: str, params: dict[str, object], limit: int) -> list[UploadRow]:
        async with self.pool.connection() as conn:
            cur = conn.cursor(row_factory=class_row(UploadRow))
            # `condition` is one of the literals of the callers above, never input.
            sql = """
                UPDATE ingest.uploads
                   SET lease_owner = %(owner)s, lease_until = now() + make_interval(secs => %(lease)s),
                       attempts = attempts + 1, bytes_read = 0
                 WHERE upload_id IN (
                       SELECT upload_id FROM ingest.uploads
                        WHERE verdict IS NULL AND (lease_until IS NULL OR lease_until < now())
                          AND starts_with(object_key, %(prefix)s)
                          AND CONDITION
                        ORDER BY upload_id LIMIT %(limit)s FOR UPDATE SKIP LOCKED)
                RETURNING *, now() AS db_now
                """.replace("CONDITION", condition)
            await cur.execute(
                sql,
                {**params, "limit": limit},
            )
            return await cur.fetchall()

    async def renew_upload_lease(self, upload_id: int, owner: str, lease: float, bytes_read: int) -> bool:
        """Extend a held lease and record progress; False if the lease was lost."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "UPDATE ingest.uploads SET lease_until = now() + make_interval(secs => %(lease)s),"
                " bytes_read = %(read)s"
                " WHERE upload_id = %(id)s AND lease_owner = %(owner)s AND verdict IS NULL RETURNING 1",
                {"id": upload_id, "owner": owner, "lease": lease, "read": bytes_read},
            )
            return await cur.fetchone() is not None

    async def release_upload(
        self, upload_id: int, owner: str, retry_in: float | None = None, failed: str | None = None
    ) -> None:
        """Give the lease back, optionally asking the sweeper to look again in `retry_in` seconds; `failed`
        (the error) counts a failed verification."""
        async with self.pool.connection() as conn:
            await conn.execute(
                "UPDATE ingest.uploads SET lease_owner = NULL, lease_until = NULL,"
                " due_at = CASE WHEN %(retry)s::float8 IS NULL THEN due_at"
                "               ELSE now() + make_interval(secs => %(retry)s::float8) END,"
                " failures = failures + (%(failed)s::text IS NOT NULL)::int,"
                " last_error = coalesce(%(failed)s::text, last_error)"
                " WHERE upload_id = %(id)s AND lease_owner = %(owner)s",
                {"id": upload_id, "owner": owner, "retry": retry_in, "failed": failed},
            )

    async def mark_missing(self, upload_id: int, owner: str, grace: float) -> None:
        """The object was absent: start (or keep) the grace period, after which the sweeper rejects it."""
        async with self.pool.connection() as conn:
            await conn.execute(
                "UPDATE ingest.uploads SET missing_since = coalesce(missing_since, now()),"
                " due_at = coalesce(missing_since, now()) + make_interval(secs => %(grace)s),"
                " lease_owner = NULL, lease_until = NULL"
                " WHERE upload_id = %(id)s AND lease_owner = %(owner)s",
                {"id": upload_id, "owner": owner, "grace": grace},
            )

    async def claim_upload_verdict(
        self,
        upload_id: int,
        owner: str,
        lease: float,
        *,
        verdict: str,
        reason: str | None,
        judged_etag: str | None,
        new: NewVerdict,
        only_if_not_completed: bool = False,
    ) -> VerdictRow | None:
        """Record the upload's verdict and queue its event, atomically, if this process still holds the lease.

        This transition (verdict IS NULL → set, by the lease holder) happens once per upload, so at most one
        verdict event is ever created for it. `only_if_not_completed` guards expiry against a late complete.
        """
        async with self.pool.connection() as conn, conn.transaction():
            cur = await conn.execute(
                "UPDATE ingest.uploads SET verdict = %(verdict)s, reason = %(reason)s, judged_etag = %(etag)s,"
                " verdict_event_id = %(event_id)s, verdict_at = now(), lease_owner = NULL, lease_until = NULL"
                " WHERE upload_id = %(id)s AND verdict IS NULL AND lease_owner = %(owner)s"
                " AND (NOT %(only_new)s OR completed_at IS NULL) RETURNING 1",
                {
                    "verdict": verdict,
                    "reason": reason,
                    "etag": judged_etag,
                    "event_id": new.event_id,
                    "id": upload_id,
                    "owner": owner,
                    "only_new": only_if_not_completed,
                },
            )
            if await cur.fetchone() is None:
                return None
            row = await self._insert_verdict(conn, new, owner, lease)
            if judged_etag is not None:
                await conn.execute(
                    "UPDATE ingest.objects SET judged = true WHERE object_key = %s AND etag = %s",
                    [new.object_key, judged_etag],
                )
            return row

    @staticmethod
    async def _insert_verdict(conn: AsyncConnection, new: NewVerdict, owner: str, lease: float) -> VerdictRow | None:
        cur = conn.cursor(row_factory=class_row(VerdictRow))
        await cur.execute(
            _INSERT_VERDICT,
            {
                "event_id": new.event_id,
                "dedupe_key": new.dedupe_key,
                "object_key": new.object_key,
                "topic": new.topic,
                "message_key": new.message_key,
                "event": new.event,
                "action": new.action,
                "action_etag": new.action_etag,
                "quarantine_key": new.quarantine_key,
                "owner": owner,
                "lease": lease,
            },
        )
        return await cur.fetchone()

    # ------------------------------------------------------------ strays
    async def lease_stray_candidates(
        self, prefix: str, owner: str, lease: float, grace: float, limit: int
    ) -> list[ObjectRow]:
        """Objects present for longer than `grace` with no pending upload and no verdict about this version."""
        async with self.pool.connection() as conn:
            cur = conn.cursor(row_factory=class_row(ObjectRow))
            await cur.execute(
                """
                UPDATE ingest.objects
                   SET lease_owner = %(owner)s, lease_until = now() + make_interval(secs => %(lease)s)
                 WHERE object_key IN (
                       SELECT o.object_key FROM ingest.objects o
                        WHERE o.present AND NOT o.judged AND starts_with(o.object_key, %(prefix)s)
                          AND (o.lease_until IS NULL OR o.lease_until < now())
                          AND o.changed_at < now() - make_interval(secs => %(grace)s)
                          AND NOT EXISTS (SELECT 1 FROM ingest.uploads u WHERE u.object_key = o.object_key
                                             AND (u.verdict IS NULL OR u.judged_etag = o.etag))
                        ORDER BY o.changed_at LIMIT %(limit)s FOR UPDATE OF o SKIP LOCKED)
                RETURNING *
                """,
                {"prefix": prefix, "owner": owner, "lease": lease, "grace": grace, "limit": limit},
            )
            return await cur.fetchall()

    async def claim_stray_verdict(self, obj: ObjectRow, owner: str, lease: float, new: NewVerdict) -> VerdictRow | None:
        """Mark this object version judged and queue its ObjectQuarantined, unless an upload claimed it meanwhile."""
        async with self.pool.connection() as conn, conn.transaction():
            cur = await conn.execute(
                """
                UPDATE ingest.objects o SET judged = true, lease_owner = NULL, lease_until = NULL
                 WHERE o.object_key = %(key)s AND o.sequencer IS NOT DISTINCT FROM %(seq)s AND NOT o.judged
                   AND o.lease_owner = %(owner)s
                   AND NOT EXISTS (SELECT 1 FROM ingest.uploads u WHERE u.object_key = o.object_key
                                      AND (u.verdict IS NULL OR u.judged_etag = o.etag))
                RETURNING 1
                """,
                {"key": obj.object_key, "seq": obj.sequencer, "owner": owner},
            )
            if await cur.fetchone() is None:
                return None
            return await self._insert_verdict(conn, new, owner, lease)

    async def settle_object(self, obj: ObjectRow, owner: str, judged: bool) -> None:
        """Give an object's lease back; `judged` when it needs no verdict (gone, or replaced by a newer version)."""
        async with self.pool.connection() as conn:
            await conn.execute(
                "UPDATE ingest.objects SET lease_owner = NULL, lease_until = NULL,"
                " judged = judged OR (%(judged)s AND sequencer IS NOT DISTINCT FROM %(seq)s)"
                " WHERE object_key = %(key)s AND lease_owner = %(owner)s",
                {"key": obj.object_key, "seq": obj.sequencer, "owner": owner, "judged": judged},
            )

    # ------------------------------------------------------------ the verdict outbox
    async def lease_unpublished_verdicts(
        self, prefix: str, owner: str, lease: float, limit: int, dedupe_key: str | None = None
    ) -> list[VerdictRow]:
        """Verdicts claimed but not acknowledged by Kafka whose finisher is gone (crash between claim and ack)."""
        async with self.pool.connection() as conn:
            cur = conn.cursor(row_factory=class_row(VerdictRow))
            await cur.execute(
                """
                UPDATE ingest.verdicts
                   SET lease_owner = %(owner)s, lease_until = now() + make_interval(secs => %(lease)s)
                 WHERE event_id IN (
                       SELECT event_id FROM ingest.verdicts
                        WHERE published_at IS NULL AND (lease_until IS NULL OR lease_until < now())
                          AND starts_with(object_key, %(prefix)s)
                          AND (%(dedupe)s::text IS NULL OR dedupe_key = %(dedupe)s::text)
                        ORDER BY created_at LIMIT %(limit)s FOR UPDATE SKIP LOCKED)
                RETURNING *
                """,
                {"prefix": prefix, "owner": owner, "lease": lease, "limit": limit, "dedupe": dedupe_key},
            )
            return await cur.fetchall()

    async def renew_verdict_lease(self, event_id: uuid.UUID, owner: str, lease: float) -> bool:
        """Extend the lease on an unpublished verdict (a long quarantine copy); False if lost."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "UPDATE ingest.verdicts SET lease_until = now() + make_interval(secs => %(lease)s)"
                " WHERE event_id = %(id)s AND lease_owner = %(owner)s AND published_at IS NULL RETURNING 1",
                {"id": event_id, "owner": owner, "lease": lease},
            )
            return await cur.fetchone() is not None

    async def mark_published(self, event_id: uuid.UUID) -> None:
        """Kafka acknowledged the verdict (acks=all): nothing is left to do for it."""
        async with self.pool.connection() as conn:
            await conn.execute(
                "UPDATE ingest.verdicts SET published_at = coalesce(published_at, now()),"
                " lease_owner = NULL, lease_until = NULL WHERE event_id = %s",
                [event_id],
            )

    async def release_verdict(self, event_id: uuid.UUID, owner: str) -> None:
        """Give back the lease on an unpublished verdict so another process can finish it."""
        async with self.pool.connection() as conn:
            await conn.execute(
                "UPDATE ingest.verdicts SET lease_owner = NULL, lease_until = NULL"
                " WHERE event_id = %s AND lease_owner = %s",
                [event_id, owner],
            )

    async def release_all(self, owner: str) -> None:
        """On shutdown: every lease of this process lapses at once instead of at expiry."""
        async with self.pool.connection() as conn:
            for table in ("uploads", "objects", "verdicts"):
                # The table name is one of the three literals above.
                sql = f"UPDATE ingest.{table} SET lease_owner = NULL, lease_until = NULL"  # noqa: S608
                sql += " WHERE lease_owner = %s"
                await conn.execute(sql, [owner])
