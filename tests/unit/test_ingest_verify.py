"""Pure logic of the ingest worker: the safetensors header check, streaming digests, judgements, notifications."""

from __future__ import annotations

import hashlib
import io
import json
import struct
import threading

import pytest
from pydantic import ValidationError

from registry_ingest.notifications import BadNotification, message_key_outside, owns_key, parse_notification
from registry_ingest.settings import IngestSettings
from registry_ingest.verify import (
    HeadCapture,
    SafetensorsHeaderError,
    VerificationCancelled,
    check_safetensors_header,
    file_format_of,
    judge,
    stream_digest,
)


def st_file(header: dict, data_len: int, pad: int = 0) -> bytes:
    raw = json.dumps(header).encode() + b" " * pad
    return struct.pack("<Q", len(raw)) + raw + b"\x00" * data_len


GOOD_HEADER = {
    "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
    "b": {"dtype": "BF16", "shape": [4], "data_offsets": [24, 32]},
    "__metadata__": {"format": "pt"},
}


def check(blob: bytes) -> dict:
    return check_safetensors_header(blob, len(blob))


# ---------------------------------------------------------------- safetensors
def test_valid_header_parses():
    header = check(st_file(GOOD_HEADER, 32, pad=5))
    assert set(header) == {"a", "b", "__metadata__"}


def test_header_may_describe_no_tensors():
    assert check(st_file({}, 0)) == {}


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (b"\x01\x02", "shorter than the 8-byte"),
        (struct.pack("<Q", 0), "too small"),
        (struct.pack("<Q", 1000) + b"{}", "runs past the end"),
        (struct.pack("<Q", 2**40) + b"{}", "exceeds the limit"),
        (struct.pack("<Q", 4) + b"{no}", "not valid JSON"),
        (struct.pack("<Q", 2) + b"\xff\xfe", "not valid JSON"),
        (struct.pack("<Q", 2) + b"[]", "not a JSON object"),
    ],
    ids=["short", "zero-length", "truncated", "huge", "bad-json", "not-utf8", "not-object"],
)
def test_malformed_headers_are_rejected(blob, message):
    with pytest.raises(SafetensorsHeaderError, match=message):
        check(blob)


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        ({"dtype": "F32", "shape": [2], "data_offsets": [0, 9]}, "lie outside"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [8, 4]}, "not ordered"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [-1, 8]}, "not ordered"),
        ({"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}, "do not hold shape"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [0]}, r"\[begin, end\]"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [0, True]}, r"\[begin, end\]"),
        ({"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}, "non-negative"),
        ({"shape": [2], "data_offsets": [0, 8]}, "dtype missing"),
        ("nope", "not an object"),
    ],
)
def test_bad_tensor_entries_are_rejected(tensor, message):
    with pytest.raises(SafetensorsHeaderError, match=message):
        check(st_file({"w": tensor}, 8))


def test_offsets_are_checked_against_the_real_size_not_the_header():
    blob = st_file({"w": {"dtype": "U8", "shape": [16], "data_offsets": [0, 16]}}, 16)
    check(blob)
    with pytest.raises(SafetensorsHeaderError, match="lie outside"):
        check_safetensors_header(blob, len(blob) - 1)


def test_unknown_dtypes_are_checked_for_bounds_only():
    check(st_file({"w": {"dtype": "F4", "shape": [16], "data_offsets": [0, 8]}}, 8))


def test_metadata_must_map_strings_to_strings():
    with pytest.raises(SafetensorsHeaderError, match="__metadata__"):
        check(st_file({"__metadata__": {"n": 1}}, 0))


# ---------------------------------------------------------------- capturing the head of a stream
@pytest.mark.parametrize("chunk", [1, 3, 8, 9, 64, 10_000])
def test_head_capture_keeps_exactly_length_and_header_across_chunks(chunk):
    blob = st_file(GOOD_HEADER, 32)
    n = struct.unpack("<Q", blob[:8])[0]
    head = HeadCapture(max_header=1 << 20)
    for i in range(0, len(blob), chunk):
        head.feed(memoryview(blob)[i : i + chunk])
    assert head.data == blob[: 8 + n]
    check_safetensors_header(head.data, len(blob))


def test_head_capture_stops_at_the_cap():
    head = HeadCapture(max_header=16)
    head.feed(struct.pack("<Q", 1000) + b"x" * 2000)
    assert len(head.data) == 8 + 16
    with pytest.raises(SafetensorsHeaderError, match="exceeds the limit"):
        check_safetensors_header(head.data, 3000, max_header=16)


# ---------------------------------------------------------------- streaming digest
def reader(data: bytes, max_read: int | None = None):
    src = io.BytesIO(data)

    def readinto(view: memoryview) -> int:
        target = view if max_read is None else view[:max_read]
        return src.readinto(target)

    return readinto


@pytest.mark.parametrize(
    ("size", "chunk", "max_read"), [(0, 16, None), (1000, 64, None), (1000, 64, 7), (4096, 1024, 1024)]
)
def test_stream_digest_hashes_every_byte_once(size, chunk, max_read):
    data = bytes((i * 31 + 7) % 251 for i in range(size))
    head = HeadCapture(1 << 20)
    got = stream_digest(reader(data, max_read), chunk_bytes=chunk, buffers=2, head=head)
    assert got == (size, hashlib.sha256(data).hexdigest())
    assert head.data == data[: len(head.data)]


def test_stream_digest_stops_when_asked():
    stop = threading.Event()
    stop.set()
    with pytest.raises(VerificationCancelled):
        stream_digest(reader(b"x" * 100), chunk_bytes=16, stop=stop)


# ---------------------------------------------------------------- the judgement
def test_judgement_checks_size_then_sha_then_format():
    blob = st_file(GOOD_HEADER, 32)
    sha = hashlib.sha256(blob).hexdigest()
    kw = {"rfilename": "m.safetensors", "size": len(blob), "sha256": sha, "head": blob}
    assert judge(declared_size=len(blob), declared_sha256=sha.upper(), **kw).verified
    assert judge(declared_size=1, declared_sha256="0" * 64, **kw).reason == "size_mismatch"
    assert judge(declared_size=len(blob), declared_sha256="0" * 64, **kw).reason == "sha256_mismatch"
    broken = {**kw, "head": blob[:8] + b"[" + blob[9:]}
    rejected = judge(declared_size=len(blob), declared_sha256=sha, **broken)
    assert (rejected.verified, rejected.reason) == (False, "bad_safetensors_header")
    assert "JSON" in rejected.detail


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("model.safetensors", ("safetensors", False)),
        ("pytorch_model.bin", ("pickle", True)),
        ("weights.PT", ("pickle", True)),
        ("w.pth", ("pickle", True)),
        ("data.pkl", ("pickle", True)),
        ("config.json", ("other", False)),
    ],
)
def test_file_format_from_name(name, expected):
    assert file_format_of(name) == expected


