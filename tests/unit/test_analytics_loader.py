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


# ---------------------------------------------------------------- the loader's failure policy (a store that fails)
class FailingStore:
    """A stand-in for the analytics store: every value is an access event the engine accepts; inserting a
    batch that holds a value of `refused` fails for good (as ClickHouse refuses a block), and the first
    `unavailable` calls fail as if the store were unreachable."""

    def __init__(self, refused: set[bytes], unavailable: int = 0) -> None:
        self.refused, self.unavailable = refused, unavailable
        self.staged: dict[str, list] = {}
        self.stored: list[bytes] = []
        self.manifests: list = []

    def _maybe_down(self) -> None:
        from clickhouse_connect.driver.exceptions import OperationalError

        if self.unavailable:
            self.unavailable -= 1
            raise OperationalError("HTTPDriver for http://store:8123 received an error: connection refused")

    def stage_values(self, stage, values):
        self._maybe_down()
        self.staged[stage] = list(values)
        return []

    def stage_rows(self, stage, rows):
        pass

    def stage_duplicates(self, stage):
        n = len(self.staged[stage])
        return [], n, n, 2_000_000_000

    def write_manifest(self, group_id, manifest):
        self.manifests.append(manifest)

    def insert_users(self, rows):
        pass

    def insert_staged(self, stage, skip, token):
        from clickhouse_connect.driver.exceptions import DatabaseError

        self._maybe_down()
        if self.refused & set(self.staged[stage]):
            raise DatabaseError("Code: 252. DB::Exception: Too many partitions for single INSERT block (more than 100)")
        self.stored.extend(self.staged[stage])


async def run_loader(store: FailingStore, values: list[bytes]):
    from registry_analytics.loader import AccessLoader
    from registry_analytics.settings import AnalyticsSettings
    from registry_shared.backoff import Backoff
    from registry_shared.health import HealthRegistry

    health = HealthRegistry()
    loader = AccessLoader(store, AnalyticsSettings(), registry=health, backoff=Backoff(initial=0.001, cap=0.005))
    letters: list[tuple[bytes, dict]] = []

    async def sink(topic, value, key, headers):
        letters.append((value, headers))

    loader.policy.sink = sink
    raw = RawBatch()
    raw.add([record("t", 0, o, v) for o, v in enumerate(values)])
    await loader._flush(raw, loader.stages[0], None)
    return loader, letters, health


async def test_a_batch_refused_for_good_is_stored_in_halves_and_only_the_culprit_dead_lettered():
    values = [b"e%d" % i for i in range(37)]
    store = FailingStore(refused={b"e13"})
    loader, letters, health = await run_loader(store, values)
    assert sorted(store.stored) == sorted(v for v in values if v != b"e13")  # everything else, once
    assert [v for v, _ in letters] == [b"e13"]
    headers = letters[0][1]
    assert "Too many partitions" in headers["error"] and headers["source_offset"] == "13"
    assert loader.stats["failed"] == 1 and loader.stats["split"] >= 5  # log2(37) halvings down to one message
    assert health.healthy and health.components()["analytics-loader"].dead_lettered == 1


async def test_an_unreachable_store_is_retried_with_backoff_and_nothing_is_lost():
    values = [b"e%d" % i for i in range(10)]
    store = FailingStore(refused=set(), unavailable=3)
    loader, letters, health = await run_loader(store, values)
    assert store.stored == values and letters == []
    component = health.components()["analytics-loader"]
    assert component.retries == 3 and component.state == "ok" and loader.stats["split"] == 0
