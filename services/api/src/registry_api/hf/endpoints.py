"""HTTP: /hf — the Hugging Face Hub's contract, so that `huggingface_hub`, `hf` and `transformers` work with
`HF_ENDPOINT=<api>/hf` and the user's key as token (`Authorization: Bearer sk_live_...`).

Errors carry the Hub's `X-Error-Code` (`RepoNotFound`, `RevisionNotFound`, `EntryNotFound`, ...) so the
client raises its specific exception; what a caller may not see is `RepoNotFound` (404), as on /v1.
`resolve` is the hot path: its HEAD and GET are answered ahead of routing by `HfResolve` (the documented
route below describes it and answers the same).
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Annotated, Any
from urllib.parse import unquote, urlencode

import orjson
import psycopg
from fastapi import APIRouter, Depends, Form, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from psycopg_pool import PoolTimeout
from starlette.types import ASGIApp, Receive, Scope, Send

from registry_api.auth import (
    CatalogReader,
    Principal,
    api_key_header,
    bearer_header,
    catalog_principal,
    presented_key,
)
from registry_api.catalog import repository as catalog_repository
from registry_api.catalog.visibility import visibility_params
from registry_api.dev import service as dev_service
from registry_api.dev.schemas import ModelIn
from registry_api.errors import ApiError, describe_error
from registry_api.hf import repository, service
from registry_api.hf.schemas import (
    CommitOut,
    PreuploadIn,
    PreuploadOut,
    RepoCreateIn,
    RepoCreateOut,
    ValidateYamlIn,
    WhoAmIOut,
)
from registry_api.hf.service import HfError, error_headers

PREFIX = "/hf"
EMPTY_BLOB_ID = "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"  # git's id of the empty blob
_PAGE_MAX = 1000


def _error_response(exc: ApiError) -> Response:
    return Response(
        orjson.dumps({**getattr(exc, "body", {}), "detail": exc.detail}),
        status_code=exc.status_code,
        media_type="application/json",
        headers=error_headers(exc),
    )


class HubRoute(APIRoute):
    """Answers every error of a /hf route with the Hub's `X-Error-Code` / `X-Error-Message` headers."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def run(request: Request) -> Response:
            try:
                return await handler(request)
            except ApiError as exc:
                return _error_response(exc)
            except RequestValidationError as exc:
                detail = "; ".join(describe_error(e) for e in exc.errors()[:5]) or "invalid request"
                return _error_response(HfError(422, "BadRequest", detail))

        return run


router = APIRouter(prefix=PREFIX, tags=["Hugging Face Hub"], route_class=HubRoute)


def base_url(request: Request) -> str:
    """The absolute URL of /hf as the caller reached it (links and hrefs are absolute)."""
    return str(request.base_url).rstrip("/") + PREFIX


def _raw_segments(request: Request, after: str) -> list[str]:
    """The still-encoded path segments after `PREFIX + after` (an encoded '/' stays inside its segment)."""
    raw = request.scope.get("raw_path", b"").decode("latin-1").split("?", 1)[0]
    return raw[len(PREFIX + after) :].split("/")


def _repo_and_rest(request: Request, after: str, kind: str) -> tuple[str, list[str]]:
    """`{namespace}/{name}/{kind}/...` after `after`: (repo_id, decoded segments after `kind`)."""
    seg = _raw_segments(request, after)
    if len(seg) < 3 or seg[2] != kind:
        raise service.repo_not_found()
    return f"{unquote(seg[0])}/{unquote(seg[1])}", [unquote(s) for s in seg[3:]]


def _revision_and_path(rest: list[str]) -> tuple[str, str]:
    if not rest or not rest[0]:
        raise HfError(404, "RevisionNotFound", "no revision given")
    tail = [s for s in rest[1:] if s != ""]
    if any("/" in s for s in rest[1:]):
        # list_repo_tree quotes the whole path with safe="": a '/' encoded in one segment is the path's own.
        tail = "/".join(rest[1:]).split("/")
    path = "/".join(tail)
    return rest[0], service.check_path(path) if path else ""


