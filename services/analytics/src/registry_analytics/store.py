"""The analytics store: a ClickHouse client (in-process chDB or a server over HTTP) and its schema.

Tables of database `registry` (ClickHouseSettings.clickhouse_database):

- `access_events`: one row per access event, deduplicated by `event_id` before insert (see loader.py),
  partitioned by month, ordered by (hour, user, model) so both the edge-of-window scans of the usage
  queries and the consumer's duplicate look-ups read only the hours they touch.
- `usage_daily`: the daily rollup per (day, user, model), fed by a materialized view of `access_events`.
- `users`: the users dimension (email, name, role), fed by user events, ReplacingMergeTree by user_id.
- `ingest_batches`: one manifest per loaded batch (its Kafka offset ranges and insert token), so that a
  batch interrupted by a crash is replayed identically and ClickHouse's insert deduplication completes it.
- `access_stage_<group>` (Memory): the batch being loaded. The raw message values go in as they are and the
  engine parses and checks them (STAGE_SELECT), finds the event ids the store already holds, and the rows
  go from there into `access_events` (see loader.py); Python only looks at the messages it refuses.

The same SQL runs on chDB and on a ClickHouse server.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import clickhouse_connect
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import ClickHouseError, OperationalError

from registry_shared.settings import ClickHouseSettings

log = logging.getLogger(__name__)

USER_COLUMNS = ("user_id", "email", "name", "role", "updated_at")

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


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


#: The Memory table a loader stages its batch in: row `n` is the batch's n-th message; `ok` = the engine
#: parsed it as a well-formed access event (else Python decodes that message: decode.decode_message).
STAGE_DDL = """CREATE TABLE IF NOT EXISTS {stage} (
    n         UInt32,
    ok        UInt8,
    event_id  String,
    ts        DateTime64(3, 'UTC'),
    user_id   UInt64,
    kind      LowCardinality(String),
    repo_id   String,
    version   String,
    rfilename String,
    bytes     UInt64
) ENGINE = Memory"""

STAGE_COLUMNS = ("n", "ok", "event_id", "ts", "user_id", "kind", "repo_id", "version", "rfilename", "bytes")
ACCESS_COLUMNS = ("event_id", "ts", "user_id", "kind", "repo_id", "version", "rfilename", "bytes")
ACCESS_KINDS = ("download", "manifest", "files_list", "platform_manifest", "model_detail", "changes")
_DATA_KEYS = ("user_id", "kind", "repo_id", "version", "rfilename", "bytes", "ts")


def _quoted(values: Sequence[str]) -> str:
    return ", ".join(f"'{v}'" for v in values)


#: One JSON parse per message (a typed Tuple whose Dynamic members keep each value's JSON type), then the
#: checks of decode.decode_message's fast path, exactly or stricter: a JSON object whose type is
#: registry.file.accessed.v1, specversion "1.0", a string id holding a UUID, a string source, datacontenttype
#: "application/json" (present), data an object of known, distinct keys, user_id an integer in [0, 2^63),
#: a known kind, ts a number in [0, 1e11), bytes absent or an integer in [0, 2^63), repo_id/version/
#: rfilename absent, null or strings. Whatever fails is decoded by Python, which has the last word.
#: {source} yields (n, raw): row n is the batch's n-th message.
STAGE_SELECT = f"""
SELECT n, ok,
    if(ok, id, '') AS event_id,
    fromUnixTimestamp64Milli(if(ok, toInt64(floor(ts_f * 1000)), 0), 'UTC') AS ts,
    if(ok, toUInt64(uid), 0) AS user_id,
    if(ok, kind_s, '') AS kind,
    ifNull(dynamicElement(d['repo_id'], 'String'), '') AS repo_id,
    ifNull(dynamicElement(d['version'], 'String'), '') AS version,
    ifNull(dynamicElement(d['rfilename'], 'String'), '') AS rfilename,
    if(ok, toUInt64(nbytes), 0) AS bytes
