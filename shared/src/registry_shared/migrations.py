"""The one migration runner of the project: each service applies the SQL files of its own package folder.

    apply_migrations(database_url, resources.files("registry_notifier") / "migrations",
                     table="notifier_schema_migrations")

- Files `NNNN_description.sql` of the folder are applied in name order, each in its own transaction together
  with its row in the service's applied-migrations `table` (`name`, `applied_at`, `checksum`), so a failed
  file leaves nothing half-done and is tried again next time.
- A Postgres advisory lock (`lock_id`, by default derived from the table name) serialises the processes
  of a service starting together; the lock is held on a separate autocommit session for the whole run.
- A released migration is never edited: its sha256 is recorded when applied (or, for rows recorded before
  checksums existed, the first time this runner sees them), and a file whose content no longer matches
  its record stops the run with `MigrationChanged` instead of leaving databases that differ silently.
- `schema` (optional) is created first when the table lives in a schema of the service's own.

Synchronous (psycopg): async services call it through `asyncio.to_thread`.
"""

from __future__ import annotations

import hashlib
import logging
import re
from importlib.resources.abc import Traversable

import psycopg
from psycopg import sql

log = logging.getLogger(__name__)

_NAME = re.compile(r"^\d{4}_[\w.-]+\.sql$")


class MigrationError(Exception):
    """The migrations cannot be applied as they are."""


class MigrationChanged(MigrationError):
    """An applied migration's file was edited since (its checksum no longer matches)."""


def checksum(text: str) -> str:
    """The sha256 (hex) of a migration's text."""
    return hashlib.sha256(text.encode()).hexdigest()


def migration_files(folder: Traversable) -> list[tuple[str, str]]:
    """(name, sql) of every `NNNN_description.sql` in `folder`, in name order (other files are ignored)."""
    names = sorted(f.name for f in folder.iterdir() if f.name.endswith(".sql"))
    bad = [n for n in names if not _NAME.match(n)]
    if bad:
        raise MigrationError(f"migration files must be named NNNN_description.sql: {bad}")
    return [(name, (folder / name).read_text()) for name in names]


def default_lock_id(table: str) -> int:
    """A stable advisory-lock id (signed 64-bit) of an applied-migrations table's name."""
    return int.from_bytes(hashlib.sha256(table.encode()).digest()[:8], "big", signed=True)


def apply_migrations(
    database_url: str,
    folder: Traversable,
    *,
    table: str = "schema_migrations",
    schema: str | None = None,
    lock_id: int | None = None,
) -> list[str]:
    """Apply the pending migrations of `folder`, recorded in `table` (optionally `schema`.`table`);
    returns the names applied. Raises MigrationChanged if an applied file was edited since."""
    files = migration_files(folder)
    ident = sql.Identifier(schema, table) if schema else sql.Identifier(table)
    qualified = f"{schema}.{table}" if schema else table
    lock = default_lock_id(qualified) if lock_id is None else lock_id
    applied: list[str] = []
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("select pg_advisory_lock(%s)", [lock])
        try:
            if schema:
                conn.execute(sql.SQL("create schema if not exists {}").format(sql.Identifier(schema)))
            conn.execute(
                sql.SQL(
                    "create table if not exists {} (name text primary key, applied_at timestamptz not null default now())"
                ).format(ident)
            )
            conn.execute(sql.SQL("alter table {} add column if not exists checksum text").format(ident))
            recorded = {r[0]: r[1] for r in conn.execute(sql.SQL("select name, checksum from {}").format(ident))}
            for name, text in files:
                digest = checksum(text)
                if name in recorded:
                    if recorded[name] is None:  # recorded before checksums: trust the file as it is now
                        conn.execute(
                            sql.SQL("update {} set checksum = %s where name = %s").format(ident), [digest, name]
                        )
                    elif recorded[name] != digest:
                        raise MigrationChanged(
                            f"{qualified}: migration {name} was edited after it was applied"
                            " (add a new migration instead of changing a released one)"
                        )
                    continue
                with conn.transaction():
                    conn.execute(text)  # no parameters: several statements run as one script
                    conn.execute(
                        sql.SQL("insert into {} (name, checksum) values (%s, %s)").format(ident), [name, digest]
                    )
                applied.append(name)
                log.info("migration applied", extra={"fields": {"migration": name, "table": qualified}})
        finally:
            conn.execute("select pg_advisory_unlock(%s)", [lock])
    return applied