# ---------------------------------------------------------------- resolve (documented; HfResolve answers it)


async def resolve_answer(app: Any, principal: Principal, raw_tail: str, head: bool, host: str) -> Response:
    """The resolve rule: the verified file → a redirect to its presigned GET, and a counted download."""
    repo_id, revision, path = service.parse_resolve_path(raw_tail)
    row = await service.resolve_file(app, principal, repo_id, revision, path)
    settings = service._hf_settings(app)
    url = app.state.presigner.get_url(row["object_key"], settings.url_expires)
    app.state.access.record_download(principal.user_id, row["repo_id"], row["version"], row["rfilename"], row["size"])
    etag = f'"{row["sha256"]}"'
    headers = {
        "X-Repo-Commit": row["commit"],
        "X-Linked-Etag": etag,
        "X-Linked-Size": str(row["size"]),
        "ETag": etag,
        "Location": url,
        "Accept-Ranges": "bytes",
    }
    if head and service.host_of(url) == host:
        # The object store shares the api's host name: a client that follows same-host redirects itself
        # would land on the store and lose these headers, so the metadata is answered here, not redirected.
        return Response(status_code=200, headers={**headers, "Content-Length": str(row["size"])})
    return Response(status_code=302, headers=headers)


_RESOLVE_PATH = "/{namespace}/{name}/resolve/{revision}/{path:path}"
_RESOLVE_DOC = dict(
    summary="Resolve a file (redirect to its presigned GET)",
    description="Answers 302 to a presigned GET of the verified object with `X-Repo-Commit`, `X-Linked-Etag` "
    "(sha256), `X-Linked-Size`, `ETag` and `Location` (HEAD on the api's own host name: 200 with the same "
    "headers). Each answer is one counted download. `revision`: `main`, a version name or a commit id.",
)


@router.get(_RESOLVE_PATH, operation_id="hf_resolve_get", status_code=302, **_RESOLVE_DOC)
@router.head(_RESOLVE_PATH, operation_id="hf_resolve_head", status_code=302, **_RESOLVE_DOC)
async def resolve(
    namespace: str, name: str, revision: str, path: str, request: Request, principal: CatalogReader
) -> Response:
    raw = request.scope.get("raw_path", b"").decode("latin-1")[len(PREFIX) + 1 :]
    return await resolve_answer(
        request.app, principal, raw, request.method == "HEAD", _host(request.headers.get("host"))
    )


def _host(value: str | None) -> str:
    host = (value or "").lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if ":" in host else host


