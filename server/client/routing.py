"""The header a fleet's proxy routes on, so every request for one adapter reaches the replica holding it.

HAProxy (deploy/haproxy/haproxy.cfg) and Envoy (deploy/envoy/envoy.yaml) hash `x-loraserve-adapter`
consistently over the replicas. Its value is the adapter's name without the version: all versions
of a name stay together, so a hot-swapped version loads where the old one already ran. The server
never reads the header: one that disagrees with the request only changes where it is served.
"""
from __future__ import annotations

ADAPTER_HEADER = "x-loraserve-adapter"


def routing_key(adapter_id: str) -> str:
    """`support@3` -> `support`; '' for the base model (a proxy then balances round-robin)."""
    return adapter_id.split("@", 1)[0].strip() if adapter_id else ""


def routing_metadata(adapter_id: str) -> list[tuple[str, str]]:
    """The routing header for a request of `adapter_id` (none for the base model or an unprintable id)."""
    key = routing_key(adapter_id)
    if not key or len(key) > 128 or not key.isascii() or not key.isprintable():
        return []  # the server refuses such an id anyway; no header is better than a broken call
    return [(ADAPTER_HEADER, key)]
