"""The one exception type of the client, and the exit codes the `registry` command maps it to."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Exit codes of the `registry` command (documented in the README)."""

    OK = 0
    ERROR = 1  # anything not listed below
    USAGE = 2  # bad arguments or options (also what click uses)
    AUTH = 3  # 401/403: no key, a wrong key, not allowed
    NOT_FOUND = 4  # 404: no such model, version, file, grant
    CONFLICT = 5  # 409: already exists, already published
    REJECTED = 6  # ingest rejected an upload (size or sha256 mismatch, ...)
    VERIFY = 7  # a downloaded file does not match the manifest's sha256 or size
    UNAVAILABLE = 8  # the api or the storage cannot be reached, or answers 5xx
    INTERRUPTED = 130  # Ctrl-C; run the same command again to resume


def exit_code_for_status(status: int | None) -> ExitCode:
    """The exit code of an HTTP status (None: no answer at all)."""
    if status is None or status >= 500:
        return ExitCode.UNAVAILABLE
    if status in (401, 403):
        return ExitCode.AUTH
    if status == 404:
        return ExitCode.NOT_FOUND
    if status == 409:
        return ExitCode.CONFLICT
    if status in (400, 422):
        return ExitCode.USAGE
    return ExitCode.ERROR


class RegistryError(Exception):
    """Anything the client could not do: `detail` is one line for a human (the API's own `detail` when the
    API answered), `status` the HTTP status if there was one, `exit_code` what the command exits with."""

    def __init__(self, detail: str, status: int | None = None, exit_code: ExitCode | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.status = status
        self.exit_code = exit_code if exit_code is not None else exit_code_for_status(status)

    def __str__(self) -> str:
        return f"{self.detail} (HTTP {self.status})" if self.status else self.detail
