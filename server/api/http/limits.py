"""Request bodies over --max-request-bytes get 413 before they are parsed (Content-Length) or as they arrive.

A declared body over the limit is read and thrown away (up to DRAIN_MAX_BYTES more, for DRAIN_TIMEOUT_S)
before the 413 goes out: a server that answers and closes while the client is still sending makes the
client's TCP stack see a reset, and clients such as httpx's async one (the openai client's) then report a
connection error instead of the 413 (found by the soak). Past that bound the answer goes out at once.
"""
from __future__ import annotations

import asyncio
import json
from typing import Any

from server.api.errors import RequestTooLargeError, http_error_for

DRAIN_MAX_BYTES = 64 << 20
DRAIN_TIMEOUT_S = 10.0


async def _drain(receive: Any, max_bytes: int) -> None:
    """Read and discard the request body, at most `max_bytes` of it."""
    seen = 0
    while seen <= max_bytes:
        message = await receive()
        if message["type"] != "http.request":
            return  # the client went away
        seen += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


class BodyLimit:
    """Pure ASGI middleware: refuse a declared length over the limit at once, count chunked bodies."""

    def __init__(self, app: Any, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = next((v for k, v in scope.get("headers", ()) if k == b"content-length"), None)
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            if int(declared) <= self.limit + DRAIN_MAX_BYTES:
                try:
                    await asyncio.wait_for(_drain(receive, int(declared)), DRAIN_TIMEOUT_S)
                except asyncio.TimeoutError:
                    pass
            err = http_error_for(RequestTooLargeError(self.limit))
            await send({"type": "http.response.start", "status": err.status,
                        "headers": [(b"content-type", b"application/json"), (b"connection", b"close")]})
            await send({"type": "http.response.body", "body": json.dumps(err.body()).encode()})
            return
        seen = 0
        limit = self.limit

        async def counted() -> Any:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise RequestTooLargeError(limit)  # surfaces from request.body(); answered as 413
            return message

        await self.app(scope, counted, send)
