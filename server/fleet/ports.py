"""Loopback ports for a local fleet's listeners (and the benchmarks' servers): never the same one twice."""
from __future__ import annotations

import socket
import threading

_handed_out: set[int] = set()
_handed_out_lock = threading.Lock()


def free_port() -> int:
    """A loopback port free now and never handed out before by this process.

    The kernel may give the same ephemeral port to two bind-to-0 probes in a row (each closes its socket), and
    HAProxy and gRPC servers bind with SO_REUSEPORT, so two listeners given one port both bind it and split its
    connections: seen as HAProxy's gRPC and admin frontends on one port, a RegisterAdapter answered 503 by the
    admin frontend."""
    with _handed_out_lock:
        while True:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = int(s.getsockname()[1])
            if port not in _handed_out:
                _handed_out.add(port)
                return port
