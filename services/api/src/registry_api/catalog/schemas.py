"""Bodies of the catalog endpoints (0.3.0 shapes)."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field, field_serializer


def parameters_readable(parameters: int | None) -> str | None:
    """8_000_000_000 → "8B", 1_500_000_000 → "1.5B", 350_000_000 → "350M"."""
    if parameters is None:
        return None
    for unit, size in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if parameters >= size:
            value = parameters / size
            text = f"{value:.0f}" if value >= 100 else f"{value:.1f}".rstrip("0").rstrip(".")
            return f"{text}{unit}"
    return str(parameters)


class ModelItem(BaseModel):
    """A catalog entry, exactly as the 0.3.0 sample item."""

    repo_id: str = Field(examples=["meta-llama/Llama-3-8B"])
    canonical_url: str | None = Field(None, examples=["https://huggingface.co/meta-llama/Llama-3-8B"])
    model_name: str = Field(examples=["Llama-3-8B"])
    author: str | None = Field(None, examples=["meta-llama"])
    pipeline_tag: str | None = Field(None, examples=["text-generation"])
    license: str | None = Field(None, examples=["llama3"])
    parameters: int | None = Field(None, examples=[8000000000])
    parameters_readable: str | None = Field(None, examples=["8B"])
    downloads: int = Field(0, examples=[12345])
    likes: int = Field(0, examples=[678])
    created_at: datetime = Field(examples=["2024-01-10T00:00:00Z"])
    last_modified: datetime = Field(examples=["2024-04-01T12:00:00Z"])
    languages: str | None = Field(None, examples=["en"])
    tags: str | None = Field(None, examples=["llama3, meta"])
    last_update_ts: int = Field(examples=[1711972800])
    file_count: int = Field(0, examples=[23])
    has_safetensors: int = Field(0, examples=[1])
    has_bin: int = Field(0, examples=[0])

    @field_serializer("created_at", "last_modified")
    def _iso_z(self, v: datetime) -> str:
        return v.strftime("%Y-%m-%dT%H:%M:%SZ")

    @classmethod
    def from_row(cls, row: dict) -> ModelItem:
        return cls(
            **{k: row[k] for k in cls.model_fields if k in row and k not in ("has_safetensors", "has_bin")},
            parameters_readable=parameters_readable(row["parameters"]),
            has_safetensors=int(row["has_safetensors"]),
            has_bin=int(row["has_bin"]),
        )


class ModelList(BaseModel):
    """A page of models."""

    items: list[ModelItem]
    limit: int
    offset: int


class FileItem(BaseModel):
    """A file that can be downloaded (verified)."""

    rfilename: str = Field(examples=["tokenizer.json"])
    size: int = Field(examples=[123456])
    sha256: str = Field(examples=["abcd...ef"])
    updated_ts: int = Field(examples=[1711972800])
    object_key: str = Field(examples=["hf/meta-llama/Llama-3-8B/tokenizer.json"])
    version: str | None = Field(None, description="The version the file belongs to (null: unversioned file).")
    presigned_url: str | None = Field(None, examples=["https://minio...&X-Amz-Expires=900"])


class FileList(BaseModel):
    """The current files of a model (for each name, its newest version's file)."""

    repo_id: str
    items: list[FileItem]


class DownloadOut(BaseModel):
    """A presigned URL for one file."""

    repo_id: str = Field(examples=["meta-llama/Llama-3-8B"])
    rfilename: str = Field(examples=["tokenizer.json"])
    version: str | None = Field(None, examples=["v1"])
    size: int = Field(examples=[123456])
    sha256: str = Field(examples=["abcd...ef"])
    object_key: str = Field(examples=["hf/meta-llama/Llama-3-8B/tokenizer.json"])
    url: str = Field(examples=["https://minio...sig..."])
    expires_in: int = Field(examples=[900])


class ManifestFile(BaseModel):
    """A file in a manifest."""

    rfilename: str
    size: int
    sha256: str
    object_key: str
    version: str | None = None
    presigned_url: str | None = None


class Manifest(BaseModel):
    """`hf-model-manifest/v1`: every current file of a model."""

    schema_: str = Field("hf-model-manifest/v1", alias="schema", serialization_alias="schema")
    repo_id: str
    updated_ts: int
    files: list[ManifestFile]

    model_config = {"populate_by_name": True}


class ChangeItem(BaseModel):
    """A model changed at last_update_ts."""

    repo_id: str = Field(examples=["meta-llama/Llama-3-8B"])
    last_update_ts: int = Field(examples=[1711972800])


class ChangeList(BaseModel):
    """Rows with last_update_ts > since, oldest first."""

    items: list[ChangeItem]
