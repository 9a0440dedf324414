"""The `registry` command (typer). Errors end as one line on stderr and an exit code (registry_client.errors)."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from registry_client import config
from registry_client.client import RegistryClient
from registry_client.errors import ExitCode, RegistryError
from registry_client.progress import NullReporter, Reporter, RichReporter

app = typer.Typer(
    name="registry",
    help="The Model Registry from the command line: publish models, grant them, download them verified.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
models_app = typer.Typer(help="Models you can see; create your own.", no_args_is_help=True)
versions_app = typer.Typer(help="Versions of your models.", no_args_is_help=True)
files_app = typer.Typer(help="Verified files of a model.", no_args_is_help=True)
users_app = typer.Typer(help="Users (admin: REGISTRY_ADMIN_TOKEN).", no_args_is_help=True)
grants_app = typer.Typer(help="Grants of models to platform users (admin: REGISTRY_ADMIN_TOKEN).", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(versions_app, name="versions")
app.add_typer(files_app, name="files")
app.add_typer(users_app, name="users")
app.add_typer(grants_app, name="grants")

out = Console(soft_wrap=True)
err = Console(stderr=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print the answer as JSON (for scripts).")]
MiB = 1024 * 1024


def _client() -> RegistryClient:
    s = config.load_settings()
    return RegistryClient(s.url, s.api_key, admin_token=s.admin_token)


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _table(rows: list[dict], columns: list[str], title: str | None = None) -> None:
    table = Table(title=title, show_edge=False, header_style="bold")
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*("" if r.get(c) is None else str(r.get(c)) for c in columns))
    out.print(table)


def _when(ts: int | None) -> str:
    return "" if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _epoch(value: str | None, name: str) -> int | None:
    """Epoch seconds, or an ISO 8601 date/time (UTC unless it says otherwise), or `now`."""
    if value is None:
        return None
    if value == "now":
        return int(time.time())
    if value.isdigit():
        return int(value)
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise RegistryError(
            f"{name}: expected epoch seconds, an ISO date (2026-12-01[T12:00]) or 'now', got {value!r}",
            exit_code=ExitCode.USAGE,
        ) from None
    return int((dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp())


def _size(value: str, name: str) -> int:
    """`64M`, `5MiB`, `1G`, `1048576` → bytes (binary units)."""
    text = value.strip().upper().removesuffix("B").removesuffix("I")
    units = {"K": 1024, "M": MiB, "G": 1024 * MiB}
    try:
        if text and text[-1] in units:
            return int(float(text[:-1]) * units[text[-1]])
        return int(text)
    except ValueError:
        raise RegistryError(
            f"{name}: expected a size like 64M or 1G, got {value!r}", exit_code=ExitCode.USAGE
        ) from None


@contextmanager
def _reporter(enabled: bool, total: int, label: str) -> Iterator[Reporter]:
    if not enabled:
        yield NullReporter()
        return
    with RichReporter(err, total, label) as rep:
        yield rep


def _show_progress(json_out: bool, quiet: bool) -> bool:
    return not json_out and not quiet and err.is_terminal


# ====================================================================== login


@app.command()
def login(
    url: Annotated[
        str | None, typer.Option(help="The registry's base URL [default: stored, else http://localhost:8081]")
    ] = None,
    api_key: Annotated[
        str | None, typer.Option("--api-key", help="Your API key (asked for, hidden, when not given; '-' reads stdin)")
    ] = None,
) -> None:
    """Check an API key against the registry and store it (0600) for the next commands."""
    settings = config.load_settings()
    base = url or settings.url
    if api_key == "-":
        api_key = sys.stdin.readline().strip()
    if not api_key:
        api_key = typer.prompt("API key", hide_input=True).strip()
    with RegistryClient(base, api_key) as client:
        me = client.whoami()
    path = config.save_login(base, api_key)
    err.print(f"logged in to {base} as {me['email']} ({me['role']}); key stored in {path}")


@app.command()
def logout() -> None:
    """Forget the stored API key."""
    err.print("logged out" if config.forget_login() else "not logged in")


@app.command()
def register(
    email: Annotated[str, typer.Option(help="Your e-mail address")],
    name: Annotated[str, typer.Option(help="Your name")],
    url: Annotated[str | None, typer.Option(help="The registry's base URL")] = None,
    save: Annotated[bool, typer.Option("--login/--no-login", help="Store the new key as your login")] = True,
    json_out: JsonOpt = False,
) -> None:
    """Register yourself as a developer (if the registry allows it) and get an API key."""
    base = url or config.load_settings().url
    with RegistryClient(base) as client:
        answer = client.register(email, name)
    if save:
        config.save_login(base, answer["api_key"])
    if json_out:
        _print_json(answer)
    else:
        out.print(f"user {answer['user_id']} registered; API key (shown once): {answer['api_key']}")
        if save:
            err.print("key stored: you are logged in")


@app.command()
def whoami(json_out: JsonOpt = False) -> None:
    """Who the current key belongs to."""
    with _client() as client:
        me = client.whoami()
        url = client.base_url
    if json_out:
        _print_json(me)
    else:
        out.print(f"{me['email']} ({me['name']}), user {me['user_id']}, role {me['role']} at {url}")


# ====================================================================== models, versions, files


@models_app.command("list")
def models_list(
    q: Annotated[str | None, typer.Option("--q", "-q", help="Substring of repo_id, model name or author")] = None,
    mine: Annotated[bool, typer.Option("--mine", help="Only your own models (developers)")] = False,
    limit: Annotated[int, typer.Option(min=1, max=500)] = 100,
    offset: Annotated[int, typer.Option(min=0)] = 0,
    json_out: JsonOpt = False,
) -> None:
    """Models you can see."""
    with _client() as client:
        answer = client.my_models() if mine else client.list_models(q, limit, offset)
    if json_out:
        _print_json(answer)
    else:
        _table(answer["items"], ["repo_id", "model_name", "pipeline_tag", "license", "file_count", "last_modified"])


@models_app.command("show")
def models_show(repo_id: Annotated[str, typer.Argument(help="namespace/name")], json_out: JsonOpt = False) -> None:
    """One model."""
    with _client() as client:
        model = client.get_model(repo_id)
    if json_out:
        _print_json(model)
    else:
        _table([{"field": k, "value": v} for k, v in model.items()], ["field", "value"], title=repo_id)


@models_app.command("create")
def models_create(
    repo_id: Annotated[str, typer.Argument(help="namespace/name; the namespace becomes yours")],
    name: Annotated[str | None, typer.Option("--name", help="Display name [default: the repo's name]")] = None,
    public: Annotated[bool, typer.Option("--public/--private", help="Visible to every user, or by grant only")] = False,
    license_: Annotated[str | None, typer.Option("--license")] = None,
    pipeline_tag: Annotated[str | None, typer.Option("--pipeline-tag")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Create a model (developers)."""
    with _client() as client:
        model = client.create_model(
            repo_id, name, "public" if public else "private", license=license_, pipeline_tag=pipeline_tag
        )
    if json_out:
        _print_json(model)
    else:
        out.print(f"model {model['repo_id']} created")


