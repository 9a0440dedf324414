"""Load an existing 0.3.0 catalog: `registry-api-import catalog.jsonl`.

Each line is a model as the 0.3.0 API shows it, plus its files:
    {"repo_id": "meta-llama/Llama-3-8B", "model_name": "...", "author": "...", ..., "visibility": "public",
     "files": [{"rfilename": "tokenizer.json", "size": 123, "sha256": "..."}]}
Files get the spec's default object key `hf/{repo_id}/{rfilename}` unless the line names an
`object_key` (the spec's `uploads` override). Imported files are unversioned and served as they are:
the operator vouches for them (their objects must already be in the bucket). Re-importing a line
updates it. Models get no owner; admins grant them to platform users like any other.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime

import psycopg
from pydantic import BaseModel, Field

from registry_api.catalog.cache import CATALOG_CHANNEL
from registry_api.catalog.service import refresh_model_files
from registry_api.kit.validate import check_repo_id, check_rfilename
from registry_api.settings import get_settings
from registry_shared.storage import legacy_object_key


class ImportedFile(BaseModel):
    rfilename: str
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-fA-F]{64}$")
    object_key: str | None = None


class ImportedModel(BaseModel):
    repo_id: str
    model_name: str
    visibility: str = Field("public", pattern="^(public|private)$")
    canonical_url: str | None = None
    author: str | None = None
    pipeline_tag: str | None = None
    license: str | None = None
    parameters: int | None = Field(None, ge=0)
    downloads: int = Field(0, ge=0)
    likes: int = Field(0, ge=0)
    created_at: datetime | None = None
    last_modified: datetime | None = None
    languages: str | None = None
    tags: str | None = None
    files: list[ImportedFile] = []


async def import_model(conn: psycopg.AsyncConnection, m: ImportedModel) -> None:
    """Upsert one model and its files in one transaction."""
    check_repo_id(m.repo_id)
    for f in m.files:
        check_rfilename(f.rfilename)
    fields = m.model_dump(exclude={"files"})
    fields["author"] = fields["author"] or m.repo_id.split("/")[0]
    fields = {k: v for k, v in fields.items() if v is not None}
    cols = ", ".join(fields)
    vals = ", ".join(f"%({k})s" for k in fields)
    sets = ", ".join(f"{k} = excluded.{k}" for k in fields if k != "repo_id")
    async with conn.transaction():
        cur = await conn.execute(
            f"insert into models ({cols}) values ({vals}) on conflict (repo_id) do update set {sets},"  # noqa: S608
            " last_update_ts = greatest(models.last_update_ts, extract(epoch from now())::bigint) returning id",
            fields,
        )
        model_id = (await cur.fetchone())["id"]
        for f in m.files:
            await conn.execute(
                "insert into files (model_id, version_id, rfilename, size, sha256, object_key)"
                " values (%s, null, %s, %s, %s, %s) on conflict (model_id, version_id, rfilename) do update"
                " set size = excluded.size, sha256 = excluded.sha256, object_key = excluded.object_key,"
                " updated_ts = extract(epoch from now())::bigint",
                [
                    model_id,
                    f.rfilename,
                    f.size,
                    f.sha256.lower(),
                    f.object_key or legacy_object_key(m.repo_id, f.rfilename),
                ],
            )
        await refresh_model_files(conn, model_id)
        await conn.execute("select pg_notify(%s, %s)", [CATALOG_CHANNEL, m.repo_id])


async def import_lines(database_url: str, lines: list[str]) -> int:
    """Import JSON lines; returns how many models were imported."""
    from psycopg.rows import dict_row

    n = 0
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True, row_factory=dict_row) as conn:
        for line in lines:
            if line.strip():
                await import_model(conn, ImportedModel.model_validate(json.loads(line)))
                n += 1
    return n


def main() -> None:
    """Entry point of `registry-api-import FILE` (or - for standard input)."""
    import asyncio

    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    source = sys.stdin if sys.argv[1] == "-" else open(sys.argv[1])
    with source:
        n = asyncio.run(import_lines(get_settings().database_url, source.readlines()))
    print(f"imported {n} models")
