"""Migration 0004 on a database that holds what the rules it adds forbid (written before them): a scratch
database of the stack's Postgres, migrated up to 0003, filled, then migrated to 0004."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql

from registry_api.db.migrate import apply_migrations, migration_files

TARGET = "0004_case_insensitive_ids_and_one_grant.sql"


@pytest.fixture
def scratch_db(pg_settings) -> Iterator[str]:
    name = f"mig_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_settings.database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("create database {}").format(sql.Identifier(name)))
    url = pg_settings.database_url.rsplit("/", 1)[0] + "/" + name
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            for file, text in migration_files():
                if file >= TARGET:
                    break
                conn.execute(text)
            conn.execute("create table schema_migrations (name text primary key, applied_at timestamptz default now())")
            conn.execute(
                "insert into schema_migrations (name) select unnest(%s::text[])",
                [[f for f, _ in migration_files() if f < TARGET]],
            )
        yield url
    finally:
        with psycopg.connect(pg_settings.database_url, autocommit=True) as conn:
            conn.execute(sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name)))


def _users(conn: psycopg.Connection, *roles: str) -> list[int]:
    return [
        conn.execute(
            "insert into users (email, name, role) values (%s, 'x', %s) returning id", [f"{uuid.uuid4().hex}@x.io", r]
        ).fetchone()[0]
        for r in roles
    ]


def _model(conn: psycopg.Connection, repo_id: str, owner: int | None) -> int:
    return conn.execute(
        "insert into models (repo_id, owner_id, model_name) values (%s, %s, 'm') returning id", [repo_id, owner]
    ).fetchone()[0]


def test_namespaces_get_their_first_owner_and_duplicate_grants_become_one(scratch_db):
    with psycopg.connect(scratch_db, autocommit=True) as conn:
        a, b, plat, plat2 = _users(conn, "developer", "developer", "platform", "platform")
        _model(conn, "Acme/first", a)
        _model(conn, "acme/second", b)  # a look-alike namespace of someone else, allowed before 0004
        _model(conn, "imported/model", None)  # the 0.3.0 catalog: no owner, claims nothing
        m = _model(conn, "b-ns/x", b)
        grants = [(plat, 100, 200), (plat, 50, 150), (plat, 300, None), (plat2, 10, 20)]
        for uid, start, end in grants:
            conn.execute(
                "insert into grants (platform_user_id, model_id, permitted_from_ts, permitted_until_ts)"
                " values (%s, %s, %s, %s)",
                [uid, m, start, end],
            )
        conn.execute(
            "insert into grants (platform_user_id, model_id, permitted_from_ts, revoked_ts) values (%s, %s, 0, 1)",
            [plat, m],
        )

    assert apply_migrations(scratch_db) == [f for f, _ in migration_files() if f >= TARGET]

    with psycopg.connect(scratch_db, autocommit=True) as conn:
        owners = dict(conn.execute("select name_key, owner_id from namespaces").fetchall())
        assert owners == {"acme": a, "b-ns": b}
        names = dict(conn.execute("select name_key, name from namespaces").fetchall())
        assert names["acme"] == "Acme"
        live = conn.execute(
            "select platform_user_id, permitted_from_ts, permitted_until_ts from grants"
            " where revoked_ts is null order by platform_user_id"
        ).fetchall()
        # plat's three grants: the widest window of the three; plat2's untouched.
        assert live == [(plat, 50, None), (plat2, 10, 20)]
        assert conn.execute("select count(*) from grants where revoked_ts is not null").fetchone()[0] == 3
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute("insert into models (repo_id, owner_id, model_name) values ('ACME/FIRST', %s, 'm')", [a])
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute(
                "insert into grants (platform_user_id, model_id, permitted_from_ts) values (%s, %s, 0)", [plat2, m]
            )


def test_repo_ids_differing_only_by_case_stop_the_migration_with_their_names(scratch_db):
    with psycopg.connect(scratch_db, autocommit=True) as conn:
        (a,) = _users(conn, "developer")
        _model(conn, "dup/Model", a)
        _model(conn, "dup/model", a)
    with pytest.raises(psycopg.errors.RaiseException, match="dup/Model, dup/model"):
        apply_migrations(scratch_db)
    with psycopg.connect(scratch_db, autocommit=True) as conn:
        assert conn.execute("select count(*) from schema_migrations where name = %s", [TARGET]).fetchone()[0] == 0