@versions_app.command("list")
def versions_list(repo_id: Annotated[str, typer.Argument(help="namespace/name")], json_out: JsonOpt = False) -> None:
    """Versions of one of your models."""
    with _client() as client:
        answer = client.list_versions(repo_id)
    if json_out:
        _print_json(answer)
    else:
        _table([{**v, "created": _when(v["created_ts"])} for v in answer["items"]], ["version", "created"])


@versions_app.command("create")
def versions_create(
    repo_id: Annotated[str, typer.Argument(help="namespace/name")],
    version: Annotated[str, typer.Argument(help="A label, e.g. v1")],
    json_out: JsonOpt = False,
) -> None:
    """Add a version to one of your models."""
    with _client() as client:
        answer = client.create_version(repo_id, version)
    if json_out:
        _print_json(answer)
    else:
        out.print(f"version {answer['version']} of {answer['repo_id']} created")


@files_app.command("list")
def files_list(
    repo_id: Annotated[str, typer.Argument(help="namespace/name")],
    presign: Annotated[bool, typer.Option("--presign", help="Include presigned download URLs")] = False,
    json_out: JsonOpt = False,
) -> None:
    """A model's verified files (for each name, its newest version's)."""
    with _client() as client:
        answer = client.list_files(repo_id, presign=presign)
    if json_out:
        _print_json(answer)
    else:
        _table(answer["items"], ["rfilename", "version", "size", "sha256"])


