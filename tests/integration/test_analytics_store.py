"""The analytics store's DDL, idempotent inserts and usage queries on the in-process ClickHouse engine (chDB)."""

from __future__ import annotations

import json
import random
import uuid
from datetime import UTC, datetime

import pytest
from test_analytics import MODELS, USERS, Access, expected, make_events  # the same reference numbers

from registry_analytics import queries
from registry_analytics.batching import new_token
from registry_analytics.decode import InvalidEvent, decode_message
from registry_analytics.store import Store, stage_name
from registry_shared.settings import ClickHouseSettings

START = datetime(2025, 6, 2, tzinfo=UTC).timestamp()
DAY = 86_400


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    st = Store(ClickHouseSettings(clickhouse_mode="chdb", chdb_path=str(tmp_path_factory.mktemp("store") / "chdb")))
    st.migrate()
    st.migrate()  # idempotent
    yield st
    st.close()


STAGE = stage_name("test")


def values_of(events: list[Access]) -> list[bytes]:
    return [e.encoded()[1] for e in events]


def test_schema(store):
    store.create_stage(STAGE)
    tables = dict(store.query("SELECT name, engine FROM system.tables WHERE database = 'registry'"))
    assert tables == {
        "access_events": "MergeTree",
        STAGE: "Memory",
        "usage_daily": "AggregatingMergeTree",
        "usage_daily_mv": "MaterializedView",
        "users": "ReplacingMergeTree",
        "ingest_batches": "MergeTree",
        **{f"usage_{p}_{k}": "AggregatingMergeTree" for p in ("daily", "hourly") for k in ("users", "models")},
        **{f"usage_{p}_{k}_mv": "MaterializedView" for p in ("daily", "hourly") for k in ("users", "models")},
    }
    (part, sort), *_ = store.query(
        "SELECT partition_key, sorting_key FROM system.tables WHERE database = 'registry' AND name = 'access_events'"
    )
    assert part == "toYYYYMM(ts)" and sort.startswith("toStartOfHour(ts), user_id")


def _variants() -> list[bytes]:
    """Well-formed access events and every way of bending one: the engine must read exactly what Python reads."""
    base = json.loads(Access("v", 9001, "download", "acme/x", START + 1.2345).encoded()[1])

    def doc(**top):
        d = json.loads(json.dumps(base))
        data = top.pop("data", {})
        d.update(top)
        for k, v in data.items():
            if v is ...:
                d["data"].pop(k, None)
            else:
                d["data"][k] = v
        return d

    docs = [
        doc(),
        doc(data={"ts": int(START)}),
        doc(data={"ts": 0}),
        doc(data={"ts": -0.0}),
        doc(data={"ts": 99_999_999_999.999}),
        doc(data={"ts": 1e11}),
        doc(data={"ts": -1}),
        doc(data={"ts": "1750000000"}),
        doc(data={"ts": True}),
        doc(data={"user_id": "7"}),
        doc(data={"user_id": 7.0}),
        doc(data={"user_id": -1}),
        doc(data={"user_id": 2**63 - 1}),
        doc(data={"user_id": 2**63}),
        doc(data={"user_id": True}),
        doc(data={"user_id": None}),
        doc(data={"user_id": ...}),
        doc(data={"kind": "teleport"}),
        doc(data={"kind": 1}),
        doc(data={"kind": ...}),
        doc(data={"bytes": ...}),
        doc(data={"bytes": None}),
        doc(data={"bytes": 1.5}),
        doc(data={"bytes": -5}),
        doc(data={"bytes": 2**63}),
        doc(data={"repo_id": None, "version": ..., "rfilename": "a b/ü.bin"}),
        doc(data={"repo_id": 5}),
        doc(data={"repo_id": "2025-01-01"}),  # a string that looks like a date stays a string
        doc(data={"version": {"a": 1}}),
        doc(data={"extra": 1}),
        doc(id=""),
        doc(id=7),
        doc(id="2025-06-02"),
        doc(id='quo"te'),
        doc(id="not-a-uuid"),
        doc(id="{6f1c2e1a-0b1c-4d2e-8f30-a1b2c3d4e5f6}"),  # a UUID Python reads, in a form the engine refuses
        doc(source=5),
        doc(specversion=1.0),
        doc(specversion="0.3"),
        doc(type="registry.user.registered.v1"),
        doc(datacontenttype=None),
        doc(datacontenttype="text/plain"),
    ]
    nodct = doc()
    del nodct["datacontenttype"]
    docs.append(nodct)
    values = []
    for i, d in enumerate(docs):
        if d.get("id") == "v":  # a UUID of its own (ids are UUIDs); the other ids are bent on purpose
            d["id"] = str(uuid.uuid5(uuid.NAMESPACE_URL, f"variant-{i}"))
        values.append(json.dumps(d, separators=(",", ":"), ensure_ascii=False).encode())
    canonical = values[0]
    values += [
        json.dumps(json.loads(canonical), indent=2).encode(),  # line breaks
        b" " + canonical,  # leading white space
        canonical.replace(b"}}", b"}}\r"),
        canonical.replace(b'"data":{', b'"data":{"user_id":8,'),  # a repeated key
        canonical.replace(b'"data":{', b'"data":[').replace(b"}}", b"]}"),
        canonical[:-1],
        canonical + b" x",
        b"[" + canonical + b"]",
        b'"just a string"',
        b"",
        b"not json",
        canonical.replace(b"acme/x", b"acme/\\u00e9\\ud800"),  # a lone surrogate
        None,  # a tombstone
        canonical.replace(json.loads(canonical)["id"].encode(), str(uuid.uuid4()).encode()),
        b"",  # an empty value, last
    ]
    return values


