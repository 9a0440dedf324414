"""The analytics store: a ClickHouse client (in-process chDB or a server over HTTP) and its schema.

Tables of database `registry` (ClickHouseSettings.clickhouse_database):

- `access_events`: one row per access event, deduplicated by `event_id` before insert (see consumer.py),
  partitioned by month, ordered by (hour, user, model) so both the edge-of-window scans of the usage
  queries and the consumer's duplicate look-ups read only the hours they touch.
- `usage_daily`: the daily rollup per (day, user, model), fed by a materialized view of `access_events`.
- `users`: the users dimension (email, name, role), fed by user events, ReplacingMergeTree by user_id.
- `ingest_batches`: one manifest per loaded batch (its Kafka offset ranges and insert token), so that a
  batch interrupted by a crash is replayed identically and ClickHouse's insert deduplication completes it.

The same SQL runs on chDB and on a ClickHouse server.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import clickhouse_connect
from clickhouse_connect.driver.client import Client

from registry_shared.settings import ClickHouseSettings

log = logging.getLogger(__name__)

USER_COLUMNS = ("user_id", "email", "name", "role", "updated_at")

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


#: The DDL of the analytics store, idempotent, in order; run in the analytics database (see Store).
SCHEMA: tuple[str, ...] = (
    """CREATE TABLE IF NOT EXISTS access_events (
    event_id    String,
    ts          DateTime64(3, 'UTC'),
    user_id     UInt64,
    kind        LowCardinality(String),
    repo_id     String,
    version     String,
    rfilename   String,
    bytes       UInt64,
    ingested_at DateTime64(3, 'UTC')
) ENGINE = MergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (toStartOfHour(ts), user_id, repo_id)
SETTINGS non_replicated_deduplication_window = 10000, index_granularity = 2048""",
    # The loader hands ClickHouse the CloudEvents JSON of the events it keeps (checked and deduplicated in
    # Python); this view parses them into rows, off the Python thread. Null: the lines themselves are not kept.
    """CREATE TABLE IF NOT EXISTS access_ingest (raw String) ENGINE = Null""",
    """CREATE MATERIALIZED VIEW IF NOT EXISTS access_ingest_mv TO access_events AS
WITH JSONExtract(raw, 'Tuple(id String, data Tuple(user_id UInt64, kind String, repo_id Nullable(String),
    version Nullable(String), rfilename Nullable(String), bytes UInt64, ts Float64))') AS e
SELECT
    e.id AS event_id,
    fromUnixTimestamp64Milli(toInt64(floor(e.data.ts * 1000)), 'UTC') AS ts,
    e.data.user_id AS user_id,
    e.data.kind AS kind,
    ifNull(e.data.repo_id, '') AS repo_id,
    ifNull(e.data.version, '') AS version,
    ifNull(e.data.rfilename, '') AS rfilename,
    e.data.bytes AS bytes,
    now64(3, 'UTC') AS ingested_at
FROM access_ingest""",
    """CREATE TABLE IF NOT EXISTS usage_daily (
    day        Date,
    user_id    UInt64,
    repo_id    String,
    events     SimpleAggregateFunction(sum, UInt64),
    manifests  SimpleAggregateFunction(sum, UInt64),
    files_list SimpleAggregateFunction(sum, UInt64),
    downloads  SimpleAggregateFunction(sum, UInt64),
    bytes      SimpleAggregateFunction(sum, UInt64),
    last_ts    SimpleAggregateFunction(max, DateTime64(3, 'UTC'))
) ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(day)
ORDER BY (user_id, day, repo_id)
SETTINGS non_replicated_deduplication_window = 10000, index_granularity = 1024""",
    """CREATE MATERIALIZED VIEW IF NOT EXISTS usage_daily_mv TO usage_daily AS
SELECT
    toDate(ts) AS day,
    user_id,
    repo_id,
    toUInt64(count()) AS events,
    toUInt64(countIf(kind IN ('manifest', 'platform_manifest'))) AS manifests,
    toUInt64(countIf(kind = 'files_list')) AS files_list,
    toUInt64(countIf(kind = 'download')) AS downloads,
    toUInt64(sum(bytes)) AS bytes,
    max(ts) AS last_ts