@app.command()
def manifest(
    repo_id: Annotated[
        str | None, typer.Argument(help="namespace/name; none: everything granted to you (platform)")
    ] = None,
    presign: Annotated[bool, typer.Option("--presign", help="Include presigned download URLs")] = False,
    json_out: JsonOpt = False,
) -> None:
    """A model's manifest (hf-model-manifest/v1), or a platform user's manifest of all its grants."""
    with _client() as client:
        answer = client.manifest(repo_id, presign=presign) if repo_id else client.platform_manifest(presign=presign)
    if json_out:
        _print_json(answer)
    elif repo_id:
        _table(
            answer["files"],
            ["rfilename", "version", "size", "sha256"],
            title=f"{answer['repo_id']} ({answer['schema']})",
        )
    else:
        rows = [
            {
                "repo_id": m["repo_id"],
                "version": v["version"],
                "files": len(v["files"]),
                "from": _when(m["permitted_from_ts"]),
                "until": _when(m["permitted_until_ts"]),
            }
            for m in answer["items"]
            for v in (m["versions"] or [{"version": "", "files": []}])
        ]
        _table(rows, ["repo_id", "version", "files", "from", "until"])


@app.command()
def usage(
    since: Annotated[str | None, typer.Option(help="Start: epoch seconds or ISO date [default: 30 days ago]")] = None,
    until: Annotated[str | None, typer.Option(help="End: epoch seconds or ISO date [default: now]")] = None,
    admin: Annotated[bool, typer.Option("--admin", help="Everyone's usage (REGISTRY_ADMIN_TOKEN)")] = False,
    user_id: Annotated[int | None, typer.Option("--user-id", help="With --admin: only this user")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Your usage (manifests, file lists, downloads), or everyone's with --admin."""
    s, u = _epoch(since, "--since"), _epoch(until, "--until")
    with _client() as client:
        answer = client.admin_usage(s, u, filter_user_id=user_id) if admin else client.usage(s, u)
    if json_out:
        _print_json(answer)
        return
    t = answer["totals"]
    out.print(
        f"{_when(answer['window']['since'])} → {_when(answer['window']['until'])}: {t['events']} events, "
        f"{t['downloads']} downloads, {t['manifests']} manifests, {t['files_list']} file lists"
    )
    if answer.get("top_models"):
        _table(answer["top_models"], ["repo_id", "downloads"], title="top models")
    if answer.get("top_users"):
        _table(answer["top_users"], ["user_id", "email", "events", "downloads"], title="top users")


# ====================================================================== transfers


@app.command()
def upload(
    repo_id: Annotated[str, typer.Argument(help="namespace/name (yours)")],
    paths: Annotated[list[Path], typer.Argument(help="Files or folders (a folder's files keep their relative paths)")],
    version: Annotated[str, typer.Option("--version", "-v", help="The version to upload to")],
    create_version: Annotated[
        bool, typer.Option("--create-version", help="Create the version if it does not exist")
    ] = False,
    parallel: Annotated[int, typer.Option(min=1, max=64, help="Parts sent at once")] = 4,
    part_size: Annotated[str, typer.Option(help="Multipart part size (5M–5G)", envvar="REGISTRY_PART_SIZE")] = "64M",
    multipart_threshold: Annotated[
        str, typer.Option(help="Files from this size on go multipart", envvar="REGISTRY_MULTIPART_THRESHOLD")
    ] = "64M",
    limit_rate: Annotated[str | None, typer.Option(help="At most this many bytes/s, e.g. 10M")] = None,
    url_expires: Annotated[
        int, typer.Option(min=1, max=604800, help="Lifetime of part URLs in seconds (expired ones are signed again)")
    ] = 3600,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Wait for the registry to verify the files")] = True,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Upload files or folders to a version; resumable (run it again), verified by the registry."""
    from registry_client.upload import Uploader, UploadOptions, collect_files

    files = collect_files(paths)
    total = sum(f.size for f in files)
    options = {
        "part_size": _size(part_size, "--part-size"),
        "multipart_threshold": _size(multipart_threshold, "--multipart-threshold"),
        "parallel": parallel,
        "limit_rate": _size(limit_rate, "--limit-rate") if limit_rate else None,
        "wait": wait,
        "url_expires": url_expires,
    }
    with _client() as client:
        if create_version:
            try:
                client.create_version(repo_id, version)
            except RegistryError as exc:
                if exc.status != 409:
                    raise
        with _reporter(_show_progress(json_out, quiet), total, f"{len(files)} file(s)") as rep:
            try:
                results = Uploader(client, UploadOptions(**options, reporter=rep)).upload(repo_id, version, paths)
            except RegistryError as exc:
                if exc.status == 404 and exc.detail.startswith("version not found") and not create_version:
                    exc.detail += f"; create it with `registry versions create {repo_id} {version}` or --create-version"
                if json_out and hasattr(exc, "results"):
                    _print_json({"repo_id": repo_id, "version": version, "files": exc.results})  # type: ignore[attr-defined]
                raise
    if json_out:
        _print_json({"repo_id": repo_id, "version": version, "files": results})
    else:
        for r in results:
            how = f", {r['parts_reused']} of {r['parts_total']} parts already stored" if r["parts_reused"] else ""
            out.print(f"{r['rfilename']}: {r['status']} ({r['size']} bytes{how})")


@app.command()
def download(
    repo_id: Annotated[str, typer.Argument(help="namespace/name")],
    version: Annotated[
        str | None, typer.Option("--version", "-v", help="A version [default: each file's newest]")
    ] = None,
    local_dir: Annotated[
        Path | None, typer.Option("--local-dir", help="Where the files go [default: <cache>/models/<repo>/<version>]")
    ] = None,
    parallel: Annotated[int, typer.Option(min=1, max=64, help="Files fetched at once")] = 4,
    segments: Annotated[int, typer.Option(min=1, max=64, help="Ranges of one large file fetched at once")] = 4,
    segment_threshold: Annotated[
        str, typer.Option(help="Files from this size on are fetched in segments", envvar="REGISTRY_SEGMENT_THRESHOLD")
    ] = "64M",
    limit_rate: Annotated[str | None, typer.Option(help="At most this many bytes/s, e.g. 10M")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Download a model's files, each checked against its sha256; resumable (run it again)."""
    from registry_client.download import Downloader, DownloadOptions

    with _client() as client:
        threshold = _size(segment_threshold, "--segment-threshold")
        dl = Downloader(client, DownloadOptions(parallel=parallel, segments=segments, segment_threshold=threshold))
        files = dl.files_of(repo_id, version)
        total = sum(int(f["size"]) for f in files)
        with _reporter(_show_progress(json_out, quiet), total, f"{len(files)} file(s)") as rep:
            dl.reporter = rep
            if limit_rate:
                from registry_client.progress import RateLimiter

                dl.limiter = RateLimiter(_size(limit_rate, "--limit-rate"))
            results = dl.download(repo_id, version, local_dir, files)
    if json_out:
        _print_json({"repo_id": repo_id, "version": version, "files": results})
    else:
        for r in results:
            out.print(f"{r['path']}: {r['status']}")


# ====================================================================== admin


class Role(StrEnum):
    developer = "developer"
    platform = "platform"
    admin = "admin"


@users_app.command("create")
def users_create(
    email: Annotated[str, typer.Option(help="The user's e-mail address")],
    name: Annotated[str, typer.Option(help="The user's name")],
    role: Annotated[Role, typer.Option(help="The user's role")],
    json_out: JsonOpt = False,
) -> None:
    """Create a user with a role; prints its API key (shown once)."""
    with _client() as client:
        answer = client.create_user(email, name, role.value)
    if json_out:
        _print_json(answer)
    else:
        out.print(f"user {answer['user_id']} ({role.value}) created; API key (shown once): {answer['api_key']}")


@users_app.command("list")
def users_list(
    role: Annotated[Role | None, typer.Option(help="Only users with this role")] = None,
    email: Annotated[str | None, typer.Option()] = None,
    json_out: JsonOpt = False,
) -> None:
    """Users."""
    with _client() as client:
        answer = client.list_users(role.value if role else None, email)
    if json_out:
        _print_json(answer)
    else:
        _table(answer["items"], ["user_id", "email", "name", "role"])


def _grant_rows(items: list[dict]) -> list[dict]:
    return [
        {
            **g,
            "from": _when(g["permitted_from_ts"]),
            "until": _when(g["permitted_until_ts"]),
            "revoked": _when(g["revoked_ts"]),
        }
        for g in items
    ]


GRANT_COLUMNS = ["grant_id", "platform_user_id", "repo_id", "from", "until", "revoked", "active"]


@grants_app.command("list")
def grants_list(
    user_id: Annotated[int | None, typer.Option("--user-id", help="Only this platform user's grants")] = None,
    repo_id: Annotated[str | None, typer.Option("--repo", help="Only this model's grants")] = None,
    active: Annotated[
        bool | None, typer.Option("--active/--inactive", help="Only grants in force now (or not)", show_default=False)
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Grants."""
    with _client() as client:
        answer = client.list_grants(user_id, repo_id, active)
    if json_out:
        _print_json(answer)
    else:
        _table(_grant_rows(answer["items"]), GRANT_COLUMNS)


def _print_grant(grant: dict, json_out: bool, verb: str) -> None:
    if json_out:
        _print_json(grant)
    else:
        out.print(f"grant {grant['grant_id']} {verb}")
        _table(_grant_rows([grant]), GRANT_COLUMNS)


@grants_app.command("create")
def grants_create(
    user_id: Annotated[int, typer.Option("--user-id", help="The platform user")],
    repo_id: Annotated[str, typer.Option("--repo", help="The model")],
    from_: Annotated[str, typer.Option("--from", help="From: epoch seconds, ISO date or 'now'")] = "now",
    until: Annotated[str | None, typer.Option("--until", help="Until (optional)")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Grant a platform user a model from a point in time."""
    with _client() as client:
        grant = client.create_grant(user_id, repo_id, _epoch(from_, "--from"), _epoch(until, "--until"))
    _print_grant(grant, json_out, "created")


@grants_app.command("update")
def grants_update(
    grant_id: Annotated[int, typer.Argument(help="The grant")],
    from_: Annotated[str | None, typer.Option("--from", help="New start")] = None,
    until: Annotated[str | None, typer.Option("--until", help="New end")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Change a grant's window."""
    with _client() as client:
        grant = client.update_grant(grant_id, _epoch(from_, "--from"), _epoch(until, "--until"))
    _print_grant(grant, json_out, "updated")


@grants_app.command("revoke")
def grants_revoke(grant_id: Annotated[int, typer.Argument(help="The grant")], json_out: JsonOpt = False) -> None:
    """Revoke a grant: the platform user loses access at once."""
    with _client() as client:
        grant = client.revoke_grant(grant_id)
    _print_grant(grant, json_out, "revoked")


# ====================================================================== entry point


def _fail(message: str, code: int) -> NoReturn:
    err.print("[bold red]error:[/] ", end="", highlight=False)
    err.print(message, highlight=False, markup=False, soft_wrap=True)
    sys.exit(code)


def main() -> None:
    """`registry`: run a command; any failure is one line on stderr and an exit code."""
    command = typer.main.get_command(app)
    try:
        code = command.main(standalone_mode=False, prog_name="registry")
    except typer.TyperException as exc:  # click's exceptions (typer vendors click)
        ctx = getattr(exc, "ctx", None)
        if type(exc).__name__ == "NoArgsIsHelpError":  # `registry grants` alone: its help, exit 2 as click does
            err.print(exc.format_message(), highlight=False, markup=False)
            sys.exit(ExitCode.USAGE)
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None and exc.exit_code == ExitCode.USAGE else ""
        _fail(f"{exc.format_message()}{hint}", exc.exit_code)
    except typer.Abort:
        _fail("interrupted", ExitCode.INTERRUPTED)
    except RegistryError as exc:
        _fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted: run the same command again to resume", ExitCode.INTERRUPTED)
    except OSError as exc:
        _fail(f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc), ExitCode.ERROR)
    except Exception as exc:
        if os.environ.get("REGISTRY_DEBUG"):
            raise
        _fail(f"internal error: {type(exc).__name__}: {exc} (REGISTRY_DEBUG=1 shows the traceback)", ExitCode.ERROR)
    if code == ExitCode.INTERRUPTED:  # typer turns Ctrl-C during a command into exit code 130
        _fail("interrupted: run the same command again to resume", ExitCode.INTERRUPTED)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