def test_non_safetensors_files_skip_the_header_check():
    v = judge(
        rfilename="a.bin",
        declared_size=3,
        declared_sha256=hashlib.sha256(b"abc").hexdigest(),
        size=3,
        sha256=hashlib.sha256(b"abc").hexdigest(),
        head=b"",
    )
    assert (v.verified, v.file_format, v.is_pickle) == (True, "pickle", True)


# ---------------------------------------------------------------- MinIO notifications
def minio_message(name: str, key: str, **obj) -> bytes:
    record = {"eventName": name, "s3": {"bucket": {"name": "models"}, "object": {"key": key, **obj}}}
    return json.dumps({"EventName": name, "Key": f"models/{key}", "Records": [record]}).encode()


def test_notification_keys_are_url_decoded_with_plus_as_space():
    msg = minio_message(
        "s3:ObjectCreated:Put", "uploads%2Facme%2Fm%2F1.0%2Fmy+model%2B1.bin", size=5, eTag='"abc"', sequencer="18A"
    )
    [n] = parse_notification(msg)
    assert (n.kind, n.key, n.size, n.etag, n.sequencer) == (
        "created",
        "uploads/acme/m/1.0/my model+1.bin",
        5,
        "abc",
        "18A",
    )


def test_removed_and_other_events():
    [n] = parse_notification(minio_message("s3:ObjectRemoved:Delete", "uploads/a", sequencer="1"))
    assert n.kind == "removed"
    assert parse_notification(minio_message("s3:ObjectAccessed:Get", "uploads/a")) == []


@pytest.mark.parametrize("value", [b"nope", b"{}", b'{"Records": [{"eventName": "x"}]}', b"\xff"])
def test_unreadable_notifications_raise(value):
    with pytest.raises(BadNotification):
        parse_notification(value)


def test_key_ownership_never_covers_quarantine_or_legacy():
    assert owns_key("uploads/acme/m/1.0/f.bin", "uploads/")
    assert not owns_key("uploads/", "uploads/")
    assert not owns_key("quarantine/uploads/acme/m/1.0/f.bin", "uploads/")
    assert not owns_key("hf/acme/m/f.bin", "uploads/")
    assert not owns_key("itest-1/uploads/acme/m/1.0/f.bin", "uploads/")
    assert owns_key("itest-1/uploads/acme/m/1.0/f.bin", "itest-1/uploads/")


def test_message_key_prefilter_only_skips_what_is_surely_foreign():
    assert message_key_outside(b"models/hf/acme/m/f.bin", "models", "uploads/")
    assert not message_key_outside(b"models/uploads/acme/m/1/f.bin", "models", "uploads/")
    assert not message_key_outside(None, "models", "uploads/")
    assert not message_key_outside(b"other-bucket/x", "models", "uploads/")


@pytest.mark.parametrize("prefix", ["uploads", "quarantine/x/", "hf/", "/"])
def test_settings_refuse_reserved_or_malformed_prefixes(prefix):
    with pytest.raises(ValidationError):
        IngestSettings(upload_prefix=prefix)
