"""The api's migrations: `registry-api-migrate` applies the pending ones (also run at api start-up).

Files in db/migrations/ are named NNNN_description.sql and never edited once released; the runner is
the project's one (`registry_shared.migrations`): each file in its own transaction, recorded in
`schema_migrations` (with its checksum), under an advisory lock.
"""

from __future__ import annotations

import sys
from importlib import resources
from importlib.resources.abc import Traversable

from registry_api.settings import get_settings
from registry_shared import migrations

#: The table and lock the api has always used: databases migrated before keep their records.
TABLE = "schema_migrations"
_LOCK_ID = 0x6D6F64656C  # "model"


def _folder() -> Traversable:
    return resources.files("registry_api.db") / "migrations"


def migration_files() -> list[tuple[str, str]]:
    """(name, sql) of every api migration, in order."""
    return migrations.migration_files(_folder())


def apply_migrations(database_url: str) -> list[str]:
    """Apply the api's pending migrations; returns the names applied."""
    return migrations.apply_migrations(database_url, _folder(), table=TABLE, lock_id=_LOCK_ID)


def main() -> None:
    """Entry point of `registry-api-migrate`."""
    names = apply_migrations(get_settings().database_url)
    print("applied: " + (", ".join(names) if names else "nothing (up to date)"))
    sys.exit(0)
