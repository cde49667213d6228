"""Request bodies over --max-request-bytes get 413 before they are read (Content-Length) or as they arrive."""
from __future__ import annotations

import json
from typing import Any

from server.api.errors import RequestTooLargeError, http_error_for


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
