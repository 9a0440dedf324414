"""HTTP: /v1/users — register, rotate-key, me."""

from __future__ import annotations

from fastapi import APIRouter, Request

from registry_api.auth import CurrentUser, lookup_prefix, revocation_heard
from registry_api.kit.schemas import errors
from registry_api.users import service
from registry_api.users.schemas import ApiKeyOut, MeOut, RegisterIn

router = APIRouter(prefix="/v1/users", tags=["Users"])


@router.post(
    "/register",
    response_model=ApiKeyOut,
    summary="Register and get an API key",
    description="Creates a developer account and returns its API key (shown once). No auth. "
    "Governed by REGISTRATION_POLICY: open, an e-mail domain allowlist, or closed. Rate limited per client IP "
    "(RATE_LIMIT_REGISTER_PER_MINUTE).",
    responses=errors(403, 409, 422),
)
async def register(body: RegisterIn, request: Request) -> ApiKeyOut:
    if request.app.state.rate_limiter is not None:
        await request.app.state.rate_limiter.check_register(request.client.host if request.client else "")
    service.check_registration_allowed(request.app.state.settings, body.email)
    async with request.app.state.pool.connection() as conn:
        user_id, key = await service.create_user(conn, body.email, body.name, "developer")
    return ApiKeyOut(user_id=user_id, api_key=key)


@router.post(
    "/rotate-key",
    response_model=ApiKeyOut,
    summary="Rotate your API key",
    description="Issues a new key; the previous key is revoked immediately. Of several rotations sent at once "
    "with one key, one succeeds and the others answer 401 (their key is already revoked): exactly one key works. "
    "The new key keeps the old one's expiry; a read-only key cannot rotate (403: an admin reissues it).",
    responses=errors(401, 403),
)
async def rotate_key(principal: CurrentUser, request: Request) -> ApiKeyOut:
    presented = lookup_prefix(request.headers.get("x-api-key", "")) or ""
    async with revocation_heard(presented), request.app.state.pool.connection() as conn:
        key = await service.rotate_key(conn, principal, presented)
    return ApiKeyOut(user_id=principal.user_id, api_key=key)


@router.get("/me", response_model=MeOut, summary="The current user", responses=errors(401))
async def me(principal: CurrentUser) -> MeOut:
    return MeOut(
        user_id=principal.user_id,
        email=principal.email,
        name=principal.name,
        role=principal.role,
        key_scope=principal.key_scope,
        key_expires_ts=principal.key_expires_ts,
    )