def test_the_engine_reads_what_python_reads(store):
    values = _variants()
    store.create_stage(STAGE)
    refused = set(store.stage_values(STAGE, values))
    staged = {
        n: row
        for n, *row in store.query(
            f"SELECT n, event_id, toUnixTimestamp64Milli(ts), user_id, kind, repo_id, version, rfilename, bytes"
            f" FROM {STAGE} WHERE ok"
        )
    }
    assert set(staged) | refused == set(range(len(values))) and not set(staged) & refused
    assert len(values) - 2 in staged  # after a tombstone
    for n, value in enumerate(values):
        try:
            kind, row = decode_message(value)
        except InvalidEvent:
            kind, row = "invalid", None
        if n in staged:  # what the engine accepts, Python accepts as the same row
            assert (kind, tuple(staged[n])) == ("access", row), value
    assert 0 in staged and 1 in staged and 25 in staged and 27 in staged  # ints, nulls, date-like strings

    # Python decides whatever the engine refuses; a few of those are valid events (the slow path).
    def python(value: bytes) -> str:
        try:
            return decode_message(value)[0]
        except InvalidEvent:
            return "invalid"

    assert {"access", "invalid"} <= {python(values[n]) for n in refused}


def test_staged_batches_dedupe_and_replay_idempotently(store):
    events = make_events(random.Random(3), 500, [201, 202], MODELS, START, 3)
    values = values_of(events)
    store.create_stage(STAGE)
    # A batch with copies of its own events: the first copy of each id is kept.
    assert store.stage_values(STAGE, values + values[:50]) == []
    dups, staged, kept, _ = store.stage_duplicates(STAGE)
    assert (dups, staged, kept) == ([], 550, 500)
    token = new_token()
    for _ in range(3):  # a retried batch, as after a crash: the same rows under the same token
        store.insert_staged(STAGE, [], token)
    raw = store.query("SELECT count() FROM access_events WHERE user_id IN (201, 202)")[0][0]
    assert raw == 500
    for rollup in ("usage_daily", "usage_daily_users", "usage_hourly_users"):
        assert store.query(f"SELECT sum(events) FROM {rollup} WHERE user_id IN (201, 202)")[0][0] == 500, rollup
    # The same events again, plus new ones: the stored ones are found, and `skip` leaves them out.
    more = make_events(random.Random(4), 100, [201], MODELS, START, 3)
    batch = values[:200] + values_of(more)
    assert store.stage_values(STAGE, batch) == []
    dups, staged, kept, _ = store.stage_duplicates(STAGE)
    assert dups == list(range(200)) and (staged, kept) == (300, 100)
    store.insert_staged(STAGE, dups, new_token())
    assert store.query("SELECT count(), uniqExact(event_id) FROM access_events WHERE user_id IN (201, 202)")[0] == (
        600,
        600,
    )


