"""Limits a request meets wherever it enters, defined once: the gRPC service checks the client's
values before anything else, the engine checks again for callers that use it directly."""
from __future__ import annotations

from server.core.errors import InvalidRequestError

# Long enough for a UUID, a trace id or a caller's own composite key; short enough for every log line.
MAX_REQUEST_ID_CHARS = 128


def check_request_id(request_id: str) -> None:
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidRequestError("request_id", f"has {len(request_id)} characters; at most {MAX_REQUEST_ID_CHARS}")
