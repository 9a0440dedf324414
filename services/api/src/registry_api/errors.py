"""One exception type per failure kind, mapped to HTTP once, always as {"detail": "..."}."""

from __future__ import annotations

import json
import logging

import psycopg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from registry_api.kit.text import INVALID_JSON, TextGuard

log = logging.getLogger(__name__)
_FASTAPI_BODY_ERROR = "There was an error parsing the body"


class ApiError(Exception):
    """Base of every error the api answers with on purpose."""

    status_code = 400
    headers: dict[str, str] | None = None

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class BadRequest(ApiError):
    status_code = 400


class Unauthorized(ApiError):
    status_code = 401


class Forbidden(ApiError):
    status_code = 403


class NotFound(ApiError):
    status_code = 404


class Conflict(ApiError):
    status_code = 409


class Unprocessable(ApiError):
    status_code = 422


class Unavailable(ApiError):
    status_code = 503


def describe_error(err: dict) -> str:
    """One pydantic error as the api words it: `<where>: <message>`."""
    loc = [str(p) for p in err.get("loc", ()) if p != "body" or len(err.get("loc", ())) == 1]
    where = ".".join(loc)
    if err.get("type") == "json_invalid":
        return INVALID_JSON
    if err.get("type") == "extra_forbidden":
        return f"unknown field: {where}"
    if err.get("type") == "missing":
        return f"missing required field: {where}"
    if where and err.get("loc", ("",))[0] == "body" and "input" in err and err["input"] is None:
        return f"{where} cannot be null"
    return f"{where}: {err.get('msg', 'invalid value')}" if where else err.get("msg", "invalid request")


def install_error_handlers(app: FastAPI) -> None:
    """Map every failure to the spec's error shape; nothing escapes as a stack trace. Input the database
    cannot hold (NUL in any text) or that is not UTF-8 JSON is refused with 422 before routing (kit.text)."""
    app.add_middleware(TextGuard)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        detail = "; ".join(describe_error(e) for e in errors[:5]) or "invalid request"
        return JSONResponse({"detail": detail}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and exc.detail == _FASTAPI_BODY_ERROR:
            # A JSON body FastAPI could not decode (TextGuard refuses these first): one answer for bad JSON.
            return JSONResponse({"detail": INVALID_JSON}, status_code=422)
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        return JSONResponse({"detail": detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(psycopg.OperationalError)
    async def _db_down(_: Request, exc: psycopg.OperationalError) -> JSONResponse:
        log.error("database unavailable: %s", exc)
        return JSONResponse({"detail": "database unavailable"}, status_code=503)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse({"detail": "internal error"}, status_code=500)
