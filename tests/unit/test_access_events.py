"""The download hot path's hand-built access event is the same CloudEvent the typed path builds; the
download counter reads those events (and nothing else) as downloads."""

from __future__ import annotations

import asyncio
import json

from registry_api.catalog.service import count_downloads
from registry_api.kit.outbox import AccessRecorder
from registry_shared.events import CloudEvent, FileAccessed, Topics, decode_event


def test_record_download_builds_a_valid_file_accessed_event():
    recorder = AccessRecorder(pool=None, flush_ms=20, on_flush=asyncio.Event())  # type: ignore[arg-type]
    recorder.record_download(7, "acme/bert", "v1", "dir/model.bin", 1234)
    ((event_id, topic, key, payload),) = recorder._buffer
    assert topic == Topics.ACCESS and key == "acme/bert"
    event = decode_event(payload)
    assert isinstance(event, CloudEvent) and event.id == str(event_id)
    assert event.type == FileAccessed.event_type and event.subject == "acme/bert"
    data = event.payload()
    assert isinstance(data, FileAccessed)
    assert (data.user_id, data.kind, data.repo_id, data.version, data.rfilename, data.bytes) == (
        7,
        "download",
        "acme/bert",
        "v1",
        "dir/model.bin",
        1234,
    )
    typed = FileAccessed(
        user_id=7, kind="download", repo_id="acme/bert", version="v1", rfilename="dir/model.bin", bytes=1234, ts=data.ts
    )
    assert json.loads(payload)["data"] == typed.model_dump()


def test_the_download_counter_counts_download_events_and_nothing_else():
    recorder = AccessRecorder(pool=None, flush_ms=20, on_flush=asyncio.Event())  # type: ignore[arg-type]
    recorder.record_download(7, "acme/bert", "v1", "model.bin", 1)
    recorder.record_download(8, "acme/bert", None, "model.bin", 1)
    recorder.record_download(8, "acme/gpt", None, "model.bin", 1)
    recorder.record(FileAccessed(user_id=7, kind="manifest", repo_id="acme/bert", ts=1.0))
    downloads = [row[3] for row in recorder._buffer]
    other_type = json.dumps({"type": "registry.user.registered.v1", "data": {"kind": "download", "repo_id": "x/y"}})
    not_a_repo = json.loads(downloads[0])
    not_a_repo["data"]["repo_id"] = 42
    junk = [b"", b"not json", b"[1, 2]", b'{"type": 1}', other_type.encode(), json.dumps(not_a_repo).encode(), None]
    assert count_downloads([*downloads, *junk]) == {"acme/bert": 2, "acme/gpt": 1}
