"""Multipart uploads against the real stack: the api signs part URLs, parts go straight to MinIO, the api
assembles them, ingest verifies the object like any other upload, and the file downloads byte-identical.

Files are a little above the 5 MiB part minimum so that several parts stay cheap on a shared machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time
import uuid

import httpx
import pytest
from minio.datatypes import Part
from minio.error import S3Error

from registry_api.uploads.storage import multipart_etag
from registry_shared.storage import minio_client

pytestmark = pytest.mark.timeout(180)

MIB = 1024 * 1024
PART = 5 * MIB


def body_of(size: int, seed: int = 0) -> bytes:
    """`size` pseudo-random bytes (distinct per seed, so parts differ)."""
    block = hashlib.sha256(f"block-{seed}".encode()).digest() * (MIB // 32)
    out = (block * (size // len(block) + 1))[:size]
    return os.urandom(64) + out[64:]


def initiate(registry, dev, repo: str, rfilename: str, size: int, part_size: int | None = PART, version: str = "v1"):
    body: dict = {"rfilename": rfilename, "size": size}
    if part_size is not None:
        body["part_size"] = part_size
    return registry.http.post(
        f"/v1/dev/models/{repo}/versions/{version}/uploads/multipart", headers=dev.headers, json=body
    )


def sign(registry, dev, upload_id: int, numbers: list[int], expires: int = 900) -> httpx.Response:
    return registry.http.post(
        f"/v1/dev/uploads/{upload_id}/parts", headers=dev.headers, json={"part_numbers": numbers, "expires": expires}
    )


def put_parts(registry, dev, up: dict, data: bytes, numbers: list[int]) -> dict[int, str]:
    """PUT the given parts' bytes to freshly signed URLs; returns {part_number: ETag}."""
    r = sign(registry, dev, up["upload_id"], numbers)
    assert r.status_code == 200, r.text
    etags = {}
    for p in r.json()["parts"]:
        n = p["part_number"]
        chunk = data[(n - 1) * up["part_size"] : n * up["part_size"]]
        assert len(chunk) == p["size"]
        resp = httpx.put(p["url"], content=chunk, timeout=60)
        assert resp.status_code == 200, resp.text
        etags[n] = resp.headers["etag"]
    return etags


def complete(registry, dev, upload_id: int, etags: dict[int, str], data: bytes, **override) -> httpx.Response:
    body = {
        "parts": [{"part_number": n, "etag": e} for n, e in sorted(etags.items())],
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        **override,
    }
    return registry.http.post(f"/v1/dev/uploads/{upload_id}/complete", headers=dev.headers, json=body)


def stored_parts(registry, dev, upload_id: int) -> dict:
    r = registry.http.get(f"/v1/dev/uploads/{upload_id}/parts", headers=dev.headers)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture
def model(registry):
    dev = registry.register("Multi")
    repo = registry.create_model(dev, "private")
    registry.create_version(dev, repo, "v1")
    return dev, repo


def test_a_file_in_three_parts_is_verified_and_downloads_byte_identical(registry, model):
    dev, repo = model
    data = body_of(2 * PART + 1234567)
    r = initiate(registry, dev, repo, "weights/model.gguf", len(data))
    assert r.status_code == 201, r.text
    up = r.json()
    assert (up["status"], up["part_size"], up["part_count"], up["last_part_size"]) == ("initiated", PART, 3, 1234567)
    assert up["object_key"] == f"uploads/{repo}/v1/weights/model.gguf"

    etags = put_parts(registry, dev, up, data, [1, 2, 3])
    listed = stored_parts(registry, dev, up["upload_id"])
    assert [(p["part_number"], p["size"]) for p in listed["parts"]] == [(1, PART), (2, PART), (3, 1234567)]
    assert [p["etag"] for p in listed["parts"]] == [etags[n].strip('"') for n in (1, 2, 3)]

    r = complete(registry, dev, up["upload_id"], etags, data)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "pending_verification"
    done = registry.wait_upload(dev, up["upload_id"], timeout=60)
    assert done["status"] == "available", done
    assert (done["size"], done["sha256"]) == (len(data), hashlib.sha256(data).hexdigest())

    # The stored object carries a multipart ETag (<md5 of the part md5s>-3), which is no MD5 of the bytes.
    r = registry.http.get(
        f"/v1/files/{repo}/weights/model.gguf/download", params={"version": "v1"}, headers=dev.headers
    )
    assert r.status_code == 200, r.text
    got = httpx.get(r.json()["url"], timeout=60)
    assert got.status_code == 200
    assert got.headers["etag"].strip('"') == multipart_etag([etags[n] for n in (1, 2, 3)])
    assert got.content == data
    # Nothing is left to list or sign once complete.
    assert stored_parts(registry, dev, up["upload_id"])["parts"] == []
    assert sign(registry, dev, up["upload_id"], [1]).status_code == 409


