"""The shared migration runner against the stack's real Postgres: order, idempotence, checksums, the lock,
failures, and the api's existing records (the stack's database was migrated before the runner existed)."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from registry_api.db.migrate import apply_migrations as apply_api_migrations
from registry_notifier.app import migrate as notifier_migrate
from registry_shared.migrations import MigrationChanged, MigrationError, apply_migrations, checksum
from registry_shared.settings import PostgresSettings


@pytest.fixture
def schema(pg_settings: PostgresSettings, unique: str) -> str:
    """A schema of this test's own, dropped afterwards."""
    name = f"mig_{unique}"
    yield name
    with psycopg.connect(pg_settings.database_url, autocommit=True) as conn:
        conn.execute(f"drop schema if exists {name} cascade")


def write(folder: Path, name: str, text: str) -> None:
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(text)


def test_applies_in_order_once_and_records_checksums(
    pg_settings: PostgresSettings, schema: str, tmp_path: Path
) -> None:
    url = pg_settings.database_url
    write(tmp_path, "0002_more.sql", f"insert into {schema}.t values (2); insert into {schema}.t values (3);")
    write(tmp_path, "0001_first.sql", f"create table {schema}.t (n int primary key);")
    write(tmp_path, "README.txt", "not a migration")
    assert apply_migrations(url, tmp_path, table="migs", schema=schema) == ["0001_first.sql", "0002_more.sql"]
    assert apply_migrations(url, tmp_path, table="migs", schema=schema) == []
    with psycopg.connect(url) as conn:
        assert [r[0] for r in conn.execute(f"select n from {schema}.t order by n")] == [2, 3]
        rows = dict(conn.execute(f"select name, checksum from {schema}.migs").fetchall())
    assert rows["0001_first.sql"] == checksum(f"create table {schema}.t (n int primary key);")
    write(tmp_path, "0003_next.sql", f"insert into {schema}.t values (4);")
    assert apply_migrations(url, tmp_path, table="migs", schema=schema) == ["0003_next.sql"]


def test_an_edited_released_migration_stops_the_run(pg_settings: PostgresSettings, schema: str, tmp_path: Path) -> None:
    url = pg_settings.database_url
    write(tmp_path, "0001_first.sql", f"create table {schema}.t (n int);")
    apply_migrations(url, tmp_path, table="migs", schema=schema)
    write(tmp_path, "0001_first.sql", f"create table {schema}.t (n bigint);")
    write(tmp_path, "0002_next.sql", f"insert into {schema}.t values (1);")
    with pytest.raises(MigrationChanged, match=r"0001_first\.sql was edited"):
        apply_migrations(url, tmp_path, table="migs", schema=schema)
    with psycopg.connect(url) as conn:  # nothing after the edited one ran
        assert conn.execute(f"select count(*) from {schema}.t").fetchone() == (0,)


def test_records_made_before_checksums_are_kept_and_completed(
    pg_settings: PostgresSettings, schema: str, tmp_path: Path
) -> None:
    """A table as the old runners left it (name, applied_at; no checksum) is used as it is: nothing re-runs."""
    url = pg_settings.database_url
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"create schema {schema}")
        conn.execute(
            f"create table {schema}.migs (name text primary key, applied_at timestamptz not null default now())"
        )
        conn.execute(f"insert into {schema}.migs (name) values ('0001_first.sql')")
    write(tmp_path, "0001_first.sql", "select 1/0;")  # would fail if it ran again
    assert apply_migrations(url, tmp_path, table="migs", schema=schema) == []
    with psycopg.connect(url) as conn:
        assert conn.execute(f"select checksum from {schema}.migs").fetchone() == (checksum("select 1/0;"),)


def test_a_failing_migration_leaves_nothing_and_runs_again_next_time(
    pg_settings: PostgresSettings, schema: str, tmp_path: Path
) -> None:
    url = pg_settings.database_url
    write(tmp_path, "0001_first.sql", f"create table {schema}.t (n int);")
    write(tmp_path, "0002_broken.sql", f"insert into {schema}.t values (1); select * from {schema}.nowhere;")
    with pytest.raises(psycopg.errors.UndefinedTable):
        apply_migrations(url, tmp_path, table="migs", schema=schema)
    with psycopg.connect(url) as conn:
        assert conn.execute(f"select count(*) from {schema}.t").fetchone() == (0,)
        assert [r[0] for r in conn.execute(f"select name from {schema}.migs")] == ["0001_first.sql"]
    write(tmp_path, "0002_broken.sql", f"insert into {schema}.t values (1);")  # never applied: may be fixed
    assert apply_migrations(url, tmp_path, table="migs", schema=schema) == ["0002_broken.sql"]


