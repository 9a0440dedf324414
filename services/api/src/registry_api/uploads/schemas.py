"""Bodies of the multipart upload endpoints."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from registry_api.kit.schemas import RequestBody

MIB = 1024 * 1024
GIB = 1024 * MIB
#: S3's rules: every part but the last is 5 MiB to 5 GiB; at most 10,000 parts; objects up to 5 TiB.
PART_SIZE_MIN = 5 * MIB
PART_SIZE_MAX = 5 * GIB
PARTS_MAX = 10_000
OBJECT_SIZE_MAX = 5 * 1024 * GIB
#: Part URLs per signing request.
SIGN_BATCH_MAX = 1000
#: Lifetime of part URLs (seconds): a short one is allowed, part URLs are re-signed at will.
PART_EXPIRES_MIN = 1
PART_EXPIRES_MAX = 7 * 86400
PART_EXPIRES_DEFAULT = 3600

_SHA = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
_ETAG = "5d41402abc4b2a76b9719d911017c592"


class MultipartIn(RequestBody):
    """A file to upload in parts: its name in the version, its size, and optionally the part size."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"rfilename": "model-00001-of-00002.gguf", "size": 4294967296, "part_size": 67108864}]
        }
    )

    rfilename: str = Field(min_length=1, max_length=1024, examples=["model-00001-of-00002.gguf"])
    size: int = Field(
        ge=1, le=OBJECT_SIZE_MAX, description="The file's exact size in bytes (at most 5 TiB).", examples=[4294967296]
    )
    part_size: int | None = Field(
        None,
        ge=PART_SIZE_MIN,
        le=PART_SIZE_MAX,
        description="Bytes per part, 5 MiB to 5 GiB; every part but the last has exactly this size. Default: "
        "64 MiB, or more if the file would otherwise need more than 10,000 parts.",
        examples=[67108864],
    )


class MultipartOut(BaseModel):
    """A multipart upload: how the file is cut into parts, and where it stands."""

    upload_id: int = Field(examples=[42])
    repo_id: str = Field(examples=["acme/llama-gguf"])
    version: str = Field(examples=["v1"])
    rfilename: str = Field(examples=["model-00001-of-00002.gguf"])
    object_key: str = Field(examples=["uploads/acme/llama-gguf/v1/model-00001-of-00002.gguf"])
    status: Literal["initiated", "pending_verification", "available", "rejected", "expired", "aborted"] = Field(
        examples=["initiated"]
    )
    size: int = Field(description="The file's size declared at initiate.", examples=[4294967296])
    part_size: int = Field(description="Bytes of every part but the last.", examples=[67108864])
    part_count: int = Field(description="Parts 1..part_count make the file.", examples=[64])
    last_part_size: int = Field(description="Bytes of part `part_count`.", examples=[67108864])
    created_ts: int = Field(examples=[1764990000])


class SignIn(RequestBody):
    """Which parts to sign (at most 1,000 per request; ask again for more, or when URLs have expired)."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"part_numbers": [1, 2, 3], "expires": 3600}]})

    part_numbers: list[int] = Field(
        min_length=1, max_length=SIGN_BATCH_MAX, description="Part numbers, 1..part_count.", examples=[[1, 2, 3]]
    )
    expires: int = Field(
        PART_EXPIRES_DEFAULT,
        ge=PART_EXPIRES_MIN,
        le=PART_EXPIRES_MAX,
        description="Seconds the URLs stay valid.",
        examples=[3600],
    )


class PartUrl(BaseModel):
    """Where to PUT one part's bytes (straight to object storage). Keep the `ETag` header of the answer."""

    part_number: int = Field(examples=[1])
    size: int = Field(description="Exactly this many bytes go into the part.", examples=[67108864])
    method: Literal["PUT"] = "PUT"
    url: str = Field(
        examples=["http://127.0.0.1:19000/models/uploads/acme/...?partNumber=1&uploadId=...&X-Amz-Signature=..."]
    )


class SignOut(BaseModel):
    """Presigned part URLs."""

    upload_id: int = Field(examples=[42])
    expires_in: int = Field(examples=[3600])
    parts: list[PartUrl]


class StoredPart(BaseModel):
    """A part object storage holds (from S3 ListParts)."""

    part_number: int = Field(examples=[1])
    etag: str = Field(description="The part's ETag (quotes removed).", examples=[_ETAG])
    size: int = Field(examples=[67108864])
    last_modified: int | None = Field(None, description="Epoch seconds.", examples=[1764990100])


class PartsOut(BaseModel):
    """The parts stored so far: a client resumes by uploading only the others."""

    upload_id: int = Field(examples=[42])
    status: str = Field(examples=["initiated"])
    size: int = Field(examples=[4294967296])
    part_size: int = Field(examples=[67108864])
    part_count: int = Field(examples=[64])
    parts: list[StoredPart]


class PartIn(RequestBody):
    """One part as the client uploaded it: its number and the ETag object storage answered."""

    part_number: int = Field(ge=1, le=PARTS_MAX, examples=[1])
    etag: str = Field(
        min_length=1, max_length=200, description="The part PUT's `ETag` header (quotes optional).", examples=[_ETAG]
    )


class MultipartCompleteIn(RequestBody):
    """The whole file: every part in order, plus the size and sha256 ingest checks the assembled object against."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "parts": [
                        {"part_number": 1, "etag": _ETAG},
                        {"part_number": 2, "etag": "7d793037a0760186574b0282f2f435e7"},
                    ],
                    "size": 73400320,
                    "sha256": _SHA,
                }
            ]
        }
    )

    parts: list[PartIn] = Field(
        min_length=1,
        max_length=PARTS_MAX,
        description="Parts 1..part_count, each once, in order.",
        examples=[[{"part_number": 1, "etag": _ETAG}]],
    )
    size: int = Field(ge=1, le=OBJECT_SIZE_MAX, examples=[4294967296])
    sha256: str = Field(pattern=r"^[0-9a-fA-F]{64}$", examples=[_SHA])
