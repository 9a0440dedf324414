"""HTTP: /v1/admin — users with roles and grants CRUD (x-admin-token)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request, status

from registry_api.admin import repository, service
from registry_api.admin.schemas import AdminUserIn, GrantIn, GrantList, GrantOut, GrantUpdate, KeyIn, UserList, UserOut
from registry_api.auth import Admin
from registry_api.kit.schemas import BIGINT_MAX, Offset, RowId, errors
from registry_api.users import service as users_service
from registry_api.users.schemas import ApiKeyOut

router = APIRouter(prefix="/v1/admin", tags=["Admin"])
_ERR = errors(401, 404, 409, 422, 503)


@router.post(
    "/users",
    response_model=ApiKeyOut,
    status_code=status.HTTP_200_OK,
    summary="Create a user with a role",
    description="Creates a developer, platform or admin user and returns its API key (shown once). The key may "
    "carry an expiry (`key_expires_ts`) and a `read-only` scope (a platform that only downloads).",
    responses=_ERR,
)
async def create_user(body: AdminUserIn, request: Request, _: Admin) -> ApiKeyOut:
    async with request.app.state.pool.connection() as conn:
        user_id, key = await users_service.create_user(
            conn, body.email, body.name, body.role, body.key_scope, body.key_expires_ts
        )
    return ApiKeyOut(user_id=user_id, api_key=key)


@router.post(
    "/users/{user_id}/keys",
    response_model=ApiKeyOut,
    summary="Issue a user a new key",
    description="Replaces the user's keys with a new one (shown once), with the scope and expiry given: the "
    "previous keys stop working at once. For a leaked key, or to give a key a lifetime or a read-only scope.",
    responses=_ERR,
)
async def issue_key(user_id: RowId, body: KeyIn, request: Request, _: Admin) -> ApiKeyOut:
    async with request.app.state.pool.connection() as conn:
        key = await users_service.reissue_key(conn, user_id, body.key_scope, body.key_expires_ts)
    return ApiKeyOut(user_id=user_id, api_key=key)


@router.get("/users", response_model=UserList, summary="List users", responses=_ERR)
async def list_users(
    request: Request,
    _: Admin,
    role: Literal["developer", "platform", "admin"] | None = None,
    email: Annotated[str | None, Query(max_length=254)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    offset: Offset = 0,
) -> UserList:
    async with request.app.state.pool.connection() as conn:
        rows = await repository.list_users(conn, role, email, limit, offset)
    return UserList(items=[UserOut(**r) for r in rows])


@router.post(
    "/grants",
    response_model=GrantOut,
    status_code=status.HTTP_201_CREATED,
    summary="Grant a platform user a model",
    description="The platform user sees the model from `permitted_from_ts` (until `permitted_until_ts`, if set).",
    responses=_ERR,
)
async def create_grant(body: GrantIn, request: Request, _: Admin) -> GrantOut:
    async with request.app.state.pool.connection() as conn:
        return GrantOut(**await service.create_grant(conn, body))


@router.get("/grants", response_model=GrantList, summary="List grants", responses=_ERR)
async def list_grants(
    request: Request,
    _: Admin,
    platform_user_id: Annotated[int | None, Query(ge=1, le=BIGINT_MAX)] = None,
    repo_id: Annotated[str | None, Query(max_length=193)] = None,
    active: Annotated[bool | None, Query(description="Only grants in force now (true) or not (false)")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    offset: Offset = 0,
) -> GrantList:
    async with request.app.state.pool.connection() as conn:
        rows = await repository.list_grants(conn, platform_user_id, repo_id, active, limit, offset)
    return GrantList(items=[GrantOut(**r) for r in rows], limit=limit, offset=offset)


@router.get("/grants/{grant_id}", response_model=GrantOut, summary="Get a grant", responses=_ERR)
async def get_grant(grant_id: RowId, request: Request, _: Admin) -> GrantOut:
    async with request.app.state.pool.connection() as conn:
        return GrantOut(**await service.get_grant(conn, grant_id))


@router.patch("/grants/{grant_id}", response_model=GrantOut, summary="Change a grant's window", responses=_ERR)
async def update_grant(grant_id: RowId, body: GrantUpdate, request: Request, _: Admin) -> GrantOut:
    async with request.app.state.pool.connection() as conn:
        return GrantOut(**await service.update_grant(conn, grant_id, body))


@router.delete(
    "/grants/{grant_id}",
    response_model=GrantOut,
    summary="Revoke a grant",
    description="The platform user loses access at once. The grant is kept (revoked_ts set) for audit.",
    responses=_ERR,
)
async def revoke_grant(grant_id: RowId, request: Request, _: Admin) -> GrantOut:
    async with request.app.state.pool.connection() as conn:
        return GrantOut(**await service.revoke_grant(conn, grant_id))