def test_resume_uploads_only_the_missing_parts(registry, model, minio_settings):
    dev, repo = model
    data = body_of(3 * PART + 10, seed=1)
    up = initiate(registry, dev, repo, "resume.bin", len(data)).json()
    assert up["part_count"] == 4
    first = put_parts(registry, dev, up, data, [1, 3])

    # A new client process knows only the upload id: it asks what is stored and sends the rest.
    state = stored_parts(registry, dev, up["upload_id"])
    assert (state["part_size"], state["part_count"], state["size"]) == (PART, 4, len(data))
    have = {p["part_number"]: p["etag"] for p in state["parts"]}
    assert sorted(have) == [1, 3]
    missing = [n for n in range(1, state["part_count"] + 1) if n not in have]
    rest = put_parts(registry, dev, up, data, missing)
    assert sorted(rest) == [2, 4]
    assert {n: e.strip('"') for n, e in first.items()} == {n: have[n] for n in first}

    r = complete(registry, dev, up["upload_id"], {**have, **rest}, data)
    assert r.status_code == 200, r.text
    assert registry.wait_upload(dev, up["upload_id"], timeout=60)["status"] == "available"


def test_an_expired_part_url_is_refused_and_a_fresh_one_works(registry, model):
    dev, repo = model
    data = body_of(PART + 100, seed=2)
    up = initiate(registry, dev, repo, "resign.bin", len(data)).json()
    r = sign(registry, dev, up["upload_id"], [1], expires=1)
    assert r.status_code == 200, r.text
    assert r.json()["expires_in"] == 1
    time.sleep(2.5)
    late = httpx.put(r.json()["parts"][0]["url"], content=data[:PART], timeout=60)
    assert late.status_code == 403, late.text
    assert "expired" in late.text.lower()

    etags = put_parts(registry, dev, up, data, [1, 2])  # re-signed
    r = complete(registry, dev, up["upload_id"], etags, data)
    assert r.status_code == 200, r.text
    assert registry.wait_upload(dev, up["upload_id"], timeout=60)["status"] == "available"


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"size": 100 * MIB, "part_size": 5 * MIB - 1}, "part_size"),
        ({"size": 100 * MIB, "part_size": 5 * 1024 * MIB + 1}, "part_size"),
        ({"size": 5 * MIB * 10_001, "part_size": 5 * MIB}, "10000"),
        ({"size": 0}, "size"),
        ({"size": 5 * 1024**4 + 1}, "size"),
        ({"size": 10, "extra": 1}, "unknown field"),
    ],
)
def test_initiate_refuses_what_s3_would(registry, model, body, needle):
    dev, repo = model
    r = registry.http.post(
        f"/v1/dev/models/{repo}/versions/v1/uploads/multipart", headers=dev.headers, json={"rfilename": "x.bin", **body}
    )
    assert r.status_code == 422, r.text
    assert needle in r.json()["detail"]