FROM access_events
GROUP BY day, user_id, repo_id""",
    """CREATE TABLE IF NOT EXISTS users (
    user_id    UInt64,
    email      String,
    name       String,
    role       LowCardinality(String),
    updated_at DateTime64(3, 'UTC')
) ENGINE = ReplacingMergeTree(updated_at)
ORDER BY user_id""",
    """CREATE TABLE IF NOT EXISTS ingest_batches (
    group_id   String,
    seq        UInt64,
    token      String,
    ranges     String,
    skipped    String,
    rows       UInt64,
    created_at DateTime64(3, 'UTC')
) ENGINE = MergeTree
ORDER BY (group_id, seq)
TTL toDateTime(created_at) + INTERVAL 30 DAY""",
)


_COUNTS = """
    toUInt64(count()) AS events,
    toUInt64(countIf(kind IN ('manifest', 'platform_manifest'))) AS manifests,
    toUInt64(countIf(kind = 'files_list')) AS files_list,
    toUInt64(countIf(kind = 'download')) AS downloads,
    max(ts) AS last_ts"""

_COUNT_COLUMNS = """
    events     SimpleAggregateFunction(sum, UInt64),
    manifests  SimpleAggregateFunction(sum, UInt64),
    files_list SimpleAggregateFunction(sum, UInt64),
    downloads  SimpleAggregateFunction(sum, UInt64),
    last_ts    SimpleAggregateFunction(max, DateTime64(3, 'UTC'))"""

#: Narrower rollups for the admin overview and the catalog's counters: per user and per model, by UTC day
#: and by hour (the hourly ones cover the partial days at a window's edges). name -> (key columns, DDL, SELECT).
ROLLUPS: dict[str, tuple[str, str]] = {
    name: (
        f"""CREATE TABLE IF NOT EXISTS {name} (
    {period} {period_type},
    {key} {key_type},{_COUNT_COLUMNS}
) ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM({period})
ORDER BY ({period}, {key})
SETTINGS non_replicated_deduplication_window = 10000, index_granularity = 1024""",
        f"SELECT {period_expr} AS {period}, {key},{_COUNTS}\nFROM access_events\nGROUP BY {period}, {key}",
    )
    for name, period, period_type, period_expr, key, key_type in (
        ("usage_daily_users", "day", "Date", "toDate(ts)", "user_id", "UInt64"),
        ("usage_hourly_users", "hour", "DateTime('UTC')", "toStartOfHour(ts)", "user_id", "UInt64"),
        ("usage_daily_models", "day", "Date", "toDate(ts)", "repo_id", "String"),
        ("usage_hourly_models", "hour", "DateTime('UTC')", "toStartOfHour(ts)", "repo_id", "String"),
    )
}


@dataclass(frozen=True)
class Manifest:
    """What a batch was made of: enough to rebuild it identically after a crash."""

    seq: int
    token: str
    #: [[topic, partition, first_offset, last_offset], ...]
    ranges: list[list[Any]]
    #: [[topic, partition, offset], ...] messages left out because the store already held their event id
    skipped: list[list[Any]]
    rows: int


class Store:
    """A ClickHouse client bound to the analytics database (created if missing).

    A client serializes its calls: the loader and the query API each open their own Store, so a long
    insert never holds back a usage query (on chDB both handles share the one in-process engine).
    """

    def __init__(self, settings: ClickHouseSettings | None = None) -> None:
        self.settings = settings or ClickHouseSettings()
        self.db = self.settings.clickhouse_database
        self.client = connect(self.settings, self.db)

    def close(self) -> None:
        """Close the client (chDB: release the engine handle)."""
        self.client.close()

    def migrate(self) -> None:
        """Create every table and view that is missing; a rollup added later is filled from access_events.

        Run before the loader starts (nothing inserts while a new rollup is backfilled).
        """
        for stmt in SCHEMA:
            self.client.command(stmt)
        existing = {r[0] for r in self.query("SELECT name FROM system.tables WHERE database = currentDatabase()")}
        for name, (ddl, select) in ROLLUPS.items():
            if f"{name}_mv" in existing:  # the view is created last: it exists once the rollup is complete
                continue
            self.client.command(ddl)
            self.client.command(f"TRUNCATE TABLE {name}")
            self.client.command(f"INSERT INTO {name} {select}")
            self.client.command(f"CREATE MATERIALIZED VIEW IF NOT EXISTS {name}_mv TO {name} AS {select}")

    # ------------------------------------------------------------ reads
    def query(self, sql: str, params: dict[str, Any] | None = None) -> list[tuple]:
        """Run a SELECT with server-side parameters and return its rows."""
        return self.client.query(sql, parameters=params or {}).result_rows

    def event_ids_by_hour(self, hours: Sequence[int]) -> list[tuple[int, str]]:
        """(hour, event_id) of every stored event whose ts lies in one of the given hours (epoch seconds)."""
        if not hours:
            return []
        return self.query(
            "SELECT toUInt32(toStartOfHour(ts)), event_id FROM access_events"
            " WHERE toStartOfHour(ts) IN (SELECT toDateTime(arrayJoin({hours:Array(UInt32)}), 'UTC'))",
            {"hours": list(hours)},
        )

    def last_manifest(self, group_id: str) -> Manifest | None:
        """The most recent batch manifest of a consumer group, if any."""
        rows = self.query(
            "SELECT seq, token, ranges, skipped, rows FROM ingest_batches"
            " WHERE group_id = {g:String} ORDER BY seq DESC LIMIT 1",
            {"g": group_id},
        )
        if not rows:
            return None
        seq, token, ranges, skipped, n = rows[0]
        return Manifest(int(seq), token, json.loads(ranges), json.loads(skipped), int(n))

    # ------------------------------------------------------------ writes
    def write_manifest(self, group_id: str, manifest: Manifest) -> None:
        """Record a batch's manifest before its rows are inserted."""
        self.client.insert(
            "ingest_batches",
            [
                [
                    group_id,
                    manifest.seq,
                    manifest.token,
                    json.dumps(manifest.ranges),
                    json.dumps(manifest.skipped),
                    manifest.rows,
                    int(time.time() * 1000),
                ]
            ],
            column_names=["group_id", "seq", "token", "ranges", "skipped", "rows", "created_at"],
        )

    def insert_access_lines(self, lines: Sequence[bytes], token: str) -> None:
        """Insert access events given as CloudEvents JSON lines (one event a line) as one idempotent block.

        The same `token` on a retry makes ClickHouse drop every part (of access_events and of the
        rollup's view) that the earlier attempt already committed, and write the missing ones.
        """
        if not lines:
            return
        self.client.raw_insert(
            "access_ingest",
            ["raw"],
            b"\n".join(lines),
            fmt="LineAsString",
            settings={
                "insert_deduplicate": 1,
                "insert_deduplication_token": token,
                "deduplicate_blocks_in_dependent_materialized_views": 1,
                "max_insert_block_size": 10_000_000,
                "min_insert_block_size_rows": 0,
                "min_insert_block_size_bytes": 0,
            },
        )

    def insert_users(self, rows: Sequence[Sequence[Any]]) -> None:
        """Upsert users (USER_COLUMNS order); the latest `updated_at` wins, replays are harmless."""
        if rows:
            self.client.insert("users", list(rows), column_names=list(USER_COLUMNS))


def connect(settings: ClickHouseSettings, database: str | None = None) -> Client:
    """A clickhouse-connect client: chDB in-process (`chdb_path`) or a ClickHouse server over HTTP.

    With `database`, the database is created if missing and becomes the client's default.
    """
    if settings.clickhouse_mode == "chdb":
        client = clickhouse_connect.get_client(interface="chdb", path=settings.chdb_path)
    else:
        client = clickhouse_connect.get_client(
            host=settings.clickhouse_host,
            port=settings.clickhouse_port,
            username=settings.clickhouse_user,
            password=settings.clickhouse_password.get_secret_value(),
            # No HTTP session: the query API calls one client from several threads at once.
            autogenerate_session_id=False,
        )
    if database:
        if not _IDENT.match(database):
            raise ValueError(f"bad database name: {database!r}")
        client.command(f"CREATE DATABASE IF NOT EXISTS {database}")
        client.database = database
    return client