def test_usage_queries_match_the_reference(store):
    events = make_events(random.Random(4), 800, [*USERS, 104], MODELS, START + 7 * DAY, 4)
    store.load_values(values_of(events), new_token())
    store.insert_users([(uid, email, name, "platform", 1000) for uid, (email, name) in USERS.items()])
    # A later registration of user 101 wins (ReplacingMergeTree by updated_at).
    store.insert_users([(101, "ada@new.example.com", "Ada L.", "platform", 2000)])
    names = {**USERS, 101: ("ada@new.example.com", "Ada L.")}
    base = int(START) + 7 * DAY
    for since, until in [(base, base + 4 * DAY), (base + 3_000, base + 2 * DAY + 77), (base + 500, base + 900)]:
        for uid in (101, 102, 104):
            got = queries.user_usage(store, uid, queries.Window(since, until), 20)
            assert got == expected(events, since, until, users={uid}), (uid, since, until)
        got = queries.admin_usage(store, queries.Window(since, until), 50, 100)
        assert got == expected(events, since, until, names=names, top_models_limit=100)
        got = queries.admin_usage(store, queries.Window(since, until), 50, 100, filter_email="ADA@new.example.com")
        assert got == expected(events, since, until, users={101}, names=names, top_models_limit=100)


def test_the_overview_keeps_closed_periods_until_a_late_event_is_stored(store):
    events = make_events(random.Random(5), 600, list(USERS), MODELS, START + 20 * DAY, 3)
    store.load_values(values_of(events), new_token())
    # The names as registered at first (newer than the rename an earlier test of this module stored).
    store.insert_users([(uid, email, name, "platform", 3000) for uid, (email, name) in USERS.items()])
    closed = queries.ClosedPeriods()
    since, until = int(START) + 20 * DAY + 5_000, int(START) + 23 * DAY + 777  # whole days, hours and seconds
    window = queries.Window(since, until)
    first = queries.admin_usage(store, window, 50, 100, closed=closed)
    assert first == expected(events, since, until, names=USERS, top_models_limit=100)
    assert queries.admin_usage(store, window, 50, 100, closed=closed) == first  # from what was kept
    assert queries.admin_usage(store, window, 50, 100) == first  # nothing kept: one statement, same answer

    # A late event for a whole day of the window: what was kept no longer holds until the loader says so.
    late = Access(str(uuid.uuid4()), 101, "download", "acme/alpha", START + 21 * DAY + 10)
    store.load_values(values_of([late]), new_token())
    assert queries.admin_usage(store, window, 50, 100, closed=closed) == first
    closed.invalidate()
    now = queries.admin_usage(store, window, 50, 100, closed=closed)
    assert now == expected([*events, late], since, until, names=USERS, top_models_limit=100)
    assert now["totals"]["downloads"] == first["totals"]["downloads"] + 1

    # A computation that began before an invalidation is not kept.
    generation = closed.generation
    closed.invalidate()
    closed.put(("k",), generation, "stale")
    assert closed.get(("k",)) is None


def test_a_rollup_added_later_is_backfilled(store):
    before = store.query("SELECT repo_id, sum(downloads) FROM usage_daily_models GROUP BY repo_id ORDER BY repo_id")
    store.client.command("DROP VIEW usage_daily_models_mv")
    store.client.command("DROP TABLE usage_daily_models")
    store.migrate()
    after = store.query("SELECT repo_id, sum(downloads) FROM usage_daily_models GROUP BY repo_id ORDER BY repo_id")
    assert after == before and after
