"""Every request gets an id (the caller's `x-request-id`, or a new one): it is in every log line written
while the request is handled and in the response's `x-request-id` header."""

from __future__ import annotations

import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from registry_shared.logging import correlation_id

_HEADER = b"x-request-id"


class RequestIdMiddleware:
    """A pure ASGI middleware (no per-request Request object: it sits on the download hot path)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = b""
        for name, value in scope["headers"]:
            if name == _HEADER:
                rid = value[:64]
                break
        if not rid or not rid.isascii():
            rid = uuid.uuid4().hex.encode()
        token = correlation_id.set(rid.decode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (_HEADER, rid)]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            correlation_id.reset(token)
