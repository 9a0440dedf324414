"""HTTP: /v1/platform — the bulk manifest of everything granted to a platform user."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel

from registry_api.auth import Platform
from registry_api.catalog import repository
from registry_api.catalog.schemas import ManifestFile
from registry_api.catalog.service import record_access
from registry_api.kit.presign import EXPIRES_DEFAULT, EXPIRES_MAX, EXPIRES_MIN
from registry_api.kit.schemas import errors

router = APIRouter(prefix="/v1/platform", tags=["Platform"])


class PlatformVersion(BaseModel):
    version: str
    created_ts: int
    files: list[ManifestFile]


class PlatformModel(BaseModel):
    repo_id: str
    model_name: str
    author: str | None = None
    pipeline_tag: str | None = None
    license: str | None = None
    last_update_ts: int
    permitted_from_ts: int
    permitted_until_ts: int | None = None
    versions: list[PlatformVersion]


class PlatformManifest(BaseModel):
    items: list[PlatformModel]


@router.get(
    "/manifest",
    response_model=PlatformManifest,
    summary="Everything granted to you",
    description="Every model granted to the calling platform user and in force now, with its versions and their "
    "verified files (with presigned GET URLs if `presign=true`).",
    responses=errors(401, 403, 422),
)
async def platform_manifest(
    request: Request,
    principal: Platform,
    presign: bool = False,
    expires: Annotated[int, Query(ge=EXPIRES_MIN, le=EXPIRES_MAX)] = EXPIRES_DEFAULT,
) -> PlatformManifest:
    async with request.app.state.pool.connection() as conn:
        rows = await repository.granted_files(conn, principal.user_id, int(time.time()))
    signer = request.app.state.presigner
    models: dict[str, PlatformModel] = {}
    for r in rows:
        model = models.get(r["repo_id"])
        if model is None:
            model = models[r["repo_id"]] = PlatformModel(
                **{k: r[k] for k in PlatformModel.model_fields if k in r}, versions=[]
            )
        if r["version"] is None:
            continue
        if not model.versions or model.versions[-1].version != r["version"]:
            model.versions.append(PlatformVersion(version=r["version"], created_ts=r["version_created_ts"], files=[]))
        if r["rfilename"] is not None:
            model.versions[-1].files.append(
                ManifestFile(
                    rfilename=r["rfilename"],
                    size=r["size"],
                    sha256=r["sha256"],
                    object_key=r["object_key"],
                    version=r["version"],
                    presigned_url=signer.get_url(r["object_key"], expires) if presign else None,
                )
            )
    record_access(request.app, principal, "platform_manifest")
    return PlatformManifest(items=list(models.values()))
