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


class HubErrorOut(BaseModel):
    """Every /hf error: `{"detail": "message"}` (the Hub's clients read `X-Error-Code` and `X-Error-Message`),
    with the Hub's extra fields where it has them: `url` on 409 `RepoExists` (the existing repository),
    `errors` / `warnings` on 400 `InvalidYaml`."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"detail": "Repository not found"}, {"detail": "...", "url": "..."}]}
    )
    detail: str


# The LFS bodies are read by hand (a bad field answers 400, as the Git LFS API does); these schemas document them.
LFS_BATCH_SCHEMA: dict[str, Any] = {
    "title": "LfsBatchIn",
    "type": "object",
    "description": "The Git LFS batch request (upload only).",
    "required": ["operation", "objects"],
    "properties": {
        "operation": {"type": "string", "enum": ["upload"]},
        "transfers": {"type": "array", "items": {"type": "string"}, "description": "`basic` and/or `multipart`."},
        "objects": {
            "type": "array",
            "minItems": 1,
            "maxItems": 1000,
            "items": {
                "type": "object",
                "required": ["oid", "size"],
                "properties": {
                    "oid": {"type": "string", "description": "The object's sha256 (lowercase hex)."},
                    "size": {"type": "integer", "minimum": 0},
                },
            },
        },
    },
}
LFS_COMPLETE_SCHEMA: dict[str, Any] = {
    "title": "LfsCompleteIn",
    "type": "object",
    "description": "The completion of a multipart LFS upload: every part handed out, in order, with its ETag.",
    "required": ["oid", "parts"],
    "properties": {
        "oid": {"type": "string"},
        "parts": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["partNumber", "etag"],
                "properties": {"partNumber": {"type": "integer", "minimum": 1}, "etag": {"type": "string"}},
            },
        },
    },
}
