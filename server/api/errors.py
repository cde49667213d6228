"""The one place where our typed errors become gRPC status codes.

AdapterLoadError maps to UNAVAILABLE: the adapter is registered and valid (a bad
file is refused at registration as INVALID_ARGUMENT), so a failure to bring it onto
the device is a transient server-side condition (disk, memory) worth retrying; the
request is never silently served by the base model instead.

Anything that is not a LoraServeError is a bug: the client gets INTERNAL with a
generic message and an incident id, the traceback goes to the server log only.
"""
from __future__ import annotations

import logging
import uuid

import grpc

from server.core import errors as E

log = logging.getLogger("loraserve.api")

_CODES: tuple[tuple[type[E.LoraServeError], grpc.StatusCode], ...] = (
    (E.InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (E.AdapterRejectedError, grpc.StatusCode.INVALID_ARGUMENT),
    (E.AdapterNotFoundError, grpc.StatusCode.NOT_FOUND),
    (E.CapacityError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (E.QuotaExceededError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (E.UnavailableError, grpc.StatusCode.UNAVAILABLE),
    (E.AdapterLoadError, grpc.StatusCode.UNAVAILABLE),
    (E.AdapterInUseError, grpc.StatusCode.FAILED_PRECONDITION),
    (E.AdapterExistsError, grpc.StatusCode.ALREADY_EXISTS),
    (E.AuthenticationError, grpc.StatusCode.UNAUTHENTICATED),
    (E.PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
)


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """(code, client-facing message) for any exception; unknown ones are logged with their traceback."""
    for cls, code in _CODES:
        if isinstance(exc, cls):
            return code, str(exc)
    incident = uuid.uuid4().hex[:12]
    log.error("internal error (incident %s)", incident, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error (incident {incident}); see the server log"
