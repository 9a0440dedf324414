"""The rules of ingest: record what arrives, verify an upload once both halves are known, judge strays and expiries.

Facts from Kafka (UploadInitiated, UploadCompleted, MinIO notifications) are recorded in Postgres first;
any process may then finish the work, under a lease, and the verdict is claimed by a single row-level
transition, so duplicates, redelivery, out-of-order arrival and two processes in one group can never
produce two verdicts for one upload. A sweeper in every process picks up what is due: an object still
missing after the grace period, an upload whose verifier died, a verdict claimed but not yet acknowledged,
an expired upload (a multipart one's S3 upload is aborted, which deletes its parts), a stray object.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

from minio.error import S3Error

from registry_ingest.bucket import Bucket, ObjectMissing, OpenedObject
from registry_ingest.notifications import ObjectNotification, owns_key
from registry_ingest.publisher import Publisher
from registry_ingest.settings import IngestSettings
from registry_ingest.state import IngestStore, NewVerdict, ObjectRow, UploadRow, VerdictRow
from registry_ingest.verify import (
    HeadCapture,
    Judgement,
    Progress,
    RejectReason,
    VerificationCancelled,
    file_format_of,
    judge,
    stream_digest,
)
from registry_shared import tracing
from registry_shared.background import BackgroundTask
from registry_shared.backoff import Backoff
from registry_shared.consumer_policy import DEFAULT_CLASSIFIER, Kind, PermanentError, describe
from registry_shared.events import (
    CloudEvent,
    EventData,
    ObjectQuarantined,
    UploadCompleted,
    UploadInitiated,
    UploadRejected,
    UploadVerified,
    encode_event,
    make_event,
)
from registry_shared.logging import correlation_id
from registry_shared.metrics import VERIFICATIONS, VERIFIED_BYTES
from registry_shared.storage import quarantine_key

log = logging.getLogger(__name__)


class PoisonMessage(PermanentError):
    """A message that can never be processed (undecodable, or outside the contract): it is dead-lettered."""


#: S3 error codes about the object's name itself: asking again can never succeed.
_BAD_NAME_CODES = frozenset(
    {"KeyTooLongError", "XMinioInvalidObjectName", "InvalidObjectName", "XMinioObjectNameTooLong"}
)

#: Object keys longer than this (in UTF-8 bytes) cannot be stored by S3 or MinIO.
MAX_KEY_BYTES = 1024


class UnreadableObject(PermanentError):
    """The store can never hold or return this object (e.g. a key longer than it allows)."""


def _storage_rule(exc: BaseException) -> Kind | None:
    if isinstance(exc, S3Error) and exc.code in _BAD_NAME_CODES:
        return "permanent"
    return None


#: The shared classification, plus what ingest knows about object names.
CLASSIFIER = DEFAULT_CLASSIFIER.extend(rule=_storage_rule)


def _fields(**kw: object) -> dict[str, dict[str, object]]:
    return {"fields": kw}


def _same_object(row: UploadRow, payload: UploadInitiated | UploadCompleted) -> None:
    """An upload's events must name the object it was recorded with; one naming another contradicts the
    recorded upload and can never be applied."""
    if row.object_key != payload.object_key:
        raise PoisonMessage(
            f"upload {payload.upload_id} is recorded for object {row.object_key!r}, not {payload.object_key!r}"
        )


class IngestService:
    """Verifies uploads and emits exactly one verdict for each."""

    def __init__(
        self, settings: IngestSettings, store: IngestStore, bucket: Bucket, publisher: Publisher, owner: str
    ) -> None:
        self.settings = settings
        self.store = store
        self.bucket = bucket
        self.publisher = publisher
        self.owner = owner
        # At most `max_concurrent_verifications` objects are streamed at once, each on a thread of this pool
        # (never the event loop's default pool, which the storage calls share).
        self._slots = asyncio.Semaphore(settings.max_concurrent_verifications)
        self._streams = ThreadPoolExecutor(settings.max_concurrent_verifications, thread_name_prefix="ingest-verify")
        self._sweeps: set[asyncio.Task[None]] = set()
        #: Delays before a failed verification is tried again.
        self.retry_backoff = Backoff(initial=1.0, factor=2.0, cap=60.0)
        #: upload id → the traceparent of its completion, so a verification started later (by the object's
        #: notification, or the sweeper) in this process continues the upload's trace (tracing on only).
        self._traces: dict[int, str] = {}

    # ------------------------------------------------------------ facts from the topics
    async def on_upload_event(self, event: CloudEvent, payload: EventData) -> None:
        """Record an UploadInitiated or UploadCompleted; verify at once if the object is already there."""
        if isinstance(payload, UploadInitiated | UploadCompleted) and not owns_key(
            payload.object_key, self.settings.upload_prefix
        ):
            raise PoisonMessage(f"object_key {payload.object_key!r} is outside {self.settings.upload_prefix!r}")
        if isinstance(payload, UploadInitiated):
            _same_object(await self.store.record_initiated(payload, event.id), payload)
            log.info("upload initiated", extra=_fields(upload_id=payload.upload_id, key=payload.object_key))
        elif isinstance(payload, UploadCompleted):
            row, recorded = await self.store.record_completed(payload, event.id, self.settings.object_grace_seconds)
            _same_object(row, payload)
            if row.verdict is not None:
                log.info(
                    "upload already judged; complete ignored",
                    extra=_fields(upload_id=row.upload_id, verdict=row.verdict, verdict_id=str(row.verdict_event_id)),
                )
                # A redelivery after a crash between claim and acknowledgement: finish it before committing.
                await self.flush_verdict(f"upload:{row.upload_id}")
                return
            if not recorded:
                what = "complete redelivered" if row.completed_event_id == event.id else "another complete; first wins"
                log.info(what, extra=_fields(upload_id=row.upload_id, first=row.completed_event_id))
            if event.traceparent and tracing.ENABLED:  # verified later (object not there yet): same trace
                self._traces[row.upload_id] = event.traceparent
                while len(self._traces) > 10_000:
                    self._traces.pop(next(iter(self._traces)))
            await self.verify_upload(row.upload_id)
        # Other types on the topic are not ingest's business.

    async def on_notification(self, n: ObjectNotification) -> None:
        """Record a MinIO notification for an owned key; a created object completes any waiting upload."""
        if n.bucket != self.bucket.name or not owns_key(n.key, self.settings.upload_prefix):
            return
        applied = await self.store.record_object(n)
        log.info(
            "object %s", n.kind, extra=_fields(key=n.key, etag=n.etag, size=n.size, seq=n.sequencer, applied=applied)
        )
        if n.kind == "created":
            for upload_id in await self.store.pending_completed_uploads(n.key):
                await self.verify_upload(upload_id)

    # ------------------------------------------------------------ verification
    async def verify_upload(self, upload_id: int) -> None:
        """Verify an upload now unless it is judged or another process is at it."""
        row = await self.store.lease_upload(upload_id, self.owner, self.settings.lease_seconds)
        if row is None:
            log.info("upload judged or being verified elsewhere", extra=_fields(upload_id=upload_id))
            return
        stored = self._traces.pop(upload_id, None)
        parent = None if tracing.in_span() else tracing.context_of(stored)
        with tracing.tracer.start_as_current_span(
            "ingest verify", context=parent, attributes={"registry.upload_id": upload_id}
        ):
            await self._verify_leased(row)

    async def _verify_leased(self, row: UploadRow) -> None:
        lost = threading.Event()
        progress = Progress()
        keeper = asyncio.create_task(self._keep_upload_lease(row.upload_id, progress, lost))
        released = False
        try:
            async with self._slots:
                if len(row.object_key.encode()) > MAX_KEY_BYTES:
                    raise UnreadableObject(
                        f"object key is {len(row.object_key.encode())} bytes (at most {MAX_KEY_BYTES})"
                    )
                try:
                    opened = await asyncio.get_running_loop().run_in_executor(
                        self._streams, self.bucket.open, row.object_key
                    )
                except ObjectMissing:
                    await self._object_absent(row)
                    released = True
                    return
                log.info("verifying", extra=_fields(upload_id=row.upload_id, key=row.object_key, size=opened.size))
                started = time.monotonic()
                size, sha256, head = await self._digest(opened, row.rfilename, progress, lost)
            if lost.is_set():
                log.warning("lease lost during verification", extra=_fields(upload_id=row.upload_id))
                return
            assert row.declared_size is not None and row.declared_sha256 is not None
            verdict = judge(
                rfilename=row.rfilename,
                declared_size=row.declared_size,
                declared_sha256=row.declared_sha256,
                size=size,
                sha256=sha256,
                head=head,
                max_header=self.settings.safetensors_max_header_mib * 1024 * 1024,
            )
            elapsed = time.monotonic() - started
            log.info(
                "object streamed",
                extra=_fields(
                    upload_id=row.upload_id, size=size, seconds=round(elapsed, 3), mbps=round(size / 1e6 / elapsed, 1)
                ),
            )
            released = await self._claim_and_finish(row, verdict, opened.etag, size, sha256)
        except VerificationCancelled:
            log.warning("lease lost during verification", extra=_fields(upload_id=row.upload_id))
        except Exception as exc:
            released = await self._verification_failed(row, exc)
        finally:
            keeper.cancel()
            if not released:
                with contextlib.suppress(Exception):
                    await asyncio.shield(self.store.release_upload(row.upload_id, self.owner))

    async def _verification_failed(self, row: UploadRow, exc: Exception) -> bool:
        """A verification broke. Storage or Postgres away (transient): the sweeper tries again later, without
        limit. The object unreadable for good (permanent), or failures of another kind for the
        `max_verify_attempts`-th time: the upload is rejected as `unverifiable`. Otherwise: counted, tried
        again after a backoff. True if the lease was given back (or the verdict claimed)."""
        kind, error = CLASSIFIER(exc), describe(exc)
        failures = row.failures + (kind != "transient")
        if kind == "permanent" or (kind == "unexpected" and failures >= self.settings.max_verify_attempts):
            detail = error if kind == "permanent" else f"verification failed {failures} times, last: {error}"
            log.error("upload unverifiable", extra=_fields(upload_id=row.upload_id, error=detail[:500]))
            verdict = Judgement(False, *file_format_of(row.rfilename), "unverifiable", detail[:2000])
            with contextlib.suppress(Exception):
                # Postgres or Kafka away now: the lease lapses and the next attempt decides again.
                return await asyncio.shield(self._claim_and_finish(row, verdict))
            return False
        retry = self.retry_backoff.delay(failures if kind == "unexpected" else row.attempts)
        log.warning(
            "verification failed (%s); retrying in %.1f s",
            kind,
            retry,
            exc_info=kind == "unexpected",
            extra=_fields(upload_id=row.upload_id, failures=failures, error=error[:500]),
        )
        failed = error[:2000] if kind != "transient" else None
        with contextlib.suppress(Exception):
            await asyncio.shield(self.store.release_upload(row.upload_id, self.owner, retry_in=retry, failed=failed))
        return True

    async def _digest(
        self, opened: OpenedObject, rfilename: str, progress: Progress, stop: threading.Event
    ) -> tuple[int, str, bytes]:
        fmt, _ = file_format_of(rfilename)
        head = HeadCapture(self.settings.safetensors_max_header_mib * 1024 * 1024) if fmt == "safetensors" else None

        def run() -> tuple[int, str]:
            # The thread owns the response: it closes it even when the awaiting task was cancelled.
            ok = False
            try:
                result = stream_digest(
                    opened.readinto,
                    chunk_bytes=self.settings.chunk_bytes,
                    buffers=self.settings.read_buffers,
                    head=head,
                    max_bytes_per_second=self.settings.max_read_mbps * 1e6,
                    stop=stop,
                    progress=progress,
                )
                ok = True
                return result
            finally:
                opened.close(reuse=ok)

        try:
            size, sha256 = await asyncio.get_running_loop().run_in_executor(self._streams, run)
        except asyncio.CancelledError:
            stop.set()
            raise
        return size, sha256, head.data if head is not None else b""

    async def _keep_upload_lease(self, upload_id: int, progress: Progress, lost: threading.Event) -> None:
        interval = min(self.settings.lease_seconds / 3, 2.0)
        while True:
            await asyncio.sleep(interval)
            try:
                if not await self.store.renew_upload_lease(
                    upload_id, self.owner, self.settings.lease_seconds, progress.bytes_read
                ):
                    lost.set()
                    return
            except Exception:
                log.warning("lease renewal failed", exc_info=True, extra=_fields(upload_id=upload_id))

    async def _object_absent(self, row: UploadRow) -> None:
        grace = timedelta(seconds=self.settings.object_grace_seconds)
        if row.missing_since is not None and row.db_now - row.missing_since >= grace:
            detail = f"no object at {row.object_key} {self.settings.object_grace_seconds:g} s after complete"
            await self._claim_and_finish(
                row, Judgement(False, *file_format_of(row.rfilename), "object_missing", detail)
            )
            return
        # The notification may still be on its way: wait for it (or for the grace period to end).
        await self.store.mark_missing(row.upload_id, self.owner, self.settings.object_grace_seconds)
        log.info("object not there yet", extra=_fields(upload_id=row.upload_id, key=row.object_key))

    async def _claim_and_finish(
        self,
        row: UploadRow,
        verdict: Judgement,
        etag: str | None = None,
        size: int | None = None,
        sha256: str | None = None,
        *,
        expiry: bool = False,
    ) -> bool:
        """Claim the verdict (once, under the lease) and carry it out; False if it was not ours to claim."""
        event_id = str(uuid.uuid4())
        base = {
            "upload_id": row.upload_id,
            "repo_id": row.repo_id,
            "version": row.version,
            "rfilename": row.rfilename,
            "object_key": row.object_key,
        }
        action, action_etag, qkey = "none", None, None
        payload: EventData
        if verdict.verified:
            assert size is not None and sha256 is not None
            payload = UploadVerified(
                **base,
                size=size,
                sha256=sha256,
                etag=etag,
                file_format=verdict.file_format,
                is_pickle=verdict.is_pickle,
            )
        else:
            reason: RejectReason = verdict.reason or "object_missing"
            if reason == "expired":
                action, action_etag = ("remove", etag) if etag else ("none", None)
            elif reason not in ("object_missing", "unverifiable"):  # nothing that could be read to move
                action, action_etag, qkey = "quarantine", etag, quarantine_key(row.object_key)
            payload = UploadRejected(**base, reason=reason, detail=verdict.detail, quarantine_key=qkey)
        event = make_event(payload, source=self.settings.event_source, subject=row.repo_id, id=event_id)
        new = NewVerdict(
            event_id=event_id,
            dedupe_key=f"upload:{row.upload_id}",
            object_key=row.object_key,
            topic=self.settings.verdicts_topic,
            message_key=row.repo_id,
            event=encode_event(event),
            action=action,
            action_etag=action_etag,
            quarantine_key=qkey,
        )
        claimed = await self.store.claim_upload_verdict(
            row.upload_id,
            self.owner,
            self.settings.lease_seconds,
            verdict="verified" if verdict.verified else "rejected",
            reason=verdict.reason,
            judged_etag=etag,
            new=new,
            only_if_not_completed=expiry,
        )
        if claimed is None:
            log.info("verdict already claimed elsewhere", extra=_fields(upload_id=row.upload_id))
            return False
        outcome = "verified" if verdict.verified else "rejected"
        VERIFICATIONS.labels(outcome, verdict.reason or "ok").inc()
        VERIFIED_BYTES.labels(outcome).inc(size or 0)
        await self.finish_verdict(claimed)
        return True

    # ------------------------------------------------------------ carrying out a claimed verdict
    async def finish_verdict(self, v: VerdictRow) -> None:
        """Move or remove the object as the verdict says, publish it (acks=all, confirmed), mark it published.

        Safe to repeat: the object operations are idempotent and the event is the same bytes, same id.
        """
        keeper = asyncio.create_task(self._keep_verdict_lease(v.event_id))
        try:
            if v.action == "quarantine" and v.quarantine_key:
                moved = await asyncio.to_thread(self.bucket.move, v.object_key, v.quarantine_key, v.action_etag)
                if not moved:
                    log.warning("object to quarantine was gone", extra=_fields(key=v.object_key))
            elif v.action == "remove":
                await asyncio.to_thread(self.bucket.remove, v.object_key, v.action_etag)
            await self.publisher.send_event(v.topic, v.event, v.message_key.encode(), str(v.event_id))
            await self.store.mark_published(v.event_id)
        except BaseException:
            with contextlib.suppress(Exception):
                await asyncio.shield(self.store.release_verdict(v.event_id, self.owner))
            raise
        finally:
            keeper.cancel()
        log.info("verdict published", extra=_fields(verdict_id=str(v.event_id), key=v.object_key, dedupe=v.dedupe_key))

    async def flush_verdict(self, dedupe_key: str) -> None:
        """Finish a claimed verdict that was never acknowledged, if nobody else is finishing it."""
        for v in await self.store.lease_unpublished_verdicts(
            self.settings.upload_prefix, self.owner, self.settings.lease_seconds, 1, dedupe_key=dedupe_key
        ):
            await self.finish_verdict(v)

    async def _keep_verdict_lease(self, event_id: uuid.UUID) -> None:
        interval = min(self.settings.lease_seconds / 3, 2.0)
        while True:
            await asyncio.sleep(interval)
            with contextlib.suppress(Exception):
                await self.store.renew_verdict_lease(event_id, self.owner, self.settings.lease_seconds)

    # ------------------------------------------------------------ strays and expiries
    async def _judge_stray(self, obj: ObjectRow) -> None:
        now = await asyncio.to_thread(self.bucket.stat, obj.object_key)
        if now is None or (obj.etag is not None and now[0] != obj.etag):
            # Gone already, or replaced: the replacement's own notification is judged on its own.
            await self.store.settle_object(obj, self.owner, judged=True)
            return
        qkey = quarantine_key(obj.object_key)
        event_id = str(uuid.uuid4())
        payload = ObjectQuarantined(object_key=obj.object_key, quarantine_key=qkey, size=now[1])
        event = make_event(payload, source=self.settings.event_source, subject=obj.object_key, id=event_id)
        new = NewVerdict(
            event_id=event_id,
            dedupe_key=f"stray:{obj.object_key}@{obj.sequencer or obj.etag}",
            object_key=obj.object_key,
            topic=self.settings.verdicts_topic,
            message_key=obj.object_key,
            event=encode_event(event),
            action="quarantine",
            action_etag=now[0],
            quarantine_key=qkey,
        )
        claimed = await self.store.claim_stray_verdict(obj, self.owner, self.settings.lease_seconds, new)
        if claimed is None:
            await self.store.settle_object(obj, self.owner, judged=False)
            return
        log.info("stray object", extra=_fields(key=obj.object_key, etag=obj.etag, verdict_id=event_id))
        VERIFICATIONS.labels("quarantined", "stray_object").inc()
        await self.finish_verdict(claimed)

    async def _expire(self, row: UploadRow, ttl: float) -> None:
        if row.multipart_upload_id is not None:
            # Its parts are no object: MinIO keeps them until the multipart upload is aborted. Aborting first
            # also closes the door on a late complete (the api's S3 complete then fails: the upload is gone).
            await asyncio.to_thread(self.bucket.abort_multipart, row.object_key, row.multipart_upload_id)
            log.info("multipart upload aborted", extra=_fields(upload_id=row.upload_id, key=row.object_key))
        try:
            now = await asyncio.to_thread(self.bucket.stat, row.object_key)
        except Exception as exc:
            if CLASSIFIER(exc) != "permanent":
                raise
            now = None  # a name the store cannot hold: there is no object to remove
        if now is not None and await self.store.other_pending_upload(row.object_key, row.upload_id):
            now = None  # the object belongs to a newer upload of the same file: leave it to that one
        detail = f"not completed within {ttl:g} s of being initiated"
        verdict = Judgement(False, *file_format_of(row.rfilename), "expired", detail)
        if not await self._claim_and_finish(row, verdict, now[0] if now else None, expiry=True):
            await self.store.release_upload(row.upload_id, self.owner)

    # ------------------------------------------------------------ the sweeper
    async def sweep_once(self) -> None:
        """One pass over due work under this worker's prefix; long verifications continue in the background."""
        s, prefix, lease = self.settings, self.settings.upload_prefix, self.settings.lease_seconds
        for v in await self.store.lease_unpublished_verdicts(prefix, self.owner, lease, 20):
            self._spawn(self.finish_verdict(v), "republish", str(v.event_id))
        room = s.max_concurrent_verifications - len(self._sweeps)
        if room > 0:
            for row in await self.store.lease_due_uploads(prefix, self.owner, lease, room):
                self._spawn(self._verify_leased(row), "verify", f"upload:{row.upload_id}")
        for row in await self.store.lease_expired_uploads(prefix, self.owner, lease, s.upload_ttl_seconds, 20):
            self._spawn(self._expire(row, s.upload_ttl_seconds), "expire", f"upload:{row.upload_id}")
        for row in await self.store.lease_expired_multipart(prefix, self.owner, lease, s.multipart_ttl_seconds, 20):
            self._spawn(self._expire(row, s.multipart_ttl_seconds), "expire", f"upload:{row.upload_id}")
        for obj in await self.store.lease_stray_candidates(prefix, self.owner, lease, s.stray_grace_seconds, 20):
            self._spawn(self._judge_stray(obj), "stray", obj.object_key)

    def _spawn(self, work: object, what: str, ident: str) -> None:
        async def run() -> None:
            correlation_id.set(ident)
            try:
                await work  # type: ignore[misc]
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("sweeper %s failed; will retry", what, extra=_fields(id=ident))

        task = asyncio.create_task(run())
        self._sweeps.add(task)
        task.add_done_callback(self._sweeps.discard)

    async def stop_sweeps(self, wait_seconds: float) -> None:
        """Let background work finish for up to `wait_seconds` seconds, then cancel it."""
        if self._sweeps:
            _, pending = await asyncio.wait(set(self._sweeps), timeout=wait_seconds)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    def close(self) -> None:
        """Once nothing verifies any more (the broker stopped): let the verification threads go."""
        self._streams.shutdown(wait=False, cancel_futures=True)


class Sweeper(BackgroundTask):
    """Runs `IngestService.sweep_once` every `sweep_interval_seconds`, supervised (restarted if it dies); a
    sweep that fails is tried again at the next interval, and the health says `retrying` meanwhile."""

    name = "ingest-sweeper"

    def __init__(self, service: IngestService) -> None:
        self.service = service

    async def run(self) -> None:
        interval = self.service.settings.sweep_interval_seconds
        while True:
            try:
                await self.service.sweep_once()
                self.report_ok()
            except Exception as exc:
                self.report_retrying(exc)
                log.warning("sweep failed: %s", describe(exc), exc_info=CLASSIFIER(exc) == "unexpected")
            await asyncio.sleep(interval)
