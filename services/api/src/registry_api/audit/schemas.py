"""Bodies of the audit endpoint."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class AuditEntry(BaseModel):
    """One state-changing action."""

    audit_id: int = Field(examples=[1])
    ts: float = Field(description="When (epoch seconds, fractional).")
    actor_kind: Literal["user", "admin-token", "anonymous", "system"] = Field(
        description="`user` (by API key: actor_user_id), `admin-token`, `anonymous` (self-registration), "
        "`system` (ingest's verdict applied by the api)."
    )
    actor_user_id: int | None = None
    action: str = Field(examples=["grant.create"])
    target_type: str = Field(examples=["grant"])
    target_id: str | None = Field(None, examples=["12"])
    repo_id: str | None = Field(None, examples=["acme/finetune-bert"])
    before: dict[str, Any] | None = Field(None, description="The target before the change (when it existed).")
    after: dict[str, Any] | None = Field(None, description="The target after the change (when it still exists).")
    request_id: str | None = Field(None, description="The request's x-request-id.")
    client_ip: str | None = None


class AuditList(BaseModel):
    items: list[AuditEntry]
    next_cursor: str | None = Field(None, description="Pass as `cursor` for the next (older) page; null at the end.")
