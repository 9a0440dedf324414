"""HTTP: the role-aware catalog — models, files, downloads, manifests, the change feed."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from registry_api.auth import CatalogReader, Principal
from registry_api.catalog import repository
from registry_api.catalog.schemas import (
    ChangeItem,
    ChangeList,
    DownloadOut,
    FileItem,
    FileList,
    Manifest,
    ManifestFile,
    ModelItem,
    ModelList,
)
from registry_api.catalog.service import download_answer, record_access
from registry_api.catalog.visibility import visibility_params
from registry_api.errors import NotFound
from registry_api.kit.presign import EXPIRES_DEFAULT, EXPIRES_MAX, EXPIRES_MIN
from registry_api.kit.schemas import EPOCH_MAX, ErrorOut, errors
from registry_api.kit.validate import RepoIdPath, check_repo_id

router = APIRouter(tags=["Catalog"])

Expires = Annotated[
    int, Query(ge=EXPIRES_MIN, le=EXPIRES_MAX, description="Lifetime of presigned URLs in seconds (60–86400).")
]
Presign = Annotated[bool, Query(description="Include presigned GET URLs.")]


async def _visible_model(request: Request, principal: Principal, repo_id: str) -> dict:
    check_repo_id(repo_id)
    async with request.app.state.pool.connection() as conn:
        model = await repository.get_model(conn, visibility_params(principal), repo_id)
    if model is None:
        raise NotFound("model not found")
    return model


@router.get(
    "/v1/models",
    response_model=ModelList,
    summary="List models",
    description="Models the caller may see, newest change first; `q` matches repo_id, model_name or author.",
    responses=errors(401, 422),
)
async def list_models(
    request: Request,
    principal: CatalogReader,
    q: Annotated[str | None, Query(max_length=200, description="Substring of repo_id, model_name or author")] = None,
    updated_since: Annotated[
        int | None, Query(ge=0, le=EPOCH_MAX, description="Only models changed after (epoch s)")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> ModelList:
    async with request.app.state.pool.connection() as conn:
        rows = await repository.list_models(conn, visibility_params(principal), q, updated_since, limit, offset)
    return ModelList(items=[ModelItem.from_row(r) for r in rows], limit=limit, offset=offset)


@router.get(
    "/v1/models/{repo_id:path}/files",
    response_model=FileList,
    summary="List a model's files",
    description="The model's verified files (for each name, its newest version's), optionally with presigned URLs.",
    responses=errors(401, 404, 422),
)
async def list_files(
    repo_id: RepoIdPath,
    request: Request,
    principal: CatalogReader,
    presign: Presign = False,
    expires: Expires = EXPIRES_DEFAULT,
) -> FileList:
    model, rows = await _current_files(request, principal, repo_id, presign, expires)
    record_access(request.app, principal, "files_list", repo_id=model["repo_id"])
    return FileList(repo_id=model["repo_id"], items=[FileItem(**r) for r in rows])


@router.get(
    "/v1/models/{repo_id:path}",
    response_model=ModelItem,
    summary="Get a model",
    responses=errors(401, 404, 422),
)
async def get_model(repo_id: RepoIdPath, request: Request, principal: CatalogReader) -> ModelItem:
    return ModelItem.from_row(await _visible_model(request, principal, repo_id))


async def _current_files(
    request: Request, principal: Principal, repo_id: str, presign: bool, expires: int
) -> tuple[dict, list[dict]]:
    """The visible model and its current files, each with `presigned_url` (None unless `presign`)."""
    model = await _visible_model(request, principal, repo_id)
    async with request.app.state.pool.connection() as conn:
        rows = await repository.current_files(conn, model["id"])
    signer = request.app.state.presigner
    for r in rows:
        r["presigned_url"] = signer.get_url(r["object_key"], expires) if presign else None
    return model, rows


DOWNLOAD_PATH = "/v1/files/{file_path:path}/download"


@router.get(
    DOWNLOAD_PATH,
    response_model=DownloadOut,
    summary="Presigned URL for one file",
    description="`file_path` is `{repo_id}/{rfilename}`: repo_id is namespace/name, the rest is the file name "
    "(it may contain '/'). Without `version`, the newest version that has the file is served.\n\n"
    "While the database is away, a download this api process answered recently (same key, same file) is "
    "still answered, and counted once the database is back; any other answers 503 `database unavailable` "
    "with `Retry-After`.",
    responses={
        **errors(401, 404, 422),
        503: {
            "model": ErrorOut,
            "description": "`database unavailable` (the answer is not in this process's cache) or "
            "`access log unavailable` (too many downloads waiting to be counted); retry after `Retry-After` s",
            "headers": {"Retry-After": {"description": "Seconds to wait", "schema": {"type": "integer"}}},
        },
    },
)
async def download(
    file_path: str,
    request: Request,
    principal: CatalogReader,
    expires: Expires = EXPIRES_DEFAULT,
    version: Annotated[str | None, Query(max_length=64, description="A version label, e.g. v1")] = None,
) -> JSONResponse:
    return JSONResponse(await download_answer(request.app, principal, file_path, expires, version))


@router.get(
    "/v1/manifest/{repo_id:path}",
    response_model=Manifest,
    response_model_by_alias=True,
    summary="Manifest of a model",
    description="`hf-model-manifest/v1`: every current file, optionally with presigned URLs.",
    responses=errors(401, 404, 422),
)
async def manifest(
    repo_id: RepoIdPath,
    request: Request,
    principal: CatalogReader,
    presign: Presign = False,
    expires: Expires = EXPIRES_DEFAULT,
) -> Manifest:
    model, rows = await _current_files(request, principal, repo_id, presign, expires)
    files = [ManifestFile(**{k: r[k] for k in ManifestFile.model_fields}) for r in rows]
    record_access(request.app, principal, "manifest", repo_id=model["repo_id"])
    return Manifest(repo_id=model["repo_id"], updated_ts=model["last_update_ts"], files=files)


@router.get(
    "/v1/changes",
    response_model=ChangeList,
    summary="Change feed",
    description="Models the caller may see with `last_update_ts > since`, oldest first. Page by passing the "
    "last item's last_update_ts as the next `since`.",
    responses=errors(401, 422),
)
async def changes(
    request: Request,
    principal: CatalogReader,
    since: Annotated[int, Query(ge=0, le=EPOCH_MAX, description="Epoch seconds (required)")],
    limit: Annotated[int, Query(ge=1, le=2000)] = 500,
) -> ChangeList:
    async with request.app.state.pool.connection() as conn:
        rows = await repository.changes(conn, visibility_params(principal), since, limit)
    return ChangeList(items=[ChangeItem(**r) for r in rows])