def test_concurrent_runs_apply_each_migration_once(pg_settings: PostgresSettings, schema: str, tmp_path: Path) -> None:
    url = pg_settings.database_url
    write(tmp_path, "0001_first.sql", f"create table {schema}.t (n int); select pg_sleep(0.3);")
    write(tmp_path, "0002_next.sql", f"insert into {schema}.t values (1);")
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: apply_migrations(url, tmp_path, table="migs", schema=schema), range(4)))
    assert sorted(map(tuple, results)) == [(), (), (), ("0001_first.sql", "0002_next.sql")]
    with psycopg.connect(url) as conn:
        assert conn.execute(f"select count(*) from {schema}.t").fetchone() == (1,)


def test_badly_named_files_are_refused(pg_settings: PostgresSettings, schema: str, tmp_path: Path) -> None:
    write(tmp_path, "first.sql", "select 1;")
    with pytest.raises(MigrationError, match="NNNN_description"):
        apply_migrations(pg_settings.database_url, tmp_path, table="migs", schema=schema)


def test_the_api_database_keeps_its_records(pg_settings: PostgresSettings) -> None:
    """The stack's database, migrated by the api: nothing is applied again, and records as the old runner
    left them (no checksum) are kept and completed."""
    with psycopg.connect(pg_settings.database_url, autocommit=True) as conn:
        conn.execute("update schema_migrations set checksum = null where name = '0001_catalog.sql'")
    assert apply_api_migrations(pg_settings.database_url) == []
    with psycopg.connect(pg_settings.database_url) as conn:
        rows = conn.execute("select name, checksum from schema_migrations order by name").fetchall()
    names = [r[0] for r in rows]
    assert names[:3] == ["0001_catalog.sql", "0002_webhooks.sql", "0003_outbox_delete_on_publish.sql"]
    assert all(r[1] is not None for r in rows)


@pytest.fixture
def fresh_database(pg_settings: PostgresSettings, unique: str) -> Iterator[str]:
    """The URL of a new, empty database on the stack's server, dropped afterwards."""
    name = f"fresh_{unique}"
    with psycopg.connect(pg_settings.database_url, autocommit=True) as conn:
        conn.execute(f"create database {name}")
    parts = urlsplit(pg_settings.database_url)
    yield urlunsplit(parts._replace(path=f"/{name}"))
    with psycopg.connect(pg_settings.database_url, autocommit=True) as conn:
        conn.execute(f"drop database if exists {name} with (force)")


async def test_every_service_migrates_a_fresh_database_whatever_the_start_order(fresh_database: str) -> None:
    """The notifier starting first waits for the api's `webhooks` table, then records its own history; ingest
    keeps to its schema. Run again, nothing is applied."""
    waiting = asyncio.create_task(notifier_migrate(fresh_database))
    await asyncio.sleep(1.5)
    assert not waiting.done()  # no webhooks table yet: it waits (and would retry for as long as it takes)
    api_applied = await asyncio.to_thread(apply_api_migrations, fresh_database)
    assert api_applied[:3] == ["0001_catalog.sql", "0002_webhooks.sql", "0003_outbox_delete_on_publish.sql"]
    assert await asyncio.wait_for(waiting, 30) == ["0001_notifier_tables.sql"]
    ingest_folder = resources.files("registry_ingest") / "migrations"
    ingest_applied = await asyncio.to_thread(
        apply_migrations, fresh_database, ingest_folder, table="schema_migrations", schema="ingest"
    )
    assert ingest_applied == ["0001_ingest_state.sql", "0002_verification_failures.sql", "0003_multipart.sql"]
    with psycopg.connect(fresh_database) as conn:
        tables = {r[0] for r in conn.execute("select table_name from information_schema.tables")}
    assert {"webhooks", "webhook_deliveries", "webhook_attempts", "notifier_emails", "uploads"} <= tables
    assert await notifier_migrate(fresh_database) == []
    assert await asyncio.to_thread(apply_api_migrations, fresh_database) == []
