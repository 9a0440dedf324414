"""The one rule for text the api takes in: it must be something Postgres can store.

Postgres text cannot hold NUL (U+0000), and a JSON body must be UTF-8 (RFC 8259). `TextGuard` applies
the rule to every request before routing, in one place, whatever the endpoint or the field:

- a NUL in the path, in a query parameter (name or value) or in any string of a JSON body (value or
  key, at any depth) answers 422 `<where>: text must not contain NUL (\\u0000) characters`; a lone
  surrogate escape (`"\\ud800"`, which has no UTF-8) answers 422 `<where>: text must not contain unpaired
  surrogates`;
- a JSON body (`application/json` or `application/*+json`) that is not UTF-8, or that no parser can
  read, answers 422 `invalid JSON body`, exactly as a syntax error does.

Anything else about a value (length, pattern, range) is the endpoint's schema's business. The download
fast path (catalog.fast_download) is answered before this guard: its path and parameters go through
`check_rfilename` / `check_version`, which refuse control characters.
"""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import parse_qsl

from starlette.types import ASGIApp, Message, Receive, Scope, Send

NUL_MESSAGE = "text must not contain NUL (\\u0000) characters"
SURROGATE_MESSAGE = "text must not contain unpaired surrogates (\\ud800-\\udfff)"
_SURROGATE = re.compile("[\ud800-\udfff]")
INVALID_JSON = "invalid JSON body"
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def _unstorable(text: str) -> str | None:
    """Why Postgres could not store `text` (a NUL, or an unpaired surrogate that has no UTF-8), else None."""
    if "\x00" in text:
        return NUL_MESSAGE
    if _SURROGATE.search(text):
        return SURROGATE_MESSAGE
    return None


def unstorable_at(value: Any, where: str = "") -> tuple[str, str] | None:
    """(where, why) of the first text in `value` (a decoded JSON value) Postgres could not store, as
    `a.b.0`; None if every string and key is fine."""
    if isinstance(value, str):
        why = _unstorable(value)
        return None if why is None else (where or "body", why)
    if isinstance(value, dict):
        for key, item in value.items():
            here = f"{where}.{key}" if where else str(key)
            why = _unstorable(key)
            if why is not None:
                return here, why
            found = unstorable_at(item, here)
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = unstorable_at(item, f"{where}.{i}" if where else str(i))
            if found is not None:
                return found
    return None


def _printable(where: str) -> str:
    return _SURROGATE.sub("?", where.replace("\x00", "?"))


def query_problem(query_string: bytes) -> str | None:
    """The 422 detail for a query string holding a NUL, else None."""
    if b"%00" not in query_string and b"\x00" not in query_string:
        return None
    for name, value in parse_qsl(query_string.decode("latin-1"), keep_blank_values=True):
        if "\x00" in name or "\x00" in value:
            return f"{_printable(name)}: {NUL_MESSAGE}"
    return None


def body_problem(body: bytes) -> str | None:
    """The 422 detail for a JSON body that is not UTF-8 JSON or holds text Postgres cannot store, else None."""
    try:
        value = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return INVALID_JSON
    found = unstorable_at(value)
    return None if found is None else f"{_printable(found[0])}: {found[1]}"


def is_json(content_type: str) -> bool:
    """Whether FastAPI would decode a body of this content type as JSON."""
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


class TextGuard:
    """ASGI middleware applying the rule above; passes every acceptable request on unchanged."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        problem = f"path: {NUL_MESSAGE}" if "\x00" in scope.get("path", "") else None
        problem = problem or query_problem(scope.get("query_string", b""))
        if problem is None and scope["method"] in _BODY_METHODS:
            ctype = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"content-type"), "")
            if is_json(ctype):
                body, disconnected = await _read_body(receive)
                if disconnected:
                    return
                problem = body_problem(body) if body else None
                receive = _replay(body, receive)
        if problem is None:
            await self.app(scope, receive, send)
            return
        payload = json.dumps({"detail": problem}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 422,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": payload})


async def _read_body(receive: Receive) -> tuple[bytes, bool]:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"", True
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks), False


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that gives the app the body already read, then whatever comes next (a disconnect)."""
    pending = True

    async def replay() -> Message:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
