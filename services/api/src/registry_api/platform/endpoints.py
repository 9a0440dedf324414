"""HTTP: /v1/platform — the bulk manifest of everything granted to a platform user."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel

from registry_api.auth import Platform
from registry_api.catalog.endpoints import record_access
from registry_api.catalog.schemas import ManifestFile
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


_SQL = """
with granted as (
    select g.model_id, min(g.permitted_from_ts) as permitted_from_ts,
           case when bool_or(g.permitted_until_ts is null) then null else max(g.permitted_until_ts) end
             as permitted_until_ts
    from grants g
    where g.platform_user_id = %(uid)s and g.revoked_ts is null and g.permitted_from_ts <= %(now)s
      and (g.permitted_until_ts is null or g.permitted_until_ts > %(now)s)
    group by g.model_id
)
select m.repo_id, m.model_name, m.author, m.pipeline_tag, m.license, m.last_update_ts,
       gr.permitted_from_ts, gr.permitted_until_ts,
       v.version, v.created_ts as version_created_ts,
       f.rfilename, f.size, f.sha256, f.object_key
from granted gr
join models m on m.id = gr.model_id
left join versions v on v.model_id = m.id
left join files f on f.version_id = v.id
order by m.repo_id, v.id, f.rfilename
"""


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
        cur = await conn.execute(_SQL, {"uid": principal.user_id, "now": int(time.time())})
        rows = await cur.fetchall()
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
    record_access(request, principal, "platform_manifest")
    return PlatformManifest(items=list(models.values()))
