"""Base classes of request and response bodies."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict

_EMAIL_RE = re.compile(r"^[^@\s]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}[A-Za-z0-9])?(?:\.[A-Za-z0-9-]{1,63})+$")


class RequestBody(BaseModel):
    """A request body: unknown fields are refused, strings stripped."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


class ErrorOut(BaseModel):
    """Every error: `{"detail": "message"}`."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"detail": "model not found"}]})
    detail: str


def _email(v: str) -> str:
    if len(v) > 254 or not _EMAIL_RE.match(v):
        raise ValueError("not a valid e-mail address")
    return v


Email = Annotated[str, AfterValidator(_email)]


def errors(*codes: int) -> dict[int | str, dict]:
    """OpenAPI `responses` for the given error statuses, all with the `{"detail"}` shape."""
    text = {
        400: "Bad request",
        401: "Missing, invalid or revoked credentials",
        403: "The caller's role may not do this",
        404: "Not found, or not visible to the caller",
        409: "Conflicts with existing state",
        422: "Invalid parameters or body",
        503: "A dependency is unavailable (or the admin token is not configured)",
    }
    return {c: {"model": ErrorOut, "description": text.get(c, "Error")} for c in codes}
