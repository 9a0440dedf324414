"""How ingest treats a verification that fails: outages retried without counting, other failures counted and,
at INGEST_MAX_VERIFY_ATTEMPTS, an `unverifiable` rejection; an object name the store refuses at once.

The store and the verdict are stand-ins (the real ones are exercised by tests/integration/test_ingest.py)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import psycopg
from minio.error import S3Error

from registry_ingest.service import CLASSIFIER, IngestService, PoisonMessage
from registry_ingest.settings import IngestSettings
from registry_ingest.state import UploadRow
from registry_shared.consumer_policy import PermanentError


class Store:
    def __init__(self) -> None:
        self.released: list[dict[str, Any]] = []

    async def release_upload(
        self, upload_id: int, owner: str, retry_in: float | None = None, failed: str | None = None
    ):
        self.released.append({"retry_in": retry_in, "failed": failed})


def service(max_attempts: int = 3) -> tuple[IngestService, Store, list]:
    store = Store()
    svc = IngestService(IngestSettings(max_verify_attempts=max_attempts), store, None, None, "me")  # type: ignore[arg-type]
    verdicts: list = []

    async def claim(row: UploadRow, verdict: Any, *a: Any, **kw: Any) -> bool:
        verdicts.append(verdict)
        return True

    svc._claim_and_finish = claim  # type: ignore[method-assign]
    return svc, store, verdicts


def row(failures: int = 0, attempts: int = 1) -> UploadRow:
    now = datetime.now(UTC)
    return UploadRow(
        upload_id=1, object_key="uploads/a/1/x.bin", repo_id="a/b", version="1", rfilename="x.bin",
        initiated_event_id=None, initiated_at=now, completed_event_id="e", completed_at=now, declared_size=1,
        declared_sha256="0" * 64, missing_since=None, due_at=now, attempts=attempts, lease_owner="me",
        lease_until=now, bytes_read=0, verdict=None, reason=None, judged_etag=None, verdict_event_id=None,
        verdict_at=None, created_at=now, failures=failures, last_error=None, db_now=now,
    )  # fmt: skip


async def test_an_outage_is_retried_without_being_counted() -> None:
    svc, store, verdicts = service()
    assert await svc._verification_failed(row(failures=2, attempts=9), psycopg.OperationalError("gone"))
    assert verdicts == []
    assert store.released == [{"retry_in": store.released[0]["retry_in"], "failed": None}]
    assert 0 < store.released[0]["retry_in"] <= 60.0


async def test_other_failures_are_counted_then_end_in_an_unverifiable_rejection() -> None:
    svc, store, verdicts = service(max_attempts=3)
    odd = S3Error(None, "BadRequest", "Bad request", "r", "i", "h", None)
    assert CLASSIFIER(odd) == "unexpected"
    await svc._verification_failed(row(failures=0), odd)
    await svc._verification_failed(row(failures=1), odd)
    assert [r["failed"] for r in store.released] == ["S3Error: " + str(odd)] * 2
    assert verdicts == []
    await svc._verification_failed(row(failures=2), odd)  # the third
    assert len(store.released) == 2
    (verdict,) = verdicts
    assert (verdict.verified, verdict.reason) == (False, "unverifiable")
    assert verdict.detail.startswith("verification failed 3 times, last: S3Error")


async def test_a_name_the_store_refuses_is_rejected_at_once() -> None:
    svc, store, verdicts = service()
    refused = S3Error(None, "XMinioInvalidObjectName", "Object name contains unsupported characters.", "r", "i", "h")
    await svc._verification_failed(row(), refused)
    assert store.released == []
    assert [v.reason for v in verdicts] == ["unverifiable"]
    assert "XMinioInvalidObjectName" in verdicts[0].detail


def test_ingest_poison_is_permanent() -> None:
    assert isinstance(PoisonMessage("x"), PermanentError)
    assert CLASSIFIER(PoisonMessage("x")) == "permanent"
