"""The analytics store's DDL, idempotent inserts and usage queries on the in-process ClickHouse engine (chDB)."""

from __future__ import annotations

import json
import random
import uuid
from datetime import UTC, datetime

import pytest
from test_analytics import MODELS, USERS, Access, expected, make_events  # the same reference numbers

from registry_analytics import queries
from registry_analytics.consumer import SeenIds, decode_message, insert_token
from registry_analytics.store import Store
from registry_shared.events import FileAccessed, encode_event, make_event
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


def lines_of(events: list[Access]) -> tuple[list[str], list[int], list[bytes]]:
    ids, ts, lines = [], [], []
    for e in events:
        kind, row = decode_message(e.encoded()[1])
        assert kind == "access"
        ids.append(row[0])
        ts.append(row[1])
        lines.append(row[2])
    return ids, ts, lines


def test_schema(store):
    tables = dict(store.query("SELECT name, engine FROM system.tables WHERE database = 'registry'"))
    assert tables == {
        "access_events": "MergeTree",
        "access_ingest": "Null",
        "access_ingest_mv": "MaterializedView",
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


def test_lines_are_parsed_like_the_loader_decodes_them(store):
    eid = str(uuid.uuid4())
    # The slow path (pydantic): an integer ts, a null repo, JSON with newlines: re-encoded canonically.
    event = make_event(FileAccessed(user_id=9001, kind="changes", ts=START), source="/test", id=eid)
    pretty = json.dumps(json.loads(encode_event(event)), indent=2).encode()
    kind, (rid, ts_ms, line) = decode_message(pretty)
    assert (kind, rid, ts_ms) == ("access", eid, int(START * 1000)) and b"\n" not in line
    fast = Access(str(uuid.uuid4()), 9001, "download", "acme/x", START + 1.2345)
    fast_value = fast.encoded()[1]
    kind, (fid, fts, fline) = decode_message(fast_value)
    assert fline == fast_value and fts == int(START * 1000) + 1234
    store.insert_access_lines([line, fline], insert_token([rid, fid]))
    rows = store.query(
        "SELECT event_id, toUnixTimestamp64Milli(ts), user_id, kind, repo_id, version FROM access_events"
        " WHERE user_id = 9001 ORDER BY ts"
    )
    assert rows == [(eid, int(START * 1000), 9001, "changes", "", ""), (fid, fts, 9001, "download", "acme/x", "v1")]


def test_insert_token_makes_retries_idempotent_in_table_and_rollup(store):
    events = make_events(random.Random(3), 500, [201, 202], MODELS, START, 3)
    ids, _, lines = lines_of(events)
    token = insert_token(ids)
    for _ in range(3):  # a retried batch, as after a crash
        store.insert_access_lines(lines, token)
    raw = store.query("SELECT count() FROM access_events WHERE user_id IN (201, 202)")[0][0]
    assert raw == 500
    for rollup in ("usage_daily", "usage_daily_users", "usage_hourly_users"):
        assert store.query(f"SELECT sum(events) FROM {rollup} WHERE user_id IN (201, 202)")[0][0] == 500, rollup


def test_usage_queries_match_the_reference(store):
    events = make_events(random.Random(4), 800, [*USERS, 104], MODELS, START + 7 * DAY, 4)
    ids, _, lines = lines_of(events)
    store.insert_access_lines(lines, insert_token(ids))
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


def test_a_rollup_added_later_is_backfilled(store):
    before = store.query("SELECT repo_id, sum(downloads) FROM usage_daily_models GROUP BY repo_id ORDER BY repo_id")
    store.client.command("DROP VIEW usage_daily_models_mv")
    store.client.command("DROP TABLE usage_daily_models")
    store.migrate()
    after = store.query("SELECT repo_id, sum(downloads) FROM usage_daily_models GROUP BY repo_id ORDER BY repo_id")
    assert after == before and after


def test_seen_ids_knows_what_the_store_holds(store):
    events = make_events(random.Random(5), 200, [301], MODELS, START + 20 * DAY, 1)
    ids, ts, lines = lines_of(events)
    seen = SeenIds(store, max_ids=150)
    assert seen.existing(ids, ts) == set()
    store.insert_access_lines(lines[:100], insert_token(ids[:100]))
    seen.add(ids[:100], ts[:100])
    assert seen.existing(ids, ts) == set(ids[:100])
    fresh = SeenIds(store)  # after a restart: loaded from the store
    assert fresh.existing(ids, ts) == set(ids[:100])
    assert seen.size <= 150 or len(seen.hours) == 1
