"""Pure logic of the analytics loader and queries: decoding, batch determinism, windows, the id cache."""

from __future__ import annotations

import json
import math

import pytest
from aiokafka import TopicPartition

from registry_analytics.consumer import InvalidEvent, RawBatch, SeenIds, decode_message, insert_token, prepare
from registry_analytics.queries import Window
from registry_shared.events import FileAccessed, UserKeyRotated, UserRegistered, encode_event, make_event

TS = 1_750_000_000.25


def access(eid: str = "e1", **data) -> bytes:
    fields = {"user_id": 7, "kind": "download", "repo_id": "acme/m", "version": "v1", "ts": TS, **data}
    return encode_event(make_event(FileAccessed(**fields), source="/test", id=eid))


def test_fast_path_keeps_the_message_bytes():
    value = access()
    assert decode_message(value) == ("access", ("e1", math.floor(TS * 1000), value))


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
    kind, (eid, ts_ms, line) = decode_message(json.dumps(doc, indent=1).encode())
    assert kind == "access" and eid == "e1"
    assert ts_ms == math.floor(doc["data"]["ts"] * 1000)
    parsed = json.loads(line)
    assert parsed["id"] == "e1" and parsed["data"]["user_id"] == 7 and b"\n" not in line


@pytest.mark.parametrize(
    "value",
    [
        b"not json",
        b"[]",
        access(kind="download").replace(b'"download"', b'"teleport"'),
        access(user_id=-1),
        access().replace(b'"ts":', b'"extra":1,"ts":'),
        access().replace(b'"specversion":"1.0"', b'"specversion":"0.3"'),
    ],
)
def test_invalid_events_raise(value):
    with pytest.raises(InvalidEvent):
        decode_message(value)


def test_user_events():
    reg = make_event(UserRegistered(user_id=3, email="a@b.c", name="A", role="admin"), source="/t")
    kind, row = decode_message(encode_event(reg))
    assert kind == "user" and row[:4] == (3, "a@b.c", "A", "admin")
    rot = make_event(UserKeyRotated(user_id=3, email="a@b.c", key_prefix="k", rotated_ts=1), source="/t")
    assert decode_message(encode_event(rot)) == ("other", None)


def test_prepare_is_deterministic_and_drops_in_batch_duplicates():
    msgs = {
        TopicPartition("t", 1): [(5, access("b")), (6, access("a"))],
        TopicPartition("t", 0): [(9, access("a")), (10, b"bad"), (11, access("c"))],
    }
    one, two = RawBatch(), RawBatch()
    for tp, recs in msgs.items():
        for off, v in recs:
            one.add(tp, off, v)
    for tp, recs in reversed(list(msgs.items())):  # arrival order differs, the batch does not
        for off, v in recs:
            two.add(tp, off, v)
    p1, p2 = prepare(one), prepare(two)
    assert p1.ids == p2.ids == ["a", "c", "b"]
    assert p1.positions == [("t", 0, 9), ("t", 0, 11), ("t", 1, 5)]
    assert p1.duplicates_in_batch == 1 and [i[:3] for i in p1.invalid] == [("t", 0, 10)]
    assert p1.ranges == [["t", 0, 9, 11], ["t", 1, 5, 6]]
    assert insert_token(p1.ids) == insert_token(p2.ids) != insert_token(["a", "b", "c"])


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


class FakeStore:
    """Holds (hour, id) pairs like access_events would (a unit-test stand-in for the store)."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, str]] = []
        self.loads = 0

    def event_ids_by_hour(self, hours):
        self.loads += 1
        return [(h, e) for h, e in self.rows if h in set(hours)]


def test_seen_ids_cache():
    store = FakeStore()
    store.rows = [(3600, "old")]
    seen = SeenIds(store, max_ids=3)  # type: ignore[arg-type]
    assert seen.existing(["old", "new"], [3_600_000, 3_600_001]) == {"old"}
    store.rows.append((3600, "new"))
    seen.add(["new"], [3_600_001])
    seen.add(["x"], [7_200_000])  # an hour never loaded stays unloaded (never a partial hour)
    assert 2 not in seen.hours
    assert seen.existing(["new", "x"], [3_600_001, 7_200_000]) == {"new"}
    assert store.loads == 2
