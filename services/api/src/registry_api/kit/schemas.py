"""Base classes of request and response bodies."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import Path, Query
from pydantic import AfterValidator, BaseModel, ConfigDict

#: The largest value of a Postgres BIGINT: ids, counters, offsets.
BIGINT_MAX = 2**63 - 1
#: The latest epoch second the api takes (year 36812): far beyond any real time, far inside a BIGINT.
EPOCH_MAX = 2**40

#: A row id in a path (grants, webhooks, deliveries, uploads).
RowId = Annotated[int, Path(ge=1, le=BIGINT_MAX)]
#: How many rows to skip in a list.
Offset = Annotated[int, Query(ge=0, le=BIGINT_MAX, description="Rows to skip.")]

_EMAIL_RE = re.compile(r"^[^@\s]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}[A-Za-z0-9])?(?:\.[A-Za-z0-9-]{1,63})+$")


class RequestBody(BaseModel):
    """A request body: unknown fields are refused, strings stripped."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


def _drop_null_defaults(schema: dict) -> None:
    """In a PATCH body, a field that may be omitted but not null has the Python default None: keep that
    default out of the documented schema, which says the field is not nullable."""
    for prop in schema.get("properties", {}).values():
        nullable = any(alt.get("type") == "null" for alt in prop.get("anyOf", []))
        if prop.get("default", 0) is None and not nullable:
            del prop["default"]


class PatchBody(RequestBody):
    """A partial update: omitted fields stay as they are; `null` is accepted only by the fields the schema
    declares nullable (it clears them). A null for any other field answers 422."""

    model_config = ConfigDict(json_schema_extra=_drop_null_defaults)


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
        422: "Invalid parameters or body; text containing NUL (\\u0000); `invalid JSON body` for a body that "
        "is not UTF-8 JSON",
        503: "A dependency is unavailable (or the admin token is not configured)",
    }
    return {c: {"model": ErrorOut, "description": text.get(c, "Error")} for c in codes}
