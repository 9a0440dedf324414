"""The download endpoint's hot path, served as plain ASGI ahead of routing.

`GET /v1/files/{repo_id}/{rfilename}/download` is what platforms call for every file they fetch. The
documented FastAPI route (catalog.endpoints.download) describes it in OpenAPI; this middleware answers
its GETs with the same rule (`download_answer`), the same parameter checks and the same error bodies
(tests/integration/test_api_fast_download.py compares the two), without the per-request cost of routing, dependency solving
and response classes. While Postgres is away it answers what the caches hold and 503 `database
unavailable` with `Retry-After` at once for the rest (kit.db_monitor).
"""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import parse_qsl

import orjson
import psycopg
from psycopg_pool import PoolTimeout
from pydantic import Field, TypeAdapter, ValidationError
from starlette.types import ASGIApp, Receive, Scope, Send

from registry_api.auth import catalog_principal, presented_key
from registry_api.catalog.service import download_answer
from registry_api.errors import ApiError, Unprocessable, describe_error
from registry_api.kit.db_monitor import DatabaseUnavailable
from registry_api.kit.presign import EXPIRES_DEFAULT, EXPIRES_MAX, EXPIRES_MIN

_PREFIX = "/v1/files/"
_SUFFIX = "/download"
#: The documented route this middleware answers for, as the metrics name it.
ROUTE_TEMPLATE = "/v1/files/{file_path:path}/download"
_JSON_HEADERS = [(b"content-type", b"application/json")]


_EXPIRES = TypeAdapter(Annotated[int, Field(ge=EXPIRES_MIN, le=EXPIRES_MAX)])
_VERSION = TypeAdapter(Annotated[str, Field(max_length=64)])


def _param(adapter: TypeAdapter, name: str, raw: str) -> Any:
    """Validate one query parameter with the documented route's rule and its exact message."""
    try:
        return adapter.validate_python(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise Unprocessable(describe_error({**err, "loc": ("query", name)})) from None


def _query(scope: Scope) -> tuple[int, str | None]:
    """`expires` and `version` as the documented route declares them (the last value of a repeated one wins)."""
    params = dict(parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True))
    raw = params.get("expires")
    expires = EXPIRES_DEFAULT if raw is None else _param(_EXPIRES, "expires", raw)
    raw = params.get("version")
    version = None if raw is None else _param(_VERSION, "version", raw)
    return expires, version


class FastDownload:
    """Answers `GET /v1/files/.../download`; passes every other request on unchanged."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if (
            scope["type"] != "http"
            or scope["method"] != "GET"
            or not path.startswith(_PREFIX)
            or not path.endswith(_SUFFIX)
            or len(path) <= len(_PREFIX) + len(_SUFFIX)
        ):
            await self.app(scope, receive, send)
            return
        scope["route_template"] = ROUTE_TEMPLATE  # the metrics' route label (registry_shared.metrics)
        status = 200
        headers = _JSON_HEADERS
        try:
            body = await self._answer(scope, path[len(_PREFIX) : -len(_SUFFIX)])
        except ApiError as exc:
            status, body = exc.status_code, {"detail": exc.detail}
            if exc.headers:  # a rate limit (Retry-After, RateLimit-*)
                headers = [*headers, *((k.lower().encode(), v.encode()) for k, v in exc.headers.items())]
            else:
                retry_after = getattr(exc, "retry_after", None)  # the access-event buffer is full
                if retry_after is not None:
                    headers = [*headers, (b"retry-after", str(retry_after).encode())]
        except DatabaseUnavailable as exc:
            status, body = 503, {"detail": "database unavailable"}
            headers = [*headers, (b"retry-after", str(exc.retry_after).encode())]
        except (psycopg.OperationalError, PoolTimeout) as exc:
            status, body = 503, {"detail": "database unavailable"}
            monitor = scope["app"].state.db_monitor
            monitor.suspect(exc)
            headers = [*headers, (b"retry-after", str(monitor.retry_after).encode())]
        payload = orjson.dumps(body)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [*headers, (b"content-length", str(len(payload)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": payload})

    async def _answer(self, scope: Scope, file_path: str) -> dict[str, object]:
        app = scope["app"]
        api_key = admin_token = authorization = None
        for name, value in scope["headers"]:
            if name == b"x-api-key":
                api_key = value.decode("latin-1")
            elif name == b"x-admin-token":
                admin_token = value.decode("latin-1")
            elif name == b"authorization":
                authorization = value.decode("latin-1")
        principal = await catalog_principal(app, presented_key(api_key, authorization), admin_token)
        expires, version = _query(scope)
        return await download_answer(app, principal, file_path, expires, version)
