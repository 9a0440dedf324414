"""Validation of the identifiers that appear in paths."""

from __future__ import annotations

import re
import unicodedata
from typing import Annotated

from fastapi import Path

from registry_api.errors import Unprocessable
from registry_shared.storage import QUARANTINE_PREFIX, quarantine_key

_SEGMENT = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,95})"
REPO_ID_RE = re.compile(rf"^{_SEGMENT}/{_SEGMENT}$")
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")
REPO_ID_PATTERN = REPO_ID_RE.pattern
VERSION_PATTERN = VERSION_RE.pattern

#: A repo_id in a path: the OpenAPI pattern is the one check_repo_id validates with (the api's own 422).
RepoIdPath = Annotated[
    str,
    Path(
        description="namespace/name: letters, digits, '-', '_', '.' (no '..'); any case finds the model",
        json_schema_extra={"pattern": REPO_ID_PATTERN},
        examples=["acme/finetune-bert"],
    ),
]
#: A version label in a path (check_version).
VersionPath = Annotated[
    str, Path(description="A version label", json_schema_extra={"pattern": VERSION_PATTERN}, examples=["v1"])
]

#: S3 keys are at most 1,024 bytes (UTF-8); MinIO also refuses a path segment longer than 255 bytes.
MAX_OBJECT_KEY_BYTES = 1024
MAX_KEY_SEGMENT_BYTES = 255
#: The longest key of an upload: its quarantine key (ingest moves a rejected object there) must fit too.
MAX_UPLOAD_KEY_BYTES = MAX_OBJECT_KEY_BYTES - len(QUARANTINE_PREFIX)


def check_repo_id(repo_id: str) -> str:
    """`namespace/name`: letters, digits, '-', '_', '.'; no '..'."""
    if not REPO_ID_RE.match(repo_id) or ".." in repo_id:
        raise Unprocessable("invalid repo_id: expected namespace/name of letters, digits, '-', '_', '.'")
    return repo_id


def check_version(version: str) -> str:
    """A version label: letters, digits, '.', '_', '-', '+', at most 64 characters."""
    if not VERSION_RE.match(version) or ".." in version:
        raise Unprocessable("invalid version: letters, digits, '.', '_', '-', '+' (at most 64)")
    return version


def check_rfilename(rfilename: str) -> str:
    """A file name inside a repo: may contain '/', never '..', a leading '/', a backslash or control chars."""
    if not rfilename or len(rfilename) > 1024:
        raise Unprocessable("invalid rfilename: empty or longer than 1024 characters")
    if rfilename.startswith("/") or "\\" in rfilename:
        raise Unprocessable("invalid rfilename: no leading '/' and no backslash")
    if any(unicodedata.category(ch) in ("Cc", "Cf") for ch in rfilename):
        raise Unprocessable("invalid rfilename: control characters are not allowed")
    parts = rfilename.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise Unprocessable("invalid rfilename: no '..', '.' or empty path segments")
    return rfilename


def check_object_key(object_key: str) -> str:
    """An object key the store can hold, and so can its quarantine key (ingest moves a rejected object
    there): at most 1,024 bytes in UTF-8, no path segment longer than 255 bytes. 422 otherwise, before
    anything is written, so no upload is ever opened that ingest could not verify or quarantine."""
    longest = quarantine_key(object_key).encode()
    if len(longest) > MAX_OBJECT_KEY_BYTES:
        raise Unprocessable(
            f"filename too long: its object key would be {len(longest)} bytes with the quarantine prefix"
            f" (at most {MAX_OBJECT_KEY_BYTES}); shorten the file name"
        )
    if any(len(segment.encode()) > MAX_KEY_SEGMENT_BYTES for segment in object_key.split("/")):
        raise Unprocessable(f"filename has a path segment longer than {MAX_KEY_SEGMENT_BYTES} bytes")
    return object_key
