"""Bodies of the developer endpoints."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from registry_api.kit.schemas import PatchBody, RequestBody
from registry_api.kit.validate import REPO_ID_PATTERN, VERSION_PATTERN


class ModelIn(RequestBody):
    """A new model. The namespace (before '/') belongs to the first developer who uses it."""

    repo_id: str = Field(pattern=REPO_ID_PATTERN, max_length=193, examples=["acme/finetune-bert"])
    model_name: str = Field(min_length=1, max_length=200, examples=["Finetune BERT"])
    visibility: Literal["private", "public"] = "private"
    canonical_url: str | None = Field(None, max_length=2000)
    author: str | None = Field(None, max_length=200, description="Defaults to the namespace.")
    pipeline_tag: str | None = Field(None, max_length=100, examples=["text-classification"])
    license: str | None = Field(None, max_length=100, examples=["apache-2.0"])
    parameters: int | None = Field(None, ge=0, le=10**15, examples=[110000000])
    languages: str | None = Field(None, max_length=500, examples=["en"])
    tags: str | None = Field(None, max_length=2000, examples=["bert, finetune"])


class ModelUpdate(PatchBody):
    """Metadata a developer may change on their model. Omitted fields stay; `null` clears the optional ones
    (model_name and visibility cannot be null)."""

    model_name: str = Field(None, min_length=1, max_length=200)
    visibility: Literal["private", "public"] = Field(None)
    canonical_url: str | None = Field(None, max_length=2000)
    pipeline_tag: str | None = Field(None, max_length=100)
    license: str | None = Field(None, max_length=100)
    parameters: int | None = Field(None, ge=0, le=10**15)
    languages: str | None = Field(None, max_length=500)
    tags: str | None = Field(None, max_length=2000)


class VersionIn(RequestBody):
    """A new version of a model."""

    version: str = Field(pattern=VERSION_PATTERN, examples=["v1"])


class VersionOut(BaseModel):
    """A version."""

    repo_id: str
    version: str
    created_ts: int


class VersionList(BaseModel):
    items: list[VersionOut]


class InitiateOut(BaseModel):
    """Where to PUT the file's bytes (straight to MinIO), then call `complete`."""

    upload_id: int = Field(examples=[7])
    repo_id: str = Field(examples=["acme/finetune-bert"])
    version: str = Field(examples=["v1"])
    rfilename: str = Field(examples=["model.safetensors"])
    object_key: str = Field(examples=["uploads/acme/finetune-bert/v1/model.safetensors"])
    method: Literal["PUT"] = "PUT"
    url: str = Field(examples=["http://127.0.0.1:19000/models/uploads/acme/...&X-Amz-Signature=..."])
    expires_in: int = Field(examples=[900])


class CompleteIn(RequestBody):
    """What the developer declares about the uploaded file; ingest checks it against the object."""

    rfilename: str = Field(min_length=1, max_length=1024, examples=["model.safetensors"])
    size: int = Field(ge=0, le=5 * 1024**4, examples=[123456789])
    sha256: str = Field(
        pattern=r"^[0-9a-fA-F]{64}$", examples=["9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"]
    )


class UploadOut(BaseModel):
    """An upload and where it stands."""

    upload_id: int
    repo_id: str
    version: str
    rfilename: str
    object_key: str
    status: Literal["initiated", "pending_verification", "available", "rejected", "expired", "aborted"]
    size: int | None = None
    sha256: str | None = None
    reason: str | None = Field(None, description="Why it was rejected (size_mismatch, sha256_mismatch, ...).")
    detail: str | None = None
    created_ts: int
    completed_ts: int | None = None
    verdict_ts: int | None = None


class UploadList(BaseModel):
    items: list[UploadOut]
