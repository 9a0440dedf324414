"""`RegistryClient`: the Model Registry's HTTP API as Python methods.

Every method returns the API's JSON (dicts and lists, as documented in /openapi.json) and raises
`RegistryError` (with the API's `detail` and status) for anything else.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from registry_client.errors import ExitCode, RegistryError

DEFAULT_URL = "http://localhost:8081"
DEFAULT_TIMEOUT = httpx.Timeout(30.0, connect=10.0)
# Transfers to and from storage: no overall deadline, but a stalled read or write fails.
TRANSFER_TIMEOUT = httpx.Timeout(connect=10.0, read=120.0, write=120.0, pool=None)


def _path(value: str) -> str:
    """A repo_id or rfilename in a URL path (its '/' kept: the API's routes take them as paths)."""
    return quote(value, safe="/")


def error_detail(response: httpx.Response) -> str:
    """What went wrong, on one line: the API's `{"detail": ...}` when there is one."""
    try:
        body = response.json()
    except ValueError:
        body = None
    detail = body.get("detail") if isinstance(body, dict) else None
    if isinstance(detail, list):  # FastAPI's validation errors: [{"loc": [...], "msg": ...}, ...]
        parts = []
        for item in detail:
            if isinstance(item, dict):
                loc = ".".join(str(x) for x in item.get("loc", []) if x not in ("body", "query", "path"))
                parts.append(f"{loc}: {item.get('msg', '')}" if loc else str(item.get("msg", "")))
            else:
                parts.append(str(item))
        detail = "; ".join(parts)
    if not detail:
        text = response.text.strip().splitlines()
        detail = text[0][:200] if text else response.reason_phrase
    return str(detail)


class RegistryClient:
    """A client of one registry.

    `api_key` authenticates users (`x-api-key`), `admin_token` the admin endpoints (`x-admin-token`).
    Use it as a context manager, or call `close()`.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        api_key: str | None = None,
        *,
        admin_token: str | None = None,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        transfer_timeout: httpx.Timeout = TRANSFER_TIMEOUT,
        max_connections: int = 16,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.admin_token = admin_token
        self.http = httpx.Client(base_url=self.base_url, timeout=timeout, headers={"user-agent": "registry-client"})
        self._transfer_args = (transfer_timeout, max_connections)
        self._transfer: httpx.Client | None = None
        self._transfer_lock = threading.Lock()

    @property
    def transfer(self) -> httpx.Client:
        """The client for presigned URLs of the storage: a separate pool, no API headers. Made on first use (its
        TLS context costs a tenth of a second of start-up, and downloads do not use it)."""
        with self._transfer_lock:
            if self._transfer is None:
                timeout, n = self._transfer_args
                limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
                self._transfer = httpx.Client(timeout=timeout, limits=limits, follow_redirects=True)
            return self._transfer

    def close(self) -> None:
        self.http.close()
        if self._transfer is not None:
            self._transfer.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ plumbing

    def request(self, method: str, path: str, *, admin: bool = False, auth: bool = True, **kwargs: Any) -> Any:
        """One API call; the JSON answer, or RegistryError."""
        headers = kwargs.pop("headers", {})
        if admin:
            if not self.admin_token:
                raise RegistryError("admin token missing: set REGISTRY_ADMIN_TOKEN", exit_code=ExitCode.AUTH)
            headers["x-admin-token"] = self.admin_token
        elif auth:
            if not self.api_key:
                raise RegistryError("no API key: run `registry login` or set REGISTRY_API_KEY", exit_code=ExitCode.AUTH)
            headers["x-api-key"] = self.api_key
        if "params" in kwargs:
            kwargs["params"] = {k: v for k, v in kwargs["params"].items() if v is not None}
        try:
            response = self.http.request(method, path, headers=headers, **kwargs)
        except httpx.HTTPError as exc:
            raise RegistryError(f"cannot reach the registry at {self.base_url}: {exc}") from exc
        if response.status_code >= 400:
            raise RegistryError(error_detail(response), response.status_code)
        if not response.content:
            return None
        return response.json()

    # ------------------------------------------------------------------ users

    def register(self, email: str, name: str) -> dict:
        """Self-registration: a new developer and its API key."""
        return self.request("POST", "/v1/users/register", auth=False, json={"email": email, "name": name})

    def whoami(self) -> dict:
        return self.request("GET", "/v1/users/me")

    def rotate_key(self) -> dict:
        return self.request("POST", "/v1/users/rotate-key")

    # ------------------------------------------------------------------ catalog

    def list_models(self, q: str | None = None, limit: int = 100, offset: int = 0) -> dict:
        return self.request("GET", "/v1/models", params={"q": q, "limit": limit, "offset": offset})

    def get_model(self, repo_id: str) -> dict:
        return self.request("GET", f"/v1/models/{_path(repo_id)}")

    def list_files(self, repo_id: str, presign: bool = False, expires: int | None = None) -> dict:
        params = {"presign": str(presign).lower(), "expires": expires}
        return self.request("GET", f"/v1/models/{_path(repo_id)}/files", params=params)

    def manifest(self, repo_id: str, presign: bool = False, expires: int | None = None) -> dict:
        params = {"presign": str(presign).lower(), "expires": expires}
        return self.request("GET", f"/v1/manifest/{_path(repo_id)}", params=params)

    def platform_manifest(self, presign: bool = False, expires: int | None = None) -> dict:
        params = {"presign": str(presign).lower(), "expires": expires}
        return self.request("GET", "/v1/platform/manifest", params=params)

    def download_url(self, repo_id: str, rfilename: str, version: str | None = None, expires: int = 3600) -> dict:
        """A presigned GET URL for one file (a counted download), with its size and sha256."""
        return self.request(
            "GET",
            f"/v1/files/{_path(repo_id)}/{_path(rfilename)}/download",
            params={"version": version, "expires": expires},
        )

    def changes(self, since: int, limit: int = 500) -> dict:
        return self.request("GET", "/v1/changes", params={"since": since, "limit": limit})

    # ------------------------------------------------------------------ developers

    def create_model(
        self, repo_id: str, model_name: str | None = None, visibility: str = "private", **meta: Any
    ) -> dict:
        body = {"repo_id": repo_id, "model_name": model_name or repo_id.split("/")[-1], "visibility": visibility}
        body.update({k: v for k, v in meta.items() if v is not None})
        return self.request("POST", "/v1/dev/models", json=body)

    def my_models(self) -> dict:
        return self.request("GET", "/v1/dev/models")

    def list_versions(self, repo_id: str) -> dict:
        return self.request("GET", f"/v1/dev/models/{_path(repo_id)}/versions")

    def create_version(self, repo_id: str, version: str) -> dict:
        return self.request("POST", f"/v1/dev/models/{_path(repo_id)}/versions", json={"version": version})

    def initiate_upload(self, repo_id: str, version: str, rfilename: str, expires: int = 3600) -> dict:
        """A single-PUT upload: `url` is where the bytes go."""
        return self.request(
            "POST",
            f"/v1/dev/models/{_path(repo_id)}/versions/{_path(version)}/uploads/initiate",
            params={"filename": rfilename, "expires": expires},
        )

    def complete_upload(self, repo_id: str, version: str, rfilename: str, size: int, sha256: str) -> dict:
        return self.request(
            "POST",
            f"/v1/dev/models/{_path(repo_id)}/versions/{_path(version)}/uploads/complete",
            json={"rfilename": rfilename, "size": size, "sha256": sha256},
        )

    def list_uploads(self, repo_id: str, version: str) -> dict:
        return self.request("GET", f"/v1/dev/models/{_path(repo_id)}/versions/{_path(version)}/uploads")

    def get_upload(self, upload_id: int) -> dict:
        return self.request("GET", f"/v1/dev/uploads/{upload_id}")

    def wait_for_verdict(self, upload_id: int, timeout: float = 600.0, interval: float = 0.25) -> dict:
        """Poll an upload until ingest's verdict is in (`available`, `rejected` or `expired`)."""
        deadline = time.monotonic() + timeout
        while True:
            upload = self.get_upload(upload_id)
            if upload["status"] not in ("initiated", "pending_verification"):
                return upload
            if time.monotonic() > deadline:
                raise RegistryError(
                    f"no verdict for upload {upload_id} after {timeout:.0f}s (still {upload['status']}); "
                    "check later with the same command"
                )
            time.sleep(interval)
            interval = min(interval * 1.5, 2.0)

    # ------------------------------------------------------------------ multipart uploads

    def initiate_multipart(self, repo_id: str, version: str, rfilename: str, size: int, part_size: int) -> dict:
        """Open a multipart upload of `size` bytes in parts of `part_size`: `upload_id`, `part_size`, `part_count`."""
        return self.request(
            "POST",
            f"/v1/dev/models/{_path(repo_id)}/versions/{_path(version)}/uploads/multipart",
            json={"rfilename": rfilename, "size": size, "part_size": part_size},
        )

    def part_urls(self, upload_id: int, part_numbers: list[int], expires: int = 3600) -> dict[int, str]:
        """Presigned PUT URLs of the given parts (signed anew at every call; at most 1,000 at a time)."""
        body = self.request(
            "POST", f"/v1/dev/uploads/{upload_id}/parts", json={"part_numbers": part_numbers, "expires": expires}
        )
        return {int(p["part_number"]): p["url"] for p in body["parts"]}

    def list_parts(self, upload_id: int) -> dict:
        """The upload's `status`, `part_size`, `part_count` and the `parts` already stored (`part_number`,
        `etag`, `size`); `parts` is empty once the upload is no longer `initiated`."""
        return self.request("GET", f"/v1/dev/uploads/{upload_id}/parts")

    def complete_multipart(self, upload_id: int, parts: list[dict], size: int, sha256: str) -> dict:
        """Assemble the parts (`part_number`, `etag`) and declare the file's size and sha256."""
        return self.request(
            "POST",
            f"/v1/dev/uploads/{upload_id}/complete",
            json={"parts": parts, "size": size, "sha256": sha256},
        )

    def abort_multipart(self, upload_id: int) -> dict:
        return self.request("DELETE", f"/v1/dev/uploads/{upload_id}")

    # ------------------------------------------------------------------ usage

    def usage(self, since: int | None = None, until: int | None = None, top_models_limit: int | None = None) -> dict:
        params = {"since": since, "until": until, "top_models_limit": top_models_limit}
        return self.request("GET", "/v1/users/me/usage", params=params)

    def admin_usage(self, since: int | None = None, until: int | None = None, **filters: Any) -> dict:
        return self.request("GET", "/v1/admin/usage", admin=True, params={"since": since, "until": until, **filters})

    # ------------------------------------------------------------------ admins

    def create_user(self, email: str, name: str, role: str) -> dict:
        return self.request("POST", "/v1/admin/users", admin=True, json={"email": email, "name": name, "role": role})

    def list_users(self, role: str | None = None, email: str | None = None, limit: int = 100, offset: int = 0) -> dict:
        params = {"role": role, "email": email, "limit": limit, "offset": offset}
        return self.request("GET", "/v1/admin/users", admin=True, params=params)

    def list_grants(
        self,
        platform_user_id: int | None = None,
        repo_id: str | None = None,
        active: bool | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> dict:
        params = {
            "platform_user_id": platform_user_id,
            "repo_id": repo_id,
            "active": None if active is None else str(active).lower(),
            "limit": limit,
            "offset": offset,
        }
        return self.request("GET", "/v1/admin/grants", admin=True, params=params)

    def create_grant(
        self,
        platform_user_id: int,
        repo_id: str,
        permitted_from_ts: int | None = None,
        permitted_until_ts: int | None = None,
    ) -> dict:
        body: dict[str, Any] = {
            "platform_user_id": platform_user_id,
            "repo_id": repo_id,
            "permitted_from_ts": int(time.time()) if permitted_from_ts is None else permitted_from_ts,
        }
        if permitted_until_ts is not None:
            body["permitted_until_ts"] = permitted_until_ts
        return self.request("POST", "/v1/admin/grants", admin=True, json=body)

    def get_grant(self, grant_id: int) -> dict:
        return self.request("GET", f"/v1/admin/grants/{grant_id}", admin=True)

    def update_grant(
        self, grant_id: int, permitted_from_ts: int | None = None, permitted_until_ts: int | None = None
    ) -> dict:
        body = {
            k: v
            for k, v in (("permitted_from_ts", permitted_from_ts), ("permitted_until_ts", permitted_until_ts))
            if v is not None
        }
        if not body:
            raise RegistryError("nothing to change: give --from and/or --until", exit_code=ExitCode.USAGE)
        return self.request("PATCH", f"/v1/admin/grants/{grant_id}", admin=True, json=body)

    def revoke_grant(self, grant_id: int) -> dict:
        return self.request("DELETE", f"/v1/admin/grants/{grant_id}", admin=True)

    # ------------------------------------------------------------------ transfers

    def upload(self, repo_id: str, paths: Iterable[str | Path], version: str, **options: Any) -> list[dict]:
        """Upload files or whole folders (relative paths kept) to a version; see `registry_client.upload`."""
        from registry_client.upload import Uploader, UploadOptions

        return Uploader(self, UploadOptions(**options)).upload(repo_id, version, paths)

    def download(
        self, repo_id: str, version: str | None = None, local_dir: str | Path | None = None, **options: Any
    ) -> list[dict]:
        """Download a model's files, verified; see `registry_client.download`."""
        from registry_client.download import Downloader, DownloadOptions

        return Downloader(self, DownloadOptions(**options)).download(repo_id, version, local_dir)
