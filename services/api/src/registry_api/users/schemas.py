"""Bodies of the users endpoints."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from registry_api.kit.schemas import Email, RequestBody


class RegisterIn(RequestBody):
    """Self-registration."""

    email: Email = Field(examples=["you@example.com"])
    name: str = Field(min_length=1, max_length=200, examples=["You"])


class ApiKeyOut(BaseModel):
    """A user id and its API key, shown once."""

    user_id: int = Field(examples=[42])
    api_key: str = Field(examples=["sk_live_xxx"])


class MeOut(BaseModel):
    """The current user."""

    user_id: int = Field(examples=[42])
    email: str = Field(examples=["you@example.com"])
    name: str = Field(examples=["You"])
    role: str = Field(examples=["developer"])
    key_scope: Literal["full", "read-only"] = Field(
        description="`read-only`: this key may only read (GET); any other call answers 403.", examples=["full"]
    )
    key_expires_ts: int | None = Field(
        description="When this key stops working (epoch s; then 401 `api key expired`); null: never.",
        examples=[None],
    )
