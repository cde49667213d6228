"""What our clients do so that a fleet behind a proxy serves them well: the routing header and retries.

The header travels as gRPC metadata (`routing_metadata`) or as an HTTP header on the
OpenAI-compatible API (`routing_headers`); one value, one hash, either protocol.

HAProxy (deploy/haproxy/haproxy.cfg) and Envoy (deploy/envoy/envoy.yaml) hash `x-loraserve-adapter`
consistently over the replicas. Its value is the adapter's name without the version: all versions
of a name stay together, so a hot-swapped version loads where the old one already ran. The server
never reads the header: one that disagrees with the request only changes where it is served.

Inference calls that end UNAVAILABLE before any response message arrived are retried (gRPC's own
retry policy, at most 3 attempts): UNAVAILABLE is what a replica that is starting or draining
answers, and what the proxy answers for a request it could not deliver to a replica that just died.
A call that already streamed tokens is never replayed.

A stream cut short in the proxy is reported as UNAVAILABLE (`failed_call`): when the replica
serving a stream dies after its first tokens, HAProxy 2.6 ends the client's stream with an empty
DATA frame (END_STREAM) and no gRPC status, which gRPC reports as `UNKNOWN: Stream removed`.
Our server never answers UNKNOWN (an unexpected error is INTERNAL), so that status always means
an answer cut short: our clients say so, as UNAVAILABLE, and never present it as complete.
"""
from __future__ import annotations

import json
from typing import Any

ADAPTER_HEADER = "x-loraserve-adapter"

RETRY_SERVICE_CONFIG = {
    "methodConfig": [{
        "name": [{"service": "loraserve.v1.Inference"}],
        "retryPolicy": {"maxAttempts": 3, "initialBackoff": "0.2s", "maxBackoff": "2s", "backoffMultiplier": 2,
                        "retryableStatusCodes": ["UNAVAILABLE"]},
    }],
}
CHANNEL_OPTIONS = [("grpc.enable_retries", 1), ("grpc.service_config", json.dumps(RETRY_SERVICE_CONFIG))]


def routing_key(adapter_id: str) -> str:
    """`support@3` -> `support`; '' for the base model (a proxy then balances round-robin)."""
    return adapter_id.split("@", 1)[0].strip() if adapter_id else ""


def routing_metadata(adapter_id: str) -> list[tuple[str, str]]:
    """The routing header for a request of `adapter_id` (none for the base model or an unprintable id)."""
    key = routing_key(adapter_id)
    if not key or len(key) > 128 or not key.isascii() or not key.isprintable():
        return []  # the server refuses such an id anyway; no header is better than a broken call
    return [(ADAPTER_HEADER, key)]


def routing_headers(adapter_id: str) -> dict[str, str]:
    """The same header for an HTTP request (the OpenAI-compatible API): `{}` where gRPC sends none."""
    return dict(routing_metadata(adapter_id))


STREAM_CUT = "Stream removed"  # gRPC's words for a stream that ended without a status


def call_status(code: str, details: str) -> tuple[str, str]:
    """How our clients report a failed call: gRPC's status name and details, except that a stream a
    proxy ended without a status (`UNKNOWN: Stream removed ...`) is UNAVAILABLE, said plainly."""
    if code == "UNKNOWN" and details.startswith(STREAM_CUT):
        return "UNAVAILABLE", ("the answer was cut short: the replica serving it went away mid-stream and the proxy "
                               f"ended the stream without a status (gRPC: {details}); retry the request")
    return code, details


def failed_call(error: Any) -> tuple[str, str]:
    """`call_status` of a `grpc.RpcError` (sync or aio)."""
    return call_status(error.code().name, error.details() or "")
