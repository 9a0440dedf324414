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
from fastapi import APIRouter, Depends, Form, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from psycopg_pool import PoolTimeout
from starlette.types import ASGIApp, Receive, Scope, Send

from registry_api.auth import (
    CatalogReader,
    Principal,
    admin_token_header,
    api_key_header,
    bearer_header,
    catalog_principal,
    presented_key,
    principal_for_key,
)
from registry_api.catalog import repository as catalog_repository
from registry_api.catalog.visibility import visibility_params
from registry_api.dev import service as dev_service
from registry_api.dev.schemas import ModelIn
from registry_api.errors import ApiError, describe_error
from registry_api.hf import repository, service
from registry_api.hf.schemas import (
    LFS_BATCH_SCHEMA,
    LFS_COMPLETE_SCHEMA,
    CommitOut,
    HubErrorOut,
    PreuploadIn,
    PreuploadOut,
    RepoCreateIn,
    RepoCreateOut,
    ValidateYamlIn,
    WhoAmIOut,
)
from registry_api.hf.service import HfError, error_headers
from registry_api.kit.text import INVALID_JSON, body_problem, unstorable_at

PREFIX = "/hf"
EMPTY_BLOB_ID = "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"  # git's id of the empty blob
_PAGE_MAX = 1000


def _error_response(exc: ApiError) -> Response:
    return Response(
        orjson.dumps({**getattr(exc, "body", {}), "detail": exc.detail}),
        status_code=exc.status_code,
        media_type="application/json",
        headers={**(exc.headers or {}), **error_headers(exc)},  # a 429 keeps its Retry-After / RateLimit-*
    )


_ERROR_TEXT = {
    400: "Bad request (`BadRequest`, `InvalidPath`, `InvalidOid`, `PartsMismatch`, ...)",
    401: "Missing, invalid, revoked or expired key (`Unauthorized`)",
    403: "The key's role or scope may not do this (`Forbidden`: a platform user, a read-only key), or a "
    "completion URL that is invalid or expired",
    404: "`RepoNotFound` (also what a caller may not see), `RevisionNotFound`, `EntryNotFound`",
    409: "Conflicts with existing state (`RepoExists`: the body's `url` names the repository)",
    412: "`ParentCommitMismatch`: the commit's parent is not the head of main",
    413: "`PayloadTooLarge`: the commit body is above HF_COMMIT_MAX_BYTES",
    422: "Invalid parameters or body; text containing NUL (\\u0000); `invalid JSON body` for a body that "
    "is not UTF-8 JSON",
    503: "A dependency is unavailable",
}
_ERROR_HEADERS = {
    "X-Error-Code": {
        "description": "The Hub's error code (the client raises its specific exception)",
        "schema": {"type": "string"},
    },
    "X-Error-Message": {"description": "The message, on one printable line", "schema": {"type": "string"}},
}