class HfResolve:
    """Answers HEAD/GET `/hf/{namespace}/{name}/resolve/...` ahead of routing (the hot path of every
    `hf_hub_download`); every other request passes on unchanged."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if scope["type"] != "http" or scope["method"] not in ("GET", "HEAD") or not path.startswith("/hf/"):
            await self.app(scope, receive, send)
            return
        raw = scope.get("raw_path") or path.encode()
        tail = raw.decode("latin-1").split("?", 1)[0][len(PREFIX) + 1 :]
        parts = tail.split("/", 3)
        if len(parts) < 4 or parts[0] == "api" or parts[2] != "resolve":
            await self.app(scope, receive, send)
            return
        scope["route_template"] = PREFIX + _RESOLVE_PATH  # the metrics' route label (registry_shared.metrics)
        try:
            response = await self._answer(scope, tail)
        except ApiError as exc:
            response = _error_response(exc)
        except (psycopg.OperationalError, PoolTimeout):
            response = _error_response(HfError(503, "Unavailable", "database unavailable"))
        await response(scope, receive, send)

    async def _answer(self, scope: Scope, tail: str) -> Response:
        api_key = admin_token = authorization = host = None
        for name, value in scope["headers"]:
            if name == b"x-api-key":
                api_key = value.decode("latin-1")
            elif name == b"authorization":
                authorization = value.decode("latin-1")
            elif name == b"x-admin-token":
                admin_token = value.decode("latin-1")
            elif name == b"host":
                host = value.decode("latin-1")
        app = scope["app"]
        principal = await catalog_principal(app, presented_key(api_key, authorization), admin_token)
        return await resolve_answer(app, principal, tail, scope["method"] == "HEAD", _host(host))


# ---------------------------------------------------------------- the read API


@router.get("/api/whoami-v2", response_model=WhoAmIOut, summary="Who am I (the key's user)")
async def whoami(principal: CatalogReader) -> WhoAmIOut:
    role = "write" if principal.role in ("developer", "admin") else "read"
    return WhoAmIOut(
        id=str(principal.user_id),
        name=principal.email.split("@", 1)[0] or principal.name or "admin",
        fullname=principal.name,
        email=principal.email,
        auth={"type": "access_token", "accessToken": {"displayName": "registry api key", "role": role}},
    )


def _link(request: Request, params: dict[str, Any]) -> dict[str, str]:
    url = str(request.url.replace(query=urlencode(params, doseq=True)))
    return {"Link": f'<{url}>; rel="next"'}


@router.get("/api/models", summary="List models (search, author, limit; Link pagination)")
async def list_models(
    request: Request,
    principal: CatalogReader,
    search: Annotated[str | None, Query(max_length=200)] = None,
    author: Annotated[str | None, Query(max_length=96)] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = _PAGE_MAX,
    cursor: Annotated[int, Query(ge=0, le=10_000_000, description="Offset of the page (from the Link header).")] = 0,
) -> Response:
    page = min(limit, _PAGE_MAX)
    async with request.app.state.pool.connection() as conn:
        rows = await catalog_repository.list_models(
            conn, visibility_params(principal), search, None, page + 1, cursor, namespace=author
        )
    headers = {}
    if len(rows) > page:
        rows = rows[:page]
        headers = _link(request, {**dict(request.query_params), "cursor": cursor + page})
    body = [service.model_json(r, None, None) for r in rows]
    return Response(orjson.dumps(body), media_type="application/json", headers=headers)


async def _info(request: Request, principal: Principal, repo_id: str, revision: str, blobs: bool) -> dict:
    async with request.app.state.pool.connection() as conn:
        model = await service.model_for(conn, principal, repo_id)
        if revision == "main" and await service.main_revision(conn, model["id"]) is None:
            return service.model_json(model, None, [], blobs)  # an empty repository
        rev = await service.resolve_revision(conn, model, revision)
        files = await repository.revision_files(conn, model["id"], rev.version_id)
    return service.model_json(model, rev, files, blobs)


@router.get("/api/models/{namespace}/{name}", summary="Model info (main)")
async def model_info(
    namespace: str, name: str, request: Request, principal: CatalogReader, blobs: bool = False
) -> Response:
    doc = await _info(request, principal, f"{namespace}/{name}", "main", blobs)
    return Response(orjson.dumps(doc), media_type="application/json")


@router.get("/api/models/{namespace}/{name}/revision/{revision:path}", summary="Model info at a revision")
async def model_info_revision(request: Request, principal: CatalogReader, blobs: bool = False) -> Response:
    repo_id, rest = _repo_and_rest(request, "/api/models/", "revision")
    doc = await _info(request, principal, repo_id, "/".join(rest), blobs)
    return Response(orjson.dumps(doc), media_type="application/json")


@router.get("/api/models/{namespace}/{name}/tree/{rest:path}", summary="Files and folders of a revision")
async def tree(
    request: Request,
    principal: CatalogReader,
    recursive: bool = False,
    cursor: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
    limit: Annotated[int, Query(ge=1, le=_PAGE_MAX)] = _PAGE_MAX,
) -> Response:
    repo_id, rest = _repo_and_rest(request, "/api/models/", "tree")
    revision, under = _revision_and_path(rest)
    async with request.app.state.pool.connection() as conn:
        model = await service.model_for(conn, principal, repo_id)
        rev = await service.resolve_revision(conn, model, revision)
        files = await repository.revision_files(conn, model["id"], rev.version_id)
    entries = service.tree_entries(files, rev.sha, under, recursive)
    if under and not entries:
        raise HfError(404, "EntryNotFound", f'{under} does not exist on "{revision}"', commit=rev.sha)
    page, headers = entries[cursor : cursor + limit], {"X-Repo-Commit": rev.sha}
    if cursor + limit < len(entries):
        headers.update(_link(request, {**dict(request.query_params), "cursor": cursor + limit}))
    return Response(orjson.dumps(page), media_type="application/json", headers=headers)


@router.post("/api/models/{namespace}/{name}/paths-info/{revision:path}", summary="Information on given paths")
async def paths_info(
    request: Request,
    principal: CatalogReader,
    paths: Annotated[list[str], Form(max_length=1000)],
    expand: Annotated[str | None, Form()] = None,
) -> Response:
    repo_id, rest = _repo_and_rest(request, "/api/models/", "paths-info")
    async with request.app.state.pool.connection() as conn:
        model = await service.model_for(conn, principal, repo_id)
        rev = await service.resolve_revision(conn, model, "/".join(rest))
        files = await repository.revision_files(conn, model["id"], rev.version_id)
    wanted = {service.check_path(p.strip("/")) for p in paths}
    everything = service.tree_entries(files, rev.sha, "", recursive=True)
    found = [e for e in everything if e["path"] in wanted]
    return Response(orjson.dumps(found), media_type="application/json", headers={"X-Repo-Commit": rev.sha})


# ---------------------------------------------------------------- the write API


async def _writer(
    request: Request,
    x_api_key: Annotated[str | None, Depends(api_key_header)],
    bearer: Annotated[Any, Depends(bearer_header)],
) -> Principal:
    from registry_api.auth import principal_for_key

    key = x_api_key or (bearer.credentials if bearer is not None else None)
    if not key:
        raise HfError(401, "Unauthorized", "missing token (Authorization: Bearer sk_live_...)")
    return await principal_for_key(request.app, key)


Writer = Annotated[Principal, Depends(_writer)]


@router.post("/api/repos/create", response_model=RepoCreateOut, summary="Create a model repository")
async def create_repo(body: RepoCreateIn, request: Request, principal: Writer) -> RepoCreateOut:
    if principal.role not in ("developer", "admin"):
        raise HfError(403, "Forbidden", "developer role required")
    if not body.organization:
        raise HfError(400, "BadRequest", "give the repository as namespace/name")
    repo_id = f"{body.organization}/{body.name}"
    private = body.private if body.private is not None else body.visibility != "public"
    try:
        model_in = ModelIn(repo_id=repo_id, model_name=body.name, visibility="private" if private else "public")
    except ValueError:
        raise HfError(400, "BadRequest", "invalid repository name: letters, digits, '-', '_', '.'") from None
    async with request.app.state.pool.connection() as conn:
        try:
            row = await dev_service.create_model(conn, principal, model_in)
        except ApiError as exc:
            if exc.status_code == 409:
                url = f"{base_url(request)}/{repo_id}"  # the client reads it when exist_ok
                raise HfError(409, "RepoExists", "You already created this model repo", body={"url": url}) from None
            raise
    return RepoCreateOut(url=f"{base_url(request)}/{repo_id}", name=repo_id, id=str(row["id"]))


@router.post(
    "/api/models/{namespace}/{name}/preupload/{revision:path}", response_model=PreuploadOut, summary="Upload modes"
)
async def preupload(namespace: str, name: str, body: PreuploadIn, request: Request, principal: Writer) -> PreuploadOut:
    repo_id = f"{namespace}/{name}"
    async with request.app.state.pool.connection() as conn:
        model = await service.owned_model(conn, principal, repo_id)
        parent = await service.main_revision(conn, model["id"])
        files = await repository.revision_files(conn, model["id"], parent.version_id) if parent else []
    current = {f["rfilename"]: f for f in files}
    out = []
    for f in body.files:
        path = service.check_path(f.path)
        # The client compares `oid` with its own: the sha256 for LFS files, the git blob id for the empty
        # files it always sends inline.
        have = current.get(path)
        oid = None if have is None else (EMPTY_BLOB_ID if have["size"] == 0 else have["sha256"])
        out.append({"path": path, "uploadMode": "lfs", "shouldIgnore": False, "oid": oid})
    return PreuploadOut(files=out, commitOid=parent.sha if parent else None)


@router.post("/{namespace}/{name}.git/info/lfs/objects/batch", summary="Git LFS batch API (upload)")
async def lfs_batch(namespace: str, name: str, request: Request, principal: Writer) -> Response:
    try:
        body = orjson.loads(await request.body())
    except orjson.JSONDecodeError:
        raise HfError(400, "BadRequest", "invalid JSON body") from None
    if not isinstance(body, dict):
        raise HfError(400, "BadRequest", "expected a JSON object")
    out = await service.lfs_batch(request.app, principal, f"{namespace}/{name}", body, base_url(request))
    return Response(orjson.dumps(out), media_type="application/vnd.git-lfs+json")


@router.post("/api/lfs/complete/{token}", summary="Complete a multipart LFS upload (the URL authorizes itself)")
async def lfs_complete(token: str, request: Request) -> Response:
    try:
        body = orjson.loads(await request.body())
    except orjson.JSONDecodeError:
        raise HfError(400, "BadRequest", "invalid JSON body") from None
    if not isinstance(body, dict):
        raise HfError(400, "BadRequest", "expected a JSON object")
    return Response(
        orjson.dumps(await service.complete_multipart(request.app, token, body)), media_type="application/json"
    )


@router.post(
    "/api/models/{namespace}/{name}/commit/{revision:path}", response_model=CommitOut, summary="Commit (ndjson)"
)
async def commit(request: Request, principal: Writer) -> Response:
    repo_id, rest = _repo_and_rest(request, "/api/models/", "commit")
    limit = service._hf_settings(request.app).commit_max_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise HfError(413, "PayloadTooLarge", f"commit body above {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HfError(413, "PayloadTooLarge", f"commit body above {limit} bytes")
    out = await service.commit(request.app, principal, repo_id, "/".join(rest), bytes(body), base_url(request))
    return Response(orjson.dumps(out), media_type="application/json")


@router.post("/api/validate-yaml", summary="Check a model card's YAML header")
async def validate_yaml(body: ValidateYamlIn, principal: Writer) -> dict[str, Any]:
    import yaml

    content = body.content
    if content.startswith("---"):
        end = content.find("\n---", 3)
        problem = None
        if end == -1:
            problem = "the YAML header is not closed with ---"
        else:
            try:
                meta = yaml.safe_load(content[3:end])
            except yaml.YAMLError as exc:
                problem = f"invalid YAML: {exc}"
            else:
                if meta is not None and not isinstance(meta, dict):
                    problem = "the YAML header must be a mapping"
        if problem is not None:
            # the client lists `errors[].message` in the ValueError it raises
            raise HfError(400, "InvalidYaml", problem, body={"errors": [{"message": problem}], "warnings": []})
    return {"errors": [], "warnings": []}


@router.get(
    "/api/models/{namespace}/{name}/xet-write-token/{revision:path}",
    operation_id="hf_xet_write_token",
    summary="Xet (not supported)",
)
@router.get(
    "/api/models/{namespace}/{name}/xet-read-token/{revision:path}",
    operation_id="hf_xet_read_token",
    summary="Xet (not supported)",
)
async def xet_token(namespace: str, name: str, revision: str) -> Response:
    raise HfError(
        501,
        "XetNotSupported",
        "this registry stores files through Git LFS, not Xet: set HF_HUB_DISABLE_XET=1 in the client's environment",
    )