FROM (
    SELECT n,
        JSONExtract(raw, 'Tuple(type String, specversion Dynamic, id Dynamic, source Dynamic,
            datacontenttype Dynamic, data Map(String, Dynamic))') AS e,
        e.data AS d,
        mapKeys(d) AS keys,
        dynamicElement(e.id, 'String') AS id,
        dynamicElement(d['user_id'], 'Int64') AS uid,
        dynamicElement(d['kind'], 'String') AS kind_s,
        coalesce(dynamicElement(d['ts'], 'Float64'), toFloat64(dynamicElement(d['ts'], 'Int64'))) AS ts_f,
        if(mapContains(d, 'bytes'), dynamicElement(d['bytes'], 'Int64'), 0) AS nbytes,
        toUInt8(coalesce(
            startsWith(raw, '{{')
            AND e.type = 'registry.file.accessed.v1'
            AND dynamicElement(e.specversion, 'String') = '1.0'
            AND id != ''
            AND isNotNull(toUUIDOrNull(id))
            AND isNotNull(dynamicElement(e.source, 'String'))
            AND dynamicElement(e.datacontenttype, 'String') = 'application/json'
            AND hasAll([{_quoted(_DATA_KEYS)}], keys)
            AND length(arrayDistinct(keys)) = length(keys)
            AND uid >= 0
            AND kind_s IN ({_quoted(ACCESS_KINDS)})
            AND ts_f >= 0 AND ts_f < 1e11
            AND nbytes >= 0
            AND dynamicType(d['repo_id']) IN ('None', 'String')
            AND dynamicType(d['version']) IN ('None', 'String')
            AND dynamicType(d['rfilename']) IN ('None', 'String'),
        0)) AS ok
    FROM {{source}}
)"""  # noqa: S608 (constants only)

#: Of the staged access events: the rows whose event id the store already holds, how many there are, how
#: many distinct event ids are left to store, and the earliest ts (epoch seconds). A duplicate carries the
#: ts of the event it repeats, so the look-up reads only the stored events of the batch's hours (the sorting
#: key) with one of the batch's exact ts (a cheap filter on one column) before it reads any event id: its
#: cost follows the batch, not how many events the hour already holds.
STAGE_DUPLICATES = """
SELECT groupArrayIf(n, dup), count(), uniqExactIf(event_id, NOT dup), toUnixTimestamp(min(ts))
FROM (
    SELECT n, event_id, ts, event_id IN (
        SELECT event_id FROM access_events
        WHERE toStartOfHour(ts) IN (SELECT DISTINCT toStartOfHour(ts) FROM {stage} WHERE ok)
          AND ts IN (SELECT ts FROM {stage} WHERE ok)
    ) AS dup
    FROM {stage}
    WHERE ok
)"""

#: The staged rows into access_events (the rollups follow through their views): the first copy of each
#: event id in batch order, without the rows listed in {skip}. One block, always the same for the same
#: batch, so that a replay under the same insert token completes exactly what an interrupted insert began.
STAGE_INSERT = """
INSERT INTO access_events (event_id, ts, user_id, kind, repo_id, version, rfilename, bytes, ingested_at)
SELECT event_id, ts, user_id, kind, repo_id, version, rfilename, bytes, now64(3, 'UTC')
FROM {stage}
WHERE ok AND NOT has({{skip:Array(UInt32)}}, n)
ORDER BY n
LIMIT 1 BY event_id"""

#: Where the staged lines come from: files the in-process engine reads (each file's name is the number of its
#: first line: the row numbers are exact), or the body of the INSERT sent to a server.
_FILE_SOURCE = (
    "(SELECT toUInt32(toUInt64(splitByChar('.', _file)[1]) + _row_number) AS n, raw"
    " FROM file('{folder}/*.txt', 'LineAsString', 'raw String'))"
)
#: The engine threads that parse a batch, and the batch size from which it uses more than one: a small batch
#: (a live stream) stays on one core, so the loader never takes every core from the services beside it.
STAGE_THREADS = 2
PARALLEL_STAGE_MIN = 20_000
_INPUT_SOURCE = "(SELECT rowNumberInAllBlocks() AS n, raw FROM input('raw String'))"

_ONE_BLOCK = {
    "max_threads": 1,
    "max_block_size": 10_000_000,
    "max_insert_block_size": 10_000_000,
    "min_insert_block_size_rows": 10_000_000,
    "min_insert_block_size_bytes": 1 << 40,
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
        # Before staging, lines went through a Null table whose view parsed them.
        self.client.command("DROP VIEW IF EXISTS access_ingest_mv")
        self.client.command("DROP TABLE IF EXISTS access_ingest")
        existing = {r[0] for r in self.query("SELECT name FROM system.tables WHERE database = currentDatabase()")}
        for name, (ddl, select) in ROLLUPS.items():
            if f"{name}_mv" in existing:  # the view is created last: it exists once the rollup is complete
                continue
            self.client.command(ddl)
            self.client.command(f"TRUNCATE TABLE {name}")
            self.client.command(f"INSERT INTO {name} {select}")
            self.client.command(f"CREATE MATERIALIZED VIEW IF NOT EXISTS {name}_mv TO {name} AS {select}")

    # ------------------------------------------------------------ reads
    def query(
        self, sql: str, params: dict[str, Any] | None = None, settings: dict[str, Any] | None = None
    ) -> list[tuple]:
        """Run a SELECT with server-side parameters (and query settings) and return its rows."""
        return self.client.query(sql, parameters=params or {}, settings=settings).result_rows

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

    # ------------------------------------------------------------ a batch, staged in the engine
    def create_stage(self, stage: str) -> None:
        """Create a loader's staging table if missing (`stage` = stage_name(group))."""
        self.client.command(STAGE_DDL.format(stage=_ident(stage)))

    def stage_values(self, stage: str, values: Sequence[bytes | None]) -> list[int]:
        """Stage a batch of raw message values (row n = values[n]); the rows the engine refused, in order.

        The values travel as LineAsString lines: a value that is empty or holds a line break is staged as "-"
        (so it is refused, and decoded by Python from the original bytes).
        """
        stage = _ident(stage)
        self.client.command(f"TRUNCATE TABLE {stage}")
        if not values:
            return []
        blob = _lines(values)
        threads = STAGE_THREADS if len(values) >= PARALLEL_STAGE_MIN else 1
        sql = f"INSERT INTO {stage} ({', '.join(STAGE_COLUMNS)}) {STAGE_SELECT}"
        if self.settings.clickhouse_mode == "chdb":
            # In-process engine: the lines go through files the engine reads, in parallel (a file's name is
            # the number of its first row), as raw_insert would through one.
            with tempfile.TemporaryDirectory(prefix="analytics-batch-") as folder:
                self._write_chunks(folder, blob, threads)
                source = _FILE_SOURCE.replace("{folder}", folder)  # mkdtemp: no quote in the path
                self.client.command(sql.replace("{source}", source), settings={"max_threads": threads})
        else:
            self.client.command(
                sql.replace("{source}", _INPUT_SOURCE) + " FORMAT LineAsString",
                data=blob,
                settings={"max_threads": threads},
            )
        (refused, staged), *_ = self.query(f"SELECT groupArrayIf(n, NOT ok), count() FROM {stage}")  # noqa: S608
        if staged != len(values):
            raise RuntimeError(f"staged {staged} rows of {len(values)} messages")
        return sorted(int(n) for n in refused)

    @staticmethod
    def _write_chunks(folder: str, blob: bytes, files: int) -> None:
        """Split the lines into `files` files of about the same size, named by their first row."""
        start, row = 0, 0
        for i in range(files, 0, -1):
            end = len(blob) if i == 1 else blob.find(b"\n", start + (len(blob) - start) // i)
            if end < 0:
                end = len(blob)
            with open(os.path.join(folder, f"{row}.txt"), "wb") as f:
                f.write(blob[start:end])
            row += blob.count(b"\n", start, end) + 1
            start = end + 1
            if start > len(blob):
                break

    def stage_rows(self, stage: str, rows: Sequence[tuple[int, Sequence[Any]]]) -> None:
        """Stage access events decoded by Python: (n, (event_id, ts_ms, user_id, kind, repo_id, version,
        rfilename, bytes)), replacing the engine's refusal of row n."""
        if rows:
            data = [[n, 1, eid, _EPOCH + timedelta(milliseconds=ts), *rest] for n, (eid, ts, *rest) in rows]
            self.client.insert(_ident(stage), data, column_names=list(STAGE_COLUMNS))

    def stage_duplicates(self, stage: str) -> tuple[list[int], int, int, int]:
        """(the staged rows whose event id the store holds, the access events staged, the ids left to store,
        the earliest staged ts in epoch seconds)."""
        (dups, staged, kept, earliest), *_ = self.query(
            STAGE_DUPLICATES.format(stage=_ident(stage)), settings={"max_threads": 1}
        )
        return sorted(int(n) for n in dups), int(staged), int(kept), int(earliest)

    def insert_staged(self, stage: str, skip: Sequence[int], token: str) -> None:
        """Insert the staged batch (minus the rows `skip`) as one idempotent block.

        The same `token` on a retry makes ClickHouse drop every part (of access_events and of the rollups'
        views) that the earlier attempt already committed, and write the missing ones.
        """
        self.client.command(
            STAGE_INSERT.format(stage=_ident(stage)),
            parameters={"skip": list(skip)},
            settings={
                "insert_deduplicate": 1,
                "insert_deduplication_token": token,
                "deduplicate_blocks_in_dependent_materialized_views": 1,
                **_ONE_BLOCK,
            },
        )

    def load_values(self, values: Sequence[bytes], token: str, stage: str = "access_stage_adhoc") -> int:
        """Stage and store raw access events the engine accepts, with no duplicate check (tools and tests)."""
        self.create_stage(stage)
        refused = self.stage_values(stage, values)
        if refused:
            raise ValueError(f"the engine refused rows {refused[:10]}")
        self.insert_staged(stage, [], token)
        return len(values)

    def insert_users(self, rows: Sequence[Sequence[Any]]) -> None:
        """Upsert users (USER_COLUMNS order); the latest `updated_at` wins, replays are harmless."""
        if rows:
            self.client.insert("users", list(rows), column_names=list(USER_COLUMNS))


def _lines(values: Sequence[bytes | None]) -> bytes:
    """The values as lines, one per value: "-" for a value that could not be one line of its own."""
    try:
        blob = b"\n".join(values)  # type: ignore[arg-type]
        if blob.count(b"\n") == len(values) - 1 and b"\r" not in blob and b"" not in values:
            return blob
    except TypeError:  # a None (tombstone)
        pass
    return b"\n".join(v if v and b"\n" not in v and b"\r" not in v else b"-" for v in values)


def stage_name(group_id: str) -> str:
    """The staging table of a consumer group."""
    return "access_stage_" + hashlib.blake2b(group_id.encode(), digest_size=6).hexdigest()


def _ident(name: str) -> str:
    if not _IDENT.match(name):
        raise ValueError(f"bad identifier: {name!r}")
    return name


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


# ---------------------------------------------------------------- failures
#: ClickHouse error codes that say the store is busy, short of resources or unreachable, not that the
#: statement or its data is wrong: retried. TOO_MANY_PARTS (252) only when merges lag behind inserts (the
#: same code refuses a block of too many partitions, which retrying never fixes).
TRANSIENT_CODES = frozenset(
    {
        3,  # UNEXPECTED_END_OF_FILE
        159,  # TIMEOUT_EXCEEDED
        173,  # CANNOT_ALLOCATE_MEMORY
        202,  # TOO_MANY_SIMULTANEOUS_QUERIES
        203,  # NO_FREE_CONNECTION
        209,  # SOCKET_TIMEOUT
        210,  # NETWORK_ERROR
        236,  # ABORTED
        241,  # MEMORY_LIMIT_EXCEEDED
        242,  # TABLE_IS_READ_ONLY
        243,  # NOT_ENOUGH_SPACE
        319,  # UNKNOWN_STATUS_OF_INSERT
        394,  # QUERY_WAS_CANCELLED
        425,  # SYSTEM_ERROR
        439,  # CANNOT_SCHEDULE_TASK
        999,  # KEEPER_EXCEPTION
        1000,  # POCO_EXCEPTION
    }
)
_CODE = re.compile(r"\bCode:\s*(\d+)")


def failure_kind(exc: BaseException) -> Literal["transient", "permanent"] | None:
    """A classifier rule (registry_shared.consumer_policy) for the store's errors: transient when the store is
    unreachable or short of something, permanent when it refuses the statement or its data; None otherwise."""
    if isinstance(exc, OperationalError):  # connection refused or lost, HTTP errors of the transport
        return "transient"
    if isinstance(exc, ClickHouseError):
        match = _CODE.search(str(exc))
        code = int(match.group(1)) if match else None
        if code in TRANSIENT_CODES or (code == 252 and "Merges are processing" in str(exc)):
            return "transient"
        return "permanent"
    return None
