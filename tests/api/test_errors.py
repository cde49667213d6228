"""Every typed error maps to its documented gRPC code with its message; anything else is INTERNAL, opaque."""
from __future__ import annotations

import logging

import grpc
import pytest

from server.core import errors as E
from server.api.errors import status_for

CASES = [
    (E.InvalidRequestError("temperature", "is 5; allowed range is [0, 2]"), grpc.StatusCode.INVALID_ARGUMENT),
    (E.AdapterRejectedError("DoRA (use_dora=true) is not supported"), grpc.StatusCode.INVALID_ARGUMENT),
    (E.AdapterNotFoundError("x@3"), grpc.StatusCode.NOT_FOUND),
    (E.CapacityError("the waiting queue is full"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (E.StorageFullError("the registry's disk is full"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (E.QuotaExceededError("max_concurrent_requests"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (E.UnavailableError("draining"), grpc.StatusCode.UNAVAILABLE),
    (E.AdapterLoadError("disk read failed"), grpc.StatusCode.UNAVAILABLE),
    (E.StartupError("cannot bind HTTP to 127.0.0.1:8000"), grpc.StatusCode.UNAVAILABLE),
    (E.AdapterInUseError("pinned"), grpc.StatusCode.FAILED_PRECONDITION),
    (E.AuthenticationError("missing API key"), grpc.StatusCode.UNAUTHENTICATED),
    (E.PermissionDeniedError("admin only"), grpc.StatusCode.PERMISSION_DENIED),
]


@pytest.mark.parametrize("exc,code", CASES, ids=[type(e).__name__ for e, _ in CASES])
def test_typed_errors_keep_their_message(exc: Exception, code: grpc.StatusCode) -> None:
    assert status_for(exc) == (code, str(exc))


def test_every_typed_error_class_is_mapped() -> None:
    mapped = {type(e) for e, _ in CASES}
    declared = {c for c in vars(E).values() if isinstance(c, type) and issubclass(c, E.LoraServeError)
                and c is not E.LoraServeError}
    assert declared <= mapped, declared - mapped


def test_unknown_errors_are_internal_and_never_leak(caplog: pytest.LogCaptureFixture) -> None:
    try:
        raise KeyError("/secret/path/model.safetensors")
    except KeyError as e:
        with caplog.at_level(logging.ERROR, logger="loraserve.api"):
            code, msg = status_for(e)
    assert code == grpc.StatusCode.INTERNAL
    assert "secret" not in msg and "Traceback" not in msg and "incident" in msg
    incident = msg.split("incident ")[1].split(")")[0]
    assert any(incident in r.getMessage() and r.exc_info for r in caplog.records), "traceback must be logged"


HTTP = {grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
        grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.FAILED_PRECONDITION: 409,
        grpc.StatusCode.ALREADY_EXISTS: 409, grpc.StatusCode.UNAUTHENTICATED: 401,
        grpc.StatusCode.PERMISSION_DENIED: 403}


@pytest.mark.parametrize("exc,code", CASES, ids=[type(e).__name__ for e, _ in CASES])
def test_http_status_follows_the_grpc_code(exc: Exception, code: grpc.StatusCode) -> None:
    from server.api.errors import http_error_for

    err = http_error_for(exc)
    assert err.status == HTTP[code]
    assert set(err.body()["error"]) == {"message", "type", "param", "code"} and err.code


def test_http_error_details() -> None:
    from server.api.errors import RequestTooLargeError, http_error_for

    bad = http_error_for(E.InvalidRequestError("temperature", "is 5; allowed range is [0, 2]"))
    assert (bad.param, bad.type, bad.message) == ("temperature", "invalid_request_error",
                                                  "temperature: is 5; allowed range is [0, 2]")
    missing = http_error_for(E.AdapterNotFoundError("x@3"))
    assert (missing.status, missing.param, missing.code, missing.message) == (
        404, "model", "model_not_found", "model 'x@3' not found")
    assert http_error_for(RequestTooLargeError(10)).status == 413
    assert http_error_for(E.QuotaExceededError("q")).type == "rate_limit_error"


def test_http_internal_errors_log_once_under_one_incident(caplog: pytest.LogCaptureFixture) -> None:
    from server.api.errors import http_error_for

    exc = RuntimeError("/secret/path exploded")
    with caplog.at_level(logging.ERROR, logger="loraserve.api"):
        code, message = status_for(exc)  # counted by the generate path first ...
        err = http_error_for(exc)        # ... then answered by the HTTP layer
    assert err.status == 500 and err.code == "internal_error" and err.message == message
    assert "/secret" not in err.message and len(caplog.records) == 1