def hub_errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` of /hf errors: the `{"detail"}` body, with the Hub's `X-Error-*` headers."""
    return {c: {"model": HubErrorOut, "description": _ERROR_TEXT[c], "headers": _ERROR_HEADERS} for c in codes}


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


async def resolve_answer(
    app: Any, principal: Principal, raw_tail: str, head: bool, host: str
) -> tuple[int, list[tuple[bytes, bytes]]]:
    """The resolve rule: the verified file → a redirect to its presigned GET, and a counted download.
    Returns (status, headers)."""
    row = await service.resolve_file(app, principal, raw_tail)
    url = app.state.presigner.get_url(row["object_key"], service._hf_settings(app).url_expires)
    app.state.access.record_download(principal.user_id, row["repo_id"], row["version"], row["rfilename"], row["size"])
    headers = [*row["fixed_headers"], (b"location", url.encode())]
    if head and host == service.store_host(app):
        # The object store shares the api's host name: a client that follows same-host redirects itself
        # would land on the store and lose these headers, so the metadata is answered here, not redirected.
        return 200, [*headers, (b"content-length", str(row["size"]).encode())]
    return 302, [*headers, (b"content-length", b"0")]


_RESOLVE_PATH = "/{namespace}/{name}/resolve/{revision}/{path:path}"
_RESOLVE_DOC = dict(
    summary="Resolve a file (redirect to its presigned GET)",
    description="Answers 302 to a presigned GET of the verified object with `X-Repo-Commit`, `X-Linked-Etag` "
    "(sha256), `X-Linked-Size`, `ETag` and `Location` (HEAD on the api's own host name: 200 with the same "
    "headers). Each answer is one counted download. `revision`: `main`, a version name or a commit id.",
    responses={
        200: {"description": "HEAD on the api's own host name: the file's headers, no body"},
        302: {"description": "Redirect (`Location`) to a presigned GET of the file"},
        **hub_errors(400, 401, 404, 422, 503),
    },
)


@router.get(_RESOLVE_PATH, operation_id="hf_resolve_get", status_code=302, **_RESOLVE_DOC)
@router.head(_RESOLVE_PATH, operation_id="hf_resolve_head", status_code=302, **_RESOLVE_DOC)
async def resolve(
    namespace: str, name: str, revision: str, path: str, request: Request, principal: CatalogReader
) -> Response:
    raw = request.scope.get("raw_path", b"").decode("latin-1").split("?", 1)[0][len(PREFIX) + 1 :]
    status, headers = await resolve_answer(
        request.app, principal, raw, request.method == "HEAD", _host(request.headers.get("host"))
    )
    response = Response(status_code=status)
    response.raw_headers = headers
    return response


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
            status, headers = await self._answer(scope, tail)
        except ApiError as exc:
            await _error_response(exc)(scope, receive, send)
            return
        except (psycopg.OperationalError, PoolTimeout):
            await _error_response(HfError(503, "Unavailable", "database unavailable"))(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b""})

    async def _answer(self, scope: Scope, tail: str) -> tuple[int, list[tuple[bytes, bytes]]]:
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


@router.get(
    "/api/whoami-v2", response_model=WhoAmIOut, summary="Who am I (the key's user)", responses=hub_errors(401, 422)
)
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


@router.get(
    "/api/models", summary="List models (search, author, limit; Link pagination)", responses=hub_errors(401, 422)
)
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


@router.get("/api/models/{namespace}/{name}", summary="Model info (main)", responses=hub_errors(401, 404, 422))
async def model_info(
    namespace: str, name: str, request: Request, principal: CatalogReader, blobs: bool = False
) -> Response:
    doc = await _info(request, principal, f"{namespace}/{name}", "main", blobs)
    return Response(orjson.dumps(doc), media_type="application/json")


@router.get(
    "/api/models/{namespace}/{name}/revision/{revision:path}",
    summary="Model info at a revision",
    responses=hub_errors(401, 404, 422),
)
async def model_info_revision(
    namespace: str, name: str, revision: str, request: Request, principal: CatalogReader, blobs: bool = False
) -> Response:
    repo_id, rest = _repo_and_rest(request, "/api/models/", "revision")
    doc = await _info(request, principal, repo_id, "/".join(rest), blobs)
    return Response(orjson.dumps(doc), media_type="application/json")


@router.get(
    "/api/models/{namespace}/{name}/tree/{rest:path}",
    summary="Files and folders of a revision",
    responses=hub_errors(400, 401, 404, 422),
)
async def tree(
    namespace: str,
    name: str,
    rest: Annotated[str, Path(description="`{revision}` or `{revision}/{path}`.")],
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
        if revision == "main" and not under and await service.main_revision(conn, model["id"]) is None:
            return Response(b"[]", media_type="application/json")  # an empty repository
        rev = await service.resolve_revision(conn, model, revision)
        files = await repository.revision_files(conn, model["id"], rev.version_id)
    entries = service.tree_entries(files, rev.sha, under, recursive)
    if under and not entries:
        raise HfError(404, "EntryNotFound", f'{under} does not exist on "{revision}"', commit=rev.sha)
    page, headers = entries[cursor : cursor + limit], {"X-Repo-Commit": rev.sha}
    if cursor + limit < len(entries):
        headers.update(_link(request, {**dict(request.query_params), "cursor": cursor + limit}))
    return Response(orjson.dumps(page), media_type="application/json", headers=headers)


async def _paths_reader(
    request: Request,
    x_api_key: Annotated[str | None, Depends(api_key_header)],
    bearer: Annotated[Any, Depends(bearer_header)],
    x_admin_token: Annotated[str | None, Depends(admin_token_header)],
) -> Principal:
    """A catalog reader for paths-info, a read sent as POST: a read-only key may call it."""
    key = x_api_key or (bearer.credentials if bearer is not None else None)
    return await catalog_principal(request.app, key, x_admin_token)


PathsReader = Annotated[Principal, Depends(_paths_reader)]


@router.post(
    "/api/models/{namespace}/{name}/paths-info/{revision:path}",
    summary="Information on given paths",
    responses=hub_errors(400, 401, 404, 422),
)
async def paths_info(
    namespace: str,
    name: str,
    revision: str,
    request: Request,
    principal: PathsReader,
    paths: Annotated[list[str], Form(max_length=1000)],
    expand: Annotated[str | None, Form()] = None,
) -> Response:
    found_nul = unstorable_at({"paths": paths, "expand": expand})
    if found_nul is not None:
        raise HfError(422, "BadRequest", f"{found_nul[0]}: {found_nul[1]}")
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


def _json_object(raw: bytes) -> Any:
    """A JSON body read by hand, under the api's text rule (kit.text): 422 `invalid JSON body` unless it is
    UTF-8 JSON, 422 for text holding NUL (whatever the content type it came with)."""
    problem = body_problem(raw)
    if problem is not None:
        raise HfError(422, "BadRequest", problem)
    return orjson.loads(raw)


async def _hub_user(
    request: Request,
    x_api_key: Annotated[str | None, Depends(api_key_header)],
    bearer: Annotated[Any, Depends(bearer_header)],
) -> Principal:
    """The user behind the key (x-api-key or `Authorization: Bearer`), whatever the key's scope."""
    key = x_api_key or (bearer.credentials if bearer is not None else None)
    if not key:
        raise HfError(401, "Unauthorized", "missing token (Authorization: Bearer sk_live_...)")
    return await principal_for_key(request.app, key)


async def _writer(principal: Annotated[Principal, Depends(_hub_user)]) -> Principal:
    """A caller about to change state: a read-only key answers 403 (security, issue 15)."""
    if principal.key_scope == "read-only":
        raise HfError(403, "Forbidden", "api key is read-only")
    return principal


HubUser = Annotated[Principal, Depends(_hub_user)]
Writer = Annotated[Principal, Depends(_writer)]


@router.post(
    "/api/repos/create",
    response_model=RepoCreateOut,
    summary="Create a model repository",
    responses=hub_errors(400, 401, 403, 409, 422),
)
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
    "/api/models/{namespace}/{name}/preupload/{revision:path}",
    response_model=PreuploadOut,
    summary="Upload modes",
    responses=hub_errors(400, 401, 403, 404, 422),
)
async def preupload(
    namespace: str, name: str, revision: str, body: PreuploadIn, request: Request, principal: Writer
) -> PreuploadOut:
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


@router.post(
    "/{namespace}/{name}.git/info/lfs/objects/batch",
    summary="Git LFS batch API (upload)",
    responses=hub_errors(400, 401, 403, 404, 422),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                media: {"schema": LFS_BATCH_SCHEMA} for media in ("application/vnd.git-lfs+json", "application/json")
            },
        }
    },
)
async def lfs_batch(namespace: str, name: str, request: Request, principal: Writer) -> Response:
    body = _json_object(await request.body())
    if not isinstance(body, dict):
        raise HfError(400, "BadRequest", "expected a JSON object")
    out = await service.lfs_batch(request.app, principal, f"{namespace}/{name}", body, base_url(request))
    return Response(orjson.dumps(out), media_type="application/vnd.git-lfs+json")


@router.post(
    "/api/lfs/complete/{token}",
    summary="Complete a multipart LFS upload (the URL authorizes itself)",
    responses=hub_errors(400, 403, 404, 422),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": LFS_COMPLETE_SCHEMA}},
        }
    },
)
async def lfs_complete(token: str, request: Request) -> Response:
    body = _json_object(await request.body())
    if not isinstance(body, dict):
        raise HfError(400, "BadRequest", "expected a JSON object")
    return Response(
        orjson.dumps(await service.complete_multipart(request.app, token, body)), media_type="application/json"
    )


@router.post(
    "/api/models/{namespace}/{name}/commit/{revision:path}",
    response_model=CommitOut,
    summary="Commit (ndjson)",
    description="The body is the Hub's ndjson commit (`application/x-ndjson`): a `header` line, then `file`, "
    "`lfsFile`, `deletedFile` and `deletedFolder` lines. A line that is not UTF-8 JSON answers 422 "
    "`invalid JSON body: line <n>`; text holding NUL (\\u0000) answers 422.",
    responses=hub_errors(400, 401, 403, 404, 409, 412, 413, 422),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/x-ndjson": {"schema": {"type": "string"}}},
        }
    },
)
async def commit(namespace: str, name: str, revision: str, request: Request, principal: Writer) -> Response:
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
    for n, line in enumerate(bytes(body).splitlines(), 1):
        problem = body_problem(line) if line.strip() else None
        if problem == INVALID_JSON:
            raise HfError(422, "BadRequest", f"{INVALID_JSON}: line {n}")
        if problem is not None:
            raise HfError(422, "BadRequest", f"line {n}: {problem}")
    out = await service.commit(request.app, principal, repo_id, "/".join(rest), bytes(body), base_url(request))
    return Response(orjson.dumps(out), media_type="application/json")


@router.post("/api/validate-yaml", summary="Check a model card's YAML header", responses=hub_errors(400, 401, 422))
async def validate_yaml(body: ValidateYamlIn, principal: HubUser) -> dict[str, Any]:
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
            except (yaml.YAMLError, ValueError, TypeError, OverflowError, RecursionError) as exc:
                # a scalar its tag cannot construct (`a: 2020-13-45`, `!!int x`) raises ValueError, deep
                # nesting RecursionError: all bad input, not a server error
                problem = f"invalid YAML: {exc}" if str(exc) else f"invalid YAML: {type(exc).__name__}"
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
    responses=hub_errors(400, 422),
)
@router.get(
    "/api/models/{namespace}/{name}/xet-read-token/{revision:path}",
    operation_id="hf_xet_read_token",
    summary="Xet (not supported)",
    responses=hub_errors(400, 422),
)
async def xet_token(namespace: str, name: str, revision: str) -> Response:
    # 400, not a 5xx: the server works, the request asks for what this registry does not offer. The clients
    # never ask it (resolve sends no X-Xet-Hash, the LFS batch never offers the xet transfer).
    raise HfError(
        400,
        "XetNotSupported",
        "this registry stores files through Git LFS, not Xet: set HF_HUB_DISABLE_XET=1 in the client's environment",
    )
