"""HTTP: /v1/dev — multipart uploads of large files through presigned part URLs."""

from __future__ import annotations

from fastapi import APIRouter, Request, status

from registry_api.auth import Developer
from registry_api.kit.schemas import RowId, errors
from registry_api.kit.validate import RepoIdPath, VersionPath
from registry_api.uploads import service
from registry_api.uploads.schemas import MultipartCompleteIn, MultipartIn, MultipartOut, PartsOut, SignIn, SignOut
from registry_api.uploads.storage import MultipartStorage

router = APIRouter(prefix="/v1/dev", tags=["Developer"])
_ERRORS = errors(401, 403, 404, 409, 422)


def storage_of(request: Request) -> MultipartStorage:
    """The process's S3 multipart client (made on first use)."""
    state = request.app.state
    storage = getattr(state, "multipart_storage", None)
    if storage is None:
        storage = state.multipart_storage = MultipartStorage(state.settings)
    return storage


@router.post(
    "/models/{repo_id:path}/versions/{version}/uploads/multipart",
    status_code=status.HTTP_201_CREATED,
    response_model=MultipartOut,
    summary="Start a multipart upload",
    description="For large files (S3 refuses single PUTs above 5 GiB; parts go in parallel and resume). "
    "Declare the file's size and optionally the part size (5 MiB to 5 GiB, at most 10,000 parts; default "
    "64 MiB, more if needed). Then get part URLs (`POST /v1/dev/uploads/{upload_id}/parts`), PUT each part's "
    "bytes there keeping the `ETag` of each answer, and finish with `POST /v1/dev/uploads/{upload_id}/complete`. "
    "The file is verified by ingest like any other upload.",
    responses=_ERRORS,
)
async def initiate_multipart(
    repo_id: RepoIdPath, version: VersionPath, body: MultipartIn, request: Request, principal: Developer
) -> MultipartOut:
    async with request.app.state.pool.connection() as conn:
        out = await service.initiate_multipart(
            conn, storage_of(request), principal, repo_id, version, body.rfilename, body.size, body.part_size
        )
    return MultipartOut(**out)


@router.post(
    "/uploads/{upload_id}/parts",
    response_model=SignOut,
    summary="Presigned URLs of parts",
    description="PUT URLs for the given part numbers (at most 1,000 per request). Each part must hold exactly "
    "`size` bytes. Ask again for any part whose URL has expired: a URL can be re-signed as often as needed, and "
    "re-uploading a part replaces it.",
    responses=_ERRORS,
)
async def sign_parts(upload_id: RowId, body: SignIn, request: Request, principal: Developer) -> SignOut:
    async with request.app.state.pool.connection() as conn:
        out = await service.sign_parts(
            conn, request.app.state.presigner, principal, upload_id, body.part_numbers, body.expires
        )
    return SignOut(**out)


@router.get(
    "/uploads/{upload_id}/parts",
    response_model=PartsOut,
    summary="Parts stored so far",
    description="The parts object storage holds (S3 ListParts), with their ETags and sizes: to resume, upload "
    "only the others. Empty once the upload is no longer `initiated`.",
    responses=_ERRORS,
)
async def list_parts(upload_id: RowId, request: Request, principal: Developer) -> PartsOut:
    async with request.app.state.pool.connection() as conn:
        return PartsOut(**await service.list_parts(conn, storage_of(request), principal, upload_id))


@router.post(
    "/uploads/{upload_id}/complete",
    response_model=MultipartOut,
    summary="Finish a multipart upload",
    description="Lists every part (1..part_count in order, with the ETag each PUT answered) and declares the "
    "file's size and sha256. The parts are checked against the stored ones and assembled into the object; the "
    "upload is then `pending_verification` until ingest has streamed the object (size and sha256): `available`, "
    "or `rejected` with a reason (`GET /v1/dev/uploads/{upload_id}`).",
    responses=_ERRORS,
)
async def complete_multipart(
    upload_id: RowId, body: MultipartCompleteIn, request: Request, principal: Developer
) -> MultipartOut:
    parts = [(p.part_number, p.etag) for p in body.parts]
    async with request.app.state.pool.connection() as conn:
        out = await service.complete_multipart(
            conn, storage_of(request), principal, upload_id, parts, body.size, body.sha256
        )
    return MultipartOut(**out)


@router.delete(
    "/uploads/{upload_id}",
    response_model=MultipartOut,
    summary="Abort a multipart upload",
    description="Object storage deletes the parts; the upload becomes `aborted`. Only an `initiated` upload can "
    "be aborted.",
    responses=_ERRORS,
)
async def abort_multipart(upload_id: RowId, request: Request, principal: Developer) -> MultipartOut:
    async with request.app.state.pool.connection() as conn:
        return MultipartOut(**await service.abort_multipart(conn, storage_of(request), principal, upload_id))
