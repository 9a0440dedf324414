"""Bodies of the Hugging Face–compatible endpoints (the Hub's own field names; unknown fields are ignored
because the official clients send more than the registry needs)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class HubBody(BaseModel):
    model_config = ConfigDict(extra="ignore")


class RepoCreateIn(HubBody):
    """`huggingface_hub.create_repo`: `organization` is the namespace."""

    name: str = Field(min_length=1, max_length=96)
    organization: str | None = Field(None, max_length=96)
    private: bool | None = None
    visibility: Literal["public", "private", "protected"] | None = None
    type: Literal["model"] | None = "model"


class RepoCreateOut(BaseModel):
    url: str
    name: str
    id: str


class PreuploadFile(HubBody):
    path: str = Field(max_length=1024)
    size: int = Field(ge=0)
    sample: str | None = None


class PreuploadIn(HubBody):
    files: list[PreuploadFile] = Field(max_length=1000)


class PreuploadFileOut(BaseModel):
    path: str
    uploadMode: Literal["lfs", "regular"]
    shouldIgnore: bool = False
    oid: str | None = None


class PreuploadOut(BaseModel):
    files: list[PreuploadFileOut]
    commitOid: str | None = None


class ValidateYamlIn(HubBody):
    content: str = Field(max_length=1_000_000)
    repoType: str | None = None


class WhoAmIOut(BaseModel):
    type: Literal["user"] = "user"
    id: str
    name: str
    fullname: str
    email: str
    emailVerified: bool = True
    isPro: bool = False
    orgs: list[Any] = []
    auth: dict[str, Any]


class CommitOut(BaseModel):
    success: bool
    commitOid: str
    commitUrl: str
    hookOutput: str = ""
    pullRequestUrl: str | None = None
    version: str = Field(description="The registry version this commit created.")
