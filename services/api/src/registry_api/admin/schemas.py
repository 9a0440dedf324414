"""Bodies of the admin endpoints."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, model_validator

from registry_api.kit.schemas import BIGINT_MAX, EPOCH_MAX, Email, PatchBody, RequestBody
from registry_api.kit.validate import REPO_ID_PATTERN


class AdminUserIn(RequestBody):
    """A user created by an admin, with any role."""

    email: Email = Field(examples=["plat@partner.com"])
    name: str = Field(min_length=1, max_length=200, examples=["Plat"])
    role: Literal["developer", "platform", "admin"] = Field(examples=["platform"])
    key_scope: Literal["full", "read-only"] = Field(
        "full", description="`read-only`: the key may only read (GET); anything else answers 403."
    )
    key_expires_ts: int | None = Field(
        None,
        ge=0,
        le=EPOCH_MAX,
        description="When the key stops working (epoch s, in the future); then it answers 401 `api key expired`.",
    )


class KeyIn(RequestBody):
    """A new key for a user, replacing its current keys."""

    key_scope: Literal["full", "read-only"] = Field(
        "full", description="`read-only`: the key may only read (GET); anything else answers 403."
    )
    key_expires_ts: int | None = Field(
        None,
        ge=0,
        le=EPOCH_MAX,
        description="When the key stops working (epoch s, in the future); then it answers 401 `api key expired`.",
    )


class UserOut(BaseModel):
    user_id: int
    email: str
    name: str
    role: str
    created_ts: int


class UserList(BaseModel):
    items: list[UserOut]


class GrantIn(RequestBody):
    """Grant a platform user a model from a point in time (optionally until another)."""

    platform_user_id: int = Field(ge=1, le=BIGINT_MAX, examples=[43])
    repo_id: str = Field(pattern=REPO_ID_PATTERN, examples=["acme/finetune-bert"])
    permitted_from_ts: int = Field(ge=0, le=EPOCH_MAX, examples=[1711972800])
    permitted_until_ts: int | None = Field(None, ge=0, le=EPOCH_MAX, examples=[None])

    @model_validator(mode="after")
    def _window(self) -> GrantIn:
        if self.permitted_until_ts is not None and self.permitted_until_ts <= self.permitted_from_ts:
            raise ValueError("permitted_until_ts must be after permitted_from_ts")
        return self


class GrantUpdate(PatchBody):
    """Change a grant's window. `permitted_until_ts: null` removes its end; `permitted_from_ts` cannot be null."""

    permitted_from_ts: int = Field(None, ge=0, le=EPOCH_MAX)
    permitted_until_ts: int | None = Field(None, ge=0, le=EPOCH_MAX)


class GrantOut(BaseModel):
    grant_id: int = Field(examples=[1])
    platform_user_id: int = Field(examples=[43])
    repo_id: str = Field(examples=["acme/finetune-bert"])
    permitted_from_ts: int
    permitted_until_ts: int | None = None
    revoked_ts: int | None = None
    active: bool = Field(description="Revoked or not, and now inside the window.")
    created_ts: int
    updated_ts: int


class GrantList(BaseModel):
    items: list[GrantOut]
    limit: int
    offset: int
