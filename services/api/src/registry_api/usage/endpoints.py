"""HTTP: the usage endpoints. The analytics service owns the data (ClickHouse); the api checks who asks
and forwards the query to it."""

from __future__ import annotations

from typing import Annotated, Any

import httpx
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from registry_api.auth import Admin, CurrentUser
from registry_api.errors import Unavailable, Unprocessable
from registry_api.kit.schemas import BIGINT_MAX, EPOCH_MAX, errors

router = APIRouter(tags=["Usage & Analytics"])
Epoch = Annotated[int | None, Query(ge=0, le=EPOCH_MAX, description="Epoch seconds")]

_ME_EXAMPLE = {
    "window": {"since": 1710800000, "until": 1713400000},
    "totals": {"events": 42, "manifests": 5, "files_list": 10, "downloads": 27},
    "last_seen_ts": 1713399999,
    "distinct_models": 7,
    "top_models": [{"repo_id": "meta-llama/Llama-3-8B", "downloads": 12}],
    "timeseries_daily": [{"day": "2024-04-01", "events": 7, "downloads": 4}],
}


async def _forward(request: Request, path: str, params: dict[str, Any]) -> JSONResponse:
    if params.get("since") is not None and params.get("until") is not None and params["since"] > params["until"]:
        raise Unprocessable("since must not be after until")
    client: httpx.AsyncClient = request.app.state.analytics
    try:
        resp = await client.get(path, params={k: v for k, v in params.items() if v is not None})
    except httpx.HTTPError as exc:
        raise Unavailable("usage analytics unavailable") from exc
    if resp.status_code not in (200, 422):
        raise Unavailable(f"usage analytics unavailable (status {resp.status_code})")
    return JSONResponse(resp.json(), status_code=resp.status_code)


@router.get(
    "/v1/users/me/usage",
    summary="Your usage",
    description="Totals, distinct models, top models and a daily series over a window (default: the last 30 days).",
    responses={200: {"content": {"application/json": {"example": _ME_EXAMPLE}}}, **errors(401, 422, 503)},
)
async def my_usage(
    request: Request,
    principal: CurrentUser,
    since: Epoch = None,
    until: Epoch = None,
    top_models_limit: Annotated[int, Query(ge=1, le=200)] = 20,
) -> JSONResponse:
    return await _forward(
        request,
        f"/v1/usage/users/{principal.user_id}",
        {"since": since, "until": until, "top_models_limit": top_models_limit},
    )


@router.get(
    "/v1/admin/usage",
    summary="Usage overview (admin)",
    description="Totals, top users, top models and a daily series; filter by user id or e-mail.",
    responses=errors(401, 422, 503),
)
async def admin_usage(
    request: Request,
    _: Admin,
    since: Epoch = None,
    until: Epoch = None,
    top_users_limit: Annotated[int, Query(ge=1, le=500)] = 50,
    top_models_limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    filter_user_id: Annotated[int | None, Query(ge=0, le=BIGINT_MAX)] = None,
    filter_email: Annotated[str | None, Query(max_length=254)] = None,
) -> JSONResponse:
    return await _forward(
        request,
        "/v1/usage/admin",
        {
            "since": since,
            "until": until,
            "top_users_limit": top_users_limit,
            "top_models_limit": top_models_limit,
            "filter_user_id": filter_user_id,
            "filter_email": filter_email,
        },
    )