def test_default_part_size_keeps_within_10000_parts(registry, model):
    dev, repo = model
    small = initiate(registry, dev, repo, "small.bin", 10, part_size=None).json()
    assert (small["part_size"], small["part_count"], small["last_part_size"]) == (64 * MIB, 1, 10)
    huge = initiate(registry, dev, repo, "huge.bin", 2 * 1024**4, part_size=None).json()
    assert huge["part_count"] <= 10_000
    assert huge["part_size"] * huge["part_count"] >= 2 * 1024**4
    assert huge["part_size"] % MIB == 0
    for u in (small, huge):
        assert registry.http.delete(f"/v1/dev/uploads/{u['upload_id']}", headers=dev.headers).status_code == 200


def test_bad_part_numbers_and_part_lists_are_refused(registry, model):
    dev, repo = model
    data = body_of(2 * PART + 5, seed=3)
    up = initiate(registry, dev, repo, "bad.bin", len(data)).json()
    uid = up["upload_id"]
    for numbers, needle in (([0], "1 to 3"), ([4], "1 to 3"), ([1, 1], "distinct"), ([], "part_numbers")):
        r = sign(registry, dev, uid, numbers)
        assert r.status_code == 422, r.text
        assert needle in r.json()["detail"]
    etags = put_parts(registry, dev, up, data, [1, 2])

    # Part 3 never uploaded: the list is complete but storage does not hold it.
    r = complete(registry, dev, uid, {**etags, 3: '"0123456789abcdef0123456789abcdef"'}, data)
    assert (r.status_code, "part 3 is not stored") == (409, r.json()["detail"][: len("part 3 is not stored")])
    put3 = put_parts(registry, dev, up, data, [3])
    # A list with a part missing, out of order, or a wrong ETag.
    r = complete(registry, dev, uid, etags, data)
    assert r.status_code == 422 and "part 3 is missing" in r.json()["detail"], r.text
    body = {
        "parts": [{"part_number": n, "etag": e} for n, e in [(2, etags[2]), (1, etags[1]), (3, put3[3])]],
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    r = registry.http.post(f"/v1/dev/uploads/{uid}/complete", headers=dev.headers, json=body)
    assert r.status_code == 422 and "in order" in r.json()["detail"], r.text
    r = complete(registry, dev, uid, {**etags, **put3, 2: etags[1]}, data)
    assert r.status_code == 409 and "part 2: ETag" in r.json()["detail"], r.text
    r = complete(registry, dev, uid, {**etags, **put3}, data, size=len(data) + 1)
    assert r.status_code == 422 and "declared at initiate" in r.json()["detail"], r.text
    # A part of the wrong length (part 1 re-uploaded short): refused before S3 would accept a wrong object.
    short = sign(registry, dev, uid, [1]).json()["parts"][0]["url"]
    etag_short = httpx.put(short, content=data[: PART - 1], timeout=60).headers["etag"]
    r = complete(registry, dev, uid, {**etags, **put3, 1: etag_short}, data)
    assert r.status_code == 409 and "part 1 holds" in r.json()["detail"], r.text
    # The single-PUT complete does not take a multipart upload.
    r = registry.http.post(
        f"/v1/dev/models/{repo}/versions/v1/uploads/complete",
        headers=dev.headers,
        json={"rfilename": "bad.bin", "size": len(data), "sha256": hashlib.sha256(data).hexdigest()},
    )
    assert r.status_code == 409 and "multipart" in r.json()["detail"], r.text
    # Still open: nothing above changed its state.
    assert registry.http.get(f"/v1/dev/uploads/{uid}", headers=dev.headers).json()["status"] == "initiated"


def test_a_wrong_sha256_is_rejected_by_ingest_with_its_reason(registry, model):
    dev, repo = model
    data = body_of(PART + 7, seed=4)
    up = initiate(registry, dev, repo, "liar.bin", len(data)).json()
    etags = put_parts(registry, dev, up, data, [1, 2])
    r = complete(registry, dev, up["upload_id"], etags, data, sha256="0" * 64)
    assert r.status_code == 200, r.text
    done = registry.wait_upload(dev, up["upload_id"], timeout=60)
    assert (done["status"], done["reason"]) == ("rejected", "sha256_mismatch"), done


def test_abort_deletes_the_parts_and_closes_the_upload(registry, model, minio_settings):
    dev, repo = model
    data = body_of(PART + 1, seed=5)
    up = initiate(registry, dev, repo, "aborted.bin", len(data)).json()
    etags = put_parts(registry, dev, up, data, [1, 2])
    s3_id = _s3_upload_id(registry, up["upload_id"])
    client = minio_client(minio_settings)
    assert len(client._list_parts(minio_settings.minio_bucket, up["object_key"], s3_id).parts) == 2

    r = registry.http.delete(f"/v1/dev/uploads/{up['upload_id']}", headers=dev.headers)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "aborted"
    with pytest.raises(S3Error) as exc:
        client._list_parts(minio_settings.minio_bucket, up["object_key"], s3_id)
    assert exc.value.code == "NoSuchUpload"
    assert registry.http.get(f"/v1/dev/uploads/{up['upload_id']}", headers=dev.headers).json()["status"] == "aborted"

    r = complete(registry, dev, up["upload_id"], etags, data)
    assert r.status_code == 409 and "aborted" in r.json()["detail"], r.text
    assert sign(registry, dev, up["upload_id"], [1]).status_code == 409
    assert registry.http.delete(f"/v1/dev/uploads/{up['upload_id']}", headers=dev.headers).status_code == 409
    # The file can be uploaded again with a new upload.
    again = initiate(registry, dev, repo, "aborted.bin", len(data)).json()
    assert again["upload_id"] != up["upload_id"]


def test_another_developer_cannot_touch_your_upload(registry, model):
    dev, repo = model
    data = body_of(PART + 3, seed=6)
    up = initiate(registry, dev, repo, "mine.bin", len(data)).json()
    etags = put_parts(registry, dev, up, data, [1])
    other = registry.register("Other")
    uid = up["upload_id"]
    calls = [
        registry.http.post(f"/v1/dev/uploads/{uid}/parts", headers=other.headers, json={"part_numbers": [1]}),
        registry.http.get(f"/v1/dev/uploads/{uid}/parts", headers=other.headers),
        registry.http.post(
            f"/v1/dev/uploads/{uid}/complete",
            headers=other.headers,
            json={"parts": [{"part_number": 1, "etag": etags[1]}], "size": len(data), "sha256": "0" * 64},
        ),
        registry.http.delete(f"/v1/dev/uploads/{uid}", headers=other.headers),
        initiate(registry, other, repo, "theirs.bin", len(data)),
    ]
    assert [c.status_code for c in calls] == [404] * 5, [c.text for c in calls]
    assert registry.http.get(f"/v1/dev/uploads/{uid}/parts", headers={"x-api-key": "sk_live_nope"}).status_code == 401
    assert stored_parts(registry, dev, uid)["status"] == "initiated"
    # A platform user is no developer.
    plat = registry.create_user("platform")
    assert registry.http.get(f"/v1/dev/uploads/{uid}/parts", headers=plat.headers).status_code == 403


def test_a_single_put_upload_is_not_a_multipart_one(registry, model):
    dev, repo = model
    single = registry.upload(dev, repo, "v1", "small.txt", b"hello")
    uid = single["upload_id"]
    assert registry.http.get(f"/v1/dev/uploads/{uid}/parts", headers=dev.headers).status_code == 404
    assert registry.http.delete(f"/v1/dev/uploads/{uid}", headers=dev.headers).status_code == 404
    assert registry.wait_upload(dev, uid)["status"] == "available"


def _s3_upload_id(registry, upload_id: int) -> str:
    import psycopg

    from registry_shared.settings import PostgresSettings

    with psycopg.connect(PostgresSettings().database_url) as conn:
        row = conn.execute("select multipart_upload_id from uploads where id = %s", [upload_id]).fetchone()
    assert row and row[0]
    return row[0]


# ---------------------------------------------------------------- expiry: ingest aborts abandoned multipart uploads
async def test_ingest_aborts_abandoned_multipart_uploads_and_rejects_them_as_expired(
    kafka_settings, minio_settings, pg_settings, tmp_path
):
    """A test ingest worker (own prefix and topics; see ingest_helpers) with INGEST_MULTIPART_TTL_SECONDS=4."""
    from ingest_helpers import EventBus, IngestProcess, TopicReader, Upload, WorkerConfig, upload_row

    bootstrap = kafka_settings.kafka_bootstrap_servers
    config = WorkerConfig(tag=uuid.uuid4().hex[:8], overrides={"INGEST_MULTIPART_TTL_SECONDS": "4"})
    await config.prepare(bootstrap)
    worker = IngestProcess(config, tmp_path, "multipart-worker")
    worker.start()
    bus, verdicts = EventBus(bootstrap), TopicReader(bootstrap, config.verdicts_topic)
    await bus.start()
    await verdicts.start()
    client, bucket = minio_client(minio_settings), minio_settings.minio_bucket
    try:
        await worker.wait_ready()
        repo = f"acme/mp-{uuid.uuid4().hex[:6]}"
        abandoned, finished, single = (Upload(config.prefix, repo, n) for n in ("gone.bin", "done.bin", "one.bin"))
        part = body_of(PART, seed=7)
        ids = {}
        for up in (abandoned, finished):
            ids[up.upload_id] = await asyncio.to_thread(client._create_multipart_upload, bucket, up.key, {})
            etag = await asyncio.to_thread(client._upload_part, bucket, up.key, part, None, ids[up.upload_id], 1)
            await bus.publish(
                config.uploads_topic, up.initiated().model_copy(update={"multipart_upload_id": ids[up.upload_id]})
            )
        await bus.publish(config.uploads_topic, single.initiated())  # a single PUT never started: TTL 600 s
        # `finished` is completed in time, as the api would: S3 complete, then UploadCompleted.
        await asyncio.to_thread(
            client._complete_multipart_upload, bucket, finished.key, ids[finished.upload_id], [Part(1, etag)]
        )
        await bus.publish(config.uploads_topic, finished.completed(PART, hashlib.sha256(part).hexdigest()))

        expired = await verdicts.wait_verdict(abandoned.upload_id, within=60)
        assert expired.type == "registry.upload.rejected.v1"
        assert expired.payload().reason == "expired"
        assert "4 s" in (expired.payload().detail or "")
        with pytest.raises(S3Error) as exc:
            await asyncio.to_thread(client._list_parts, bucket, abandoned.key, ids[abandoned.upload_id])
        assert exc.value.code == "NoSuchUpload"
        row = await upload_row(pg_settings.database_url, abandoned.upload_id)
        assert (row["verdict"], row["multipart_upload_id"]) == ("rejected", ids[abandoned.upload_id])

        verified = await verdicts.wait_verdict(finished.upload_id, within=60)
        assert verified.type == "registry.upload.verified.v1"
        # The single-PUT upload of the same age is left alone (its TTL is the 600 s upload TTL).
        await asyncio.sleep(2)
        assert verdicts.verdicts_for(single.upload_id) == []
        assert (await upload_row(pg_settings.database_url, single.upload_id))["verdict"] is None
    finally:
        worker.stop()
        await verdicts.stop()
        await bus.stop()
        with contextlib.suppress(Exception):
            client.remove_object(bucket, finished.key)


async def test_an_expiry_verdict_closes_the_api_upload(registry, model, kafka_settings):
    """The api applies ingest's `expired` verdict to a multipart upload: it can be neither signed nor completed."""
    from ingest_helpers import EventBus

    from registry_shared.events import Topics, UploadRejected, make_event

    dev, repo = model
    data = body_of(PART + 9, seed=8)
    up = initiate(registry, dev, repo, "late.bin", len(data)).json()
    etags = put_parts(registry, dev, up, data, [1, 2])
    bus = EventBus(kafka_settings.kafka_bootstrap_servers)
    await bus.start()
    try:
        verdict = UploadRejected(
            upload_id=up["upload_id"],
            repo_id=repo,
            version="v1",
            rfilename="late.bin",
            object_key=up["object_key"],
            reason="expired",
            detail="not completed within 4 s of being initiated",
        )
        await bus.publish(Topics.VERDICTS, verdict, make_event(verdict, source="/ingest"))
    finally:
        await bus.stop()
    done = registry.wait_upload(dev, up["upload_id"], timeout=30)
    assert (done["status"], done["reason"]) == ("expired", "expired")
    assert sign(registry, dev, up["upload_id"], [1]).status_code == 409
    r = complete(registry, dev, up["upload_id"], etags, data)
    assert r.status_code == 409 and "expired" in r.json()["detail"], r.text


def test_listing_pages_through_more_than_1000_parts(registry, model, minio_settings):
    """ListParts answers 1,000 parts a page: the api follows the pages (parts are tiny here, which S3 only
    refuses at complete)."""
    dev, repo = model
    up = initiate(registry, dev, repo, "many.bin", 1005 * PART).json()
    assert up["part_count"] == 1005
    urls = []
    for start in (1, 1001):
        r = sign(registry, dev, up["upload_id"], list(range(start, min(start + 1000, 1006))))
        assert r.status_code == 200, r.text
        urls += [p["url"] for p in r.json()["parts"]]
    assert len(urls) == 1005
    assert sign(registry, dev, up["upload_id"], list(range(1, 1002))).status_code == 422  # 1,000 a request
    with httpx.Client(timeout=30) as http:
        for url in urls[:1003]:
            assert http.put(url, content=b"x").status_code == 200
    listed = stored_parts(registry, dev, up["upload_id"])
    assert [p["part_number"] for p in listed["parts"]] == list(range(1, 1004))
    assert registry.http.delete(f"/v1/dev/uploads/{up['upload_id']}", headers=dev.headers).status_code == 200


def test_complete_is_safe_to_repeat_and_to_race(registry, model, minio_settings):
    dev, repo = model
    data = body_of(PART + 11, seed=9)
    up = initiate(registry, dev, repo, "race.bin", len(data)).json()
    etags = put_parts(registry, dev, up, data, [1, 2])
    # Two completes at once: one assembles the object, the other is told the upload is no longer open.
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda _: complete(registry, dev, up["upload_id"], etags, data), range(2)))
    assert sorted(a.status_code for a in answers) == [200, 409], [a.text for a in answers]
    assert registry.wait_upload(dev, up["upload_id"], timeout=60)["status"] == "available"


def test_a_complete_that_reached_storage_but_not_the_database_can_be_repeated(registry, model, minio_settings):
    """Object storage assembled the object, then the api's transaction failed: the retry recognizes the object
    by its multipart ETag (md5 of the parts' md5s, -count) and records the completion."""
    dev, repo = model
    data = body_of(2 * PART + 3, seed=10)
    up = initiate(registry, dev, repo, "retried.bin", len(data)).json()
    etags = put_parts(registry, dev, up, data, [1, 2, 3])
    client = minio_client(minio_settings)
    s3_id = _s3_upload_id(registry, up["upload_id"])
    parts = [Part(n, e.strip('"')) for n, e in sorted(etags.items())]
    client._complete_multipart_upload(minio_settings.minio_bucket, up["object_key"], s3_id, parts)

    wrong = complete(registry, dev, up["upload_id"], {**etags, 3: etags[2]}, data)
    assert wrong.status_code == 409 and "no longer exists" in wrong.json()["detail"], wrong.text
    r = complete(registry, dev, up["upload_id"], etags, data)
    assert r.status_code == 200, r.text
    assert registry.wait_upload(dev, up["upload_id"], timeout=60)["status"] == "available"
