"""The one place where our typed errors become statuses: gRPC codes, and HTTP statuses derived from them.

AdapterLoadError maps to UNAVAILABLE: the adapter is registered and valid (a bad
file is refused at registration as INVALID_ARGUMENT), so a failure to bring it onto
the device is a transient server-side condition (disk, memory) worth retrying; the
request is never silently served by the base model instead.

Anything that is not a LoraServeError is a bug: the client gets INTERNAL with a
generic message and an incident id, the traceback goes to the server log only.

The HTTP API answers with the status the gRPC code maps to (`HTTP_STATUS`), so both
protocols refuse the same request for the same reason; the body has OpenAI's error shape.
"""
from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Any, Optional

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
    (E.AuthenticationError, grpc.StatusCode.UNAUTHENTICATED),
    (E.PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
)


class RequestTooLargeError(E.InvalidRequestError):
    """A request body over --max-request-bytes (HTTP 413; gRPC refuses such messages itself)."""

    def __init__(self, limit: int):
        super().__init__("body", f"is larger than {limit} bytes (--max-request-bytes)")


def code_for(exc: BaseException) -> grpc.StatusCode:
    """The status code `status_for` gives `exc`, without logging anything (for audit lines and counters)."""
    for cls, code in _CODES:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """(code, client-facing message) for any exception; unknown ones are logged with their traceback.

    The answer is remembered on the exception, so an error counted by one layer and answered
    by another is logged once, under one incident id.
    """
    cached = getattr(exc, "_loraserve_status", None)
    if cached is not None:
        return cached
    for cls, code in _CODES:
        if isinstance(exc, cls):
            result = code, str(exc)
            break
    else:
        incident = uuid.uuid4().hex[:12]
        log.error("internal error (incident %s)", incident, exc_info=exc)
        result = grpc.StatusCode.INTERNAL, f"internal error (incident {incident}); see the server log"
    try:
        exc._loraserve_status = result  # type: ignore[attr-defined]
    except AttributeError:  # exceptions with __slots__
        pass
    return result


HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
}
# OpenAI's error `type` per HTTP status.
HTTP_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
              404: "invalid_request_error", 405: "invalid_request_error", 409: "invalid_request_error",
              413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error",
              503: "service_unavailable_error"}
# A machine-readable `code` per error class (OpenAI's where one exists: model_not_found, invalid_api_key).
_HTTP_CODES: tuple[tuple[type[BaseException], str], ...] = (
    (RequestTooLargeError, "request_too_large"),
    (E.AdapterNotFoundError, "model_not_found"),
    (E.InvalidRequestError, "invalid_value"),
    (E.AdapterRejectedError, "adapter_rejected"),
    (E.CapacityError, "queue_full"),
    (E.QuotaExceededError, "quota_exceeded"),
    (E.UnavailableError, "unavailable"),
    (E.AdapterLoadError, "adapter_unavailable"),
    (E.AdapterInUseError, "adapter_in_use"),
    (E.AuthenticationError, "invalid_api_key"),
    (E.PermissionDeniedError, "permission_denied"),
)


@dataclass(frozen=True)
class HttpError:
    """An HTTP status with OpenAI's error body: {"error": {"message", "type", "param", "code"}}."""

    status: int
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    @classmethod
    def of(cls, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None) -> "HttpError":
        return cls(status, message, HTTP_TYPES.get(status, "server_error" if status >= 500 else
                                                   "invalid_request_error"), param, code)


def http_error_for(exc: BaseException) -> HttpError:
    """The HTTP answer for any exception: the status its gRPC code maps to, 413 for an oversized body.

    An unknown adapter is `model_not_found` on `model` with one message whether it does not exist
    or belongs to another tenant; internal errors carry only their incident id.
    """
    code, message = status_for(exc)
    status = 413 if isinstance(exc, RequestTooLargeError) else HTTP_STATUS.get(code, 500)
    err_code = next((c for cls, c in _HTTP_CODES if isinstance(exc, cls)), "internal_error" if status == 500 else None)
    param = getattr(exc, "field", None)
    if isinstance(exc, E.AdapterNotFoundError):
        message, param = f"model {exc.adapter_id!r} not found", "model"
    return HttpError.of(status, message, param, err_code)

