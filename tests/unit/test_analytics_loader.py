"""Pure logic of the analytics loader and queries: decoding, batch determinism, windows, the id cache."""

from __future__ import annotations

import json
import math

import pytest
from aiokafka import ConsumerRecord

from registry_analytics.batching import RawBatch, new_token
from registry_analytics.decode import InvalidEvent, decode_message
from registry_analytics.queries import Window
from registry_analytics.store import failure_kind
from registry_shared.consumer_policy import PermanentError
from registry_shared.events import FileAccessed, UserKeyRotated, UserRegistered, encode_event, make_event

TS = 1_750_000_000.25
E1 = "7d3e4c1a-1b2c-4d5e-8f90-a1b2c3d4e5f6"


def access(eid: str = E1, **data) -> bytes:
    fields = {"user_id": 7, "kind": "download", "repo_id": "acme/m", "version": "v1", "ts": TS, **data}
    return encode_event(make_event(FileAccessed(**fields), source="/test", id=eid))


def test_fast_path():
    value = access()
    assert decode_message(value) == ("access", (E1, math.floor(TS * 1000), 7, "download", "acme/m", "v1", "", 0))


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d["data"].update(user_id="7"),  # lax string → pydantic coerces it
        lambda d: d["data"].update(ts=int(TS)),  # an integer ts
        lambda d: d["data"].pop("bytes"),  # a default
        lambda d: d.pop("datacontenttype"),
    ],
)
def test_slow_path_accepts_what_the_shared_model_accepts(mutate):
    doc = json.loads(access())
    mutate(doc)
    kind, (eid, ts_ms, uid, *_) = decode_message(json.dumps(doc, indent=1).encode())
    assert kind == "access" and eid == E1 and uid == 7
    assert ts_ms == math.floor(doc["data"]["ts"] * 1000)


@pytest.mark.parametrize(
    "value",
    [
        b"not json",
        b"[]",
        None,  # a tombstone
        access(kind="download").replace(b'"download"', b'"teleport"'),
        access(user_id=-1),
        access().replace(b'"ts":', b'"extra":1,"ts":'),
        access().replace(b'"specversion":"1.0"', b'"specversion":"0.3"'),
        access(eid="e1"),  # an id that is not a UUID (fast path and shared decoder alike)
        access(eid="e1").replace(b'"ts":', b'"bytes":0, "ts":'),
        access().replace(b"registry.file.accessed.v1", b"registry.file.teleported.v1"),  # outside the contract
    ],
)
def test_invalid_events_raise(value):
    with pytest.raises(InvalidEvent) as err:
        decode_message(value)
    assert isinstance(err.value, PermanentError) and str(err.value)  # dead-lettered, with its reason


def test_user_events():
    reg = make_event(UserRegistered(user_id=3, email="a@b.c", name="A", role="admin"), source="/t")
    kind, row = decode_message(encode_event(reg))
    assert kind == "user" and row[:4] == (3, "a@b.c", "A", "admin")
    rot = make_event(UserKeyRotated(user_id=3, email="a@b.c", key_prefix="k", rotated_ts=1), source="/t")
    assert decode_message(encode_event(rot)) == ("other", None)


def record(topic: str, partition: int, offset: int, value: bytes) -> ConsumerRecord:
    return ConsumerRecord(topic, partition, offset, 0, 0, None, value, None, 0, len(value), ())


def test_batches_are_ordered_by_partition_whatever_the_arrival_order():
    fetches = [
        [record("t", 1, 5, b"b"), record("t", 1, 6, b"a"), record("t", 0, 9, b"a")],
        [record("t", 0, 10, b"bad"), record("t", 0, 11, b"c"), record("s", 2, 3, b"u")],
        [record("t", 1, 7, b"d")],
    ]
    one, two = RawBatch(), RawBatch()
    for fetch in fetches:
        one.add(fetch)
    for fetch in fetches:  # the partitions of a fetch in another order (each partition's stays in offset order)
        two.add(sorted(fetch, key=lambda r: (-r.partition, r.offset)))
    assert [(r.topic, r.partition, r.offset) for r in one.records()] == [
        ("s", 2, 3),
        ("t", 0, 9),
        ("t", 0, 10),
        ("t", 0, 11),
        ("t", 1, 5),
        ("t", 1, 6),
        ("t", 1, 7),
    ]
    assert [r.value for r in one.records()] == [r.value for r in two.records()]
    assert one.ranges() == [["s", 2, 3, 3], ["t", 0, 9, 11], ["t", 1, 5, 7]]
    assert one.count == 7 and new_token() != new_token()


def test_a_batch_splits_into_halves_that_rebuild_it():
    batch = RawBatch()
    batch.add([record("t", 0, o, b"a") for o in range(10, 15)] + [record("t", 1, o, b"b") for o in range(3, 6)])
    batch.add([record("s", 2, 7, b"u")])
    first, second = batch.split()
    assert first.count + second.count == batch.count == 9
    assert first.records() + second.records() == batch.records()
    # Each half is contiguous per partition: its ranges rebuild it, and storing both commits what the whole would.
    assert first.ranges() == [["s", 2, 7, 7], ["t", 0, 10, 12]]
    assert second.ranges() == [["t", 0, 13, 14], ["t", 1, 3, 5]]
    last = RawBatch()
    last.add([record("t", 0, 1, b"x")])
    with pytest.raises(ValueError):
        last.split()


def test_store_failures_are_told_apart():
    from clickhouse_connect.driver.exceptions import DatabaseError, OperationalError

    assert failure_kind(OperationalError("Error HTTPConnectionPool: connection refused")) == "transient"
    assert failure_kind(DatabaseError("Code: 241. DB::Exception: Memory limit exceeded")) == "transient"
    assert failure_kind(DatabaseError("Code: 252. DB::Exception: Too many parts (300). Merges are processing")) == (
        "transient"
    )
    many = "Code: 252. DB::Exception: Too many partitions for single INSERT block (more than 100)."
    assert failure_kind(DatabaseError(many)) == "permanent"
    assert failure_kind(DatabaseError("Code: 60. DB::Exception: Unknown table")) == "permanent"
    assert failure_kind(ValueError("x")) is None  # left to the shared classifier


@pytest.mark.parametrize(
    "since,until,days,edges",
    [
        (0, 86_399, (0, 0), [(0, 0), (86_400, 86_400)]),  # exactly one whole day, no edges
        (100, 86_400 * 2 + 5, (1, 1), [(100, 86_400), (172_800, 172_806)]),
        (100, 200, None, [(100, 201), (0, 0)]),  # inside one day: raw only
    ],
)
def test_window_split(since, until, days, edges):
    p = Window(since, until).params()
    if days is None:
        assert p["d0"] > p["d1"]
    else:
        assert ((p["d0"].toordinal() - 719163), (p["d1"].toordinal() - 719163)) == days
    assert [(p["a0"], p["a1"]), (p["b0"], p["b1"])] == edges
