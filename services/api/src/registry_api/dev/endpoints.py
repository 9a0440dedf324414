"""HTTP: /v1/dev — developers create models and versions and upload files (presigned PUT)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, status

from registry_api.auth import Developer
from registry_api.catalog.schemas import ModelItem, ModelList
from registry_api.dev import repository, service
from registry_api.dev.schemas import (
    CompleteIn,
    InitiateOut,
    ModelIn,
    ModelUpdate,
    UploadList,
    UploadOut,
    VersionIn,
    VersionList,
    VersionOut,
)
from registry_api.kit.presign import EXPIRES_DEFAULT, EXPIRES_MAX, EXPIRES_MIN
from registry_api.kit.schemas import RowId, errors
from registry_api.kit.validate import (
    MAX_KEY_SEGMENT_BYTES,
    MAX_OBJECT_KEY_BYTES,
    MAX_UPLOAD_KEY_BYTES,
    RepoIdPath,
    VersionPath,
)

router = APIRouter(prefix="/v1/dev", tags=["Developer"])
_DEV_ERRORS = errors(401, 403, 404, 409, 422)


@router.post(
    "/models",
    status_code=status.HTTP_201_CREATED,
    response_model=ModelItem,
    summary="Create a model",
    description="Creates a model owned by the caller. A namespace belongs to the first developer who uses it.",
    responses=_DEV_ERRORS,
)
async def create_model(body: ModelIn, request: Request, principal: Developer) -> ModelItem:
    async with request.app.state.pool.connection() as conn:
        return ModelItem.from_row(await service.create_model(conn, principal, body))


@router.get("/models", response_model=ModelList, summary="Your models", responses=errors(401, 403))
async def my_models(request: Request, principal: Developer) -> ModelList:
    async with request.app.state.pool.connection() as conn:
        rows = await repository.models_of(conn, principal.user_id)
    return ModelList(items=[ModelItem.from_row(r) for r in rows], limit=len(rows), offset=0)


@router.post(
    "/models/{repo_id:path}/versions/{version}/uploads/initiate",
    response_model=InitiateOut,
    summary="Start an upload",
    description="Returns a presigned PUT URL; send the file's bytes there directly, then call `complete`. "
    "The file's object key (`uploads/{repo_id}/{version}/{filename}`) must fit the store: at most "
    f"{MAX_UPLOAD_KEY_BYTES} bytes in UTF-8 (S3's {MAX_OBJECT_KEY_BYTES} less the quarantine prefix) and no path "
    f"segment longer than {MAX_KEY_SEGMENT_BYTES} bytes; else 422.",
    responses=_DEV_ERRORS,
)
async def initiate_upload(
    repo_id: RepoIdPath,
    version: VersionPath,
    request: Request,
    principal: Developer,
    filename: Annotated[str, Query(min_length=1, max_length=1024, description="rfilename, may contain '/'")],
    expires: Annotated[int, Query(ge=EXPIRES_MIN, le=EXPIRES_MAX)] = EXPIRES_DEFAULT,
) -> InitiateOut:
    async with request.app.state.pool.connection() as conn:
        up = await service.initiate_upload(conn, principal, repo_id, version, filename, expires)
    url = request.app.state.presigner.put_url(up["object_key"], expires)
    return InitiateOut(**up, url=url, expires_in=expires)


@router.post(
    "/models/{repo_id:path}/versions/{version}/uploads/complete",
    response_model=UploadOut,
    summary="Finish an upload",
    description="Declares the uploaded file's size and sha256. The file is `pending_verification` until the "
    "ingest service has checked the stored object; then `available`, or `rejected` with a reason.",
    responses=_DEV_ERRORS,
)
async def complete_upload(
    repo_id: RepoIdPath, version: VersionPath, body: CompleteIn, request: Request, principal: Developer
) -> UploadOut:
    async with request.app.state.pool.connection() as conn:
        return UploadOut(**await service.complete_upload(conn, principal, repo_id, version, body))


@router.get(
    "/models/{repo_id:path}/versions/{version}/uploads",
    response_model=UploadList,
    summary="Uploads of a version",
    description="Every upload of the version with its status and, if rejected, the reason.",
    responses=_DEV_ERRORS,
)
async def list_uploads(repo_id: RepoIdPath, version: VersionPath, request: Request, principal: Developer) -> UploadList:
    async with request.app.state.pool.connection() as conn:
        rows = await service.list_uploads(conn, principal, repo_id, version)
    return UploadList(items=[UploadOut(**r) for r in rows])


@router.post(
    "/models/{repo_id:path}/versions",
    status_code=status.HTTP_201_CREATED,
    response_model=VersionOut,
    summary="Create a version",
    responses=_DEV_ERRORS,
)
async def create_version(repo_id: RepoIdPath, body: VersionIn, request: Request, principal: Developer) -> VersionOut:
    async with request.app.state.pool.connection() as conn:
        return VersionOut(**await service.create_version(conn, principal, repo_id, body.version))


@router.get(
    "/models/{repo_id:path}/versions", response_model=VersionList, summary="Versions of a model", responses=_DEV_ERRORS
)
async def list_versions(repo_id: RepoIdPath, request: Request, principal: Developer) -> VersionList:
    async with request.app.state.pool.connection() as conn:
        return VersionList(items=[VersionOut(**v) for v in await service.list_versions(conn, principal, repo_id)])


@router.patch(
    "/models/{repo_id:path}", response_model=ModelItem, summary="Change a model's metadata", responses=_DEV_ERRORS
)
async def update_model(repo_id: RepoIdPath, body: ModelUpdate, request: Request, principal: Developer) -> ModelItem:
    async with request.app.state.pool.connection() as conn:
        return ModelItem.from_row(await service.update_model(conn, principal, repo_id, body))


@router.get("/uploads/{upload_id}", response_model=UploadOut, summary="One upload's status", responses=_DEV_ERRORS)
async def get_upload(upload_id: RowId, request: Request, principal: Developer) -> UploadOut:
    async with request.app.state.pool.connection() as conn:
        return UploadOut(**await service.get_upload(conn, principal, upload_id))
