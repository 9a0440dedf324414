"""Ordered SQL migrations: `registry-api-migrate` applies the pending ones (also run at api start-up).

Files in db/migrations/ are named NNNN_description.sql and never edited once released; each runs in
its own transaction, recorded in schema_migrations. A Postgres advisory lock makes concurrent runs
(several api processes starting at once) safe.
"""

from __future__ import annotations

import logging
import sys
from importlib import resources

import psycopg

from registry_api.settings import get_settings

log = logging.getLogger(__name__)
_LOCK_ID = 0x6D6F64656C  # "model"


def migration_files() -> list[tuple[str, str]]:
    """(name, sql) of every migration, in order."""
    folder = resources.files("registry_api.db") / "migrations"
    files = sorted(f.name for f in folder.iterdir() if f.name.endswith(".sql"))
    return [(name, (folder / name).read_text()) for name in files]


def apply_migrations(database_url: str) -> list[str]:
    """Apply pending migrations; returns the names applied."""
    applied: list[str] = []
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("select pg_advisory_lock(%s)", [_LOCK_ID])
        try:
            conn.execute(
                "create table if not exists schema_migrations ("
                " name text primary key, applied_at timestamptz not null default now())"
            )
            done = {r[0] for r in conn.execute("select name from schema_migrations")}
            for name, sql in migration_files():
                if name in done:
                    continue
                with conn.transaction():
                    conn.execute(sql)
                    conn.execute("insert into schema_migrations (name) values (%s)", [name])
                applied.append(name)
                log.info("migration applied", extra={"fields": {"migration": name}})
        finally:
            conn.execute("select pg_advisory_unlock(%s)", [_LOCK_ID])
    return applied


def main() -> None:
    """Entry point of `registry-api-migrate`."""
    names = apply_migrations(get_settings().database_url)
    print("applied: " + (", ".join(names) if names else "nothing (up to date)"))
    sys.exit(0)
