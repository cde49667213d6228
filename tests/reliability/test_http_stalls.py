"""A streaming HTTP client that stops reading is aborted after --stalled-stream-timeout, like a gRPC one.

The client asks for 8 choices of 1,800 tokens with 20 logprobs each as server-sent events (well over the 4 MiB
a loopback socket's send buffer grows to) over a socket whose receive buffer is 4 KiB, reads the response head
and then nothing: the kernel buffers fill, uvicorn's write waits, and once it has waited
past the timeout the server aborts the request (KV blocks and the slot freed, the request logged
RESOURCE_EXHAUSTED, the stalled-stream counter moved) and ends the response: the connection closes once what
was already written is read. A client that keeps reading is untouched by the same timeout.
"""
from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

from tests.e2e.conftest import start_server
from tests.helpers import make_tiny_model_dir
from tests.reliability.conftest import TINY_SERVER_ARGS

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TIMEOUT_S = 2.0


def _open_stalled_stream(port: int, model: str, request_id: str) -> socket.socket:
    # 8 choices with 20 alternatives a token: well over the 4 MiB a loopback socket's send buffer grows to
    # (a stream that fits in the kernel's buffers never makes a write wait: its request simply finishes).
    body = json.dumps({"model": model, "prompt": "x", "max_tokens": 1800, "stream": True, "ignore_eos": True,
                       "n": 8, "logprobs": 20, "user": request_id}).encode()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: the window it offers
    sock.connect(("127.0.0.1", port))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                 b"x-request-id: " + request_id.encode() + b"\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 200"), head
    return sock  # from here on this client reads nothing


def test_a_streaming_http_client_that_reads_nothing_is_aborted(tmp_path):
    model = make_tiny_model_dir(tmp_path / "model", max_position_embeddings=2048)
    sp = start_server(tmp_path, "--model", str(model), *TINY_SERVER_ARGS, "--stalled-stream-timeout", str(TIMEOUT_S),
                      env={"LORASERVE_HOME": str(tmp_path / "home")})
    sock = None
    try:
        sock = _open_stalled_stream(sp.http_port, str(model), "stalled-http")
        deadline = time.monotonic() + 120
        while sp.metric("loraserve_stalled_streams_total") < 1:
            assert time.monotonic() < deadline, sp.log_tail()
            time.sleep(0.2)
        time.sleep(0.5)
        # Freed at once: no KV block, no running request.
        for metric in ("loraserve_kv_blocks_used", "loraserve_requests_running"):
            assert sp.metric(metric) == 0, (metric, sp.log_tail())
        line = sp.wait_for(lambda r: r.get("event") == "request" and r.get("method") == "Completions"
                           and r.get("status") == "RESOURCE_EXHAUSTED", 10, "the stalled request's line")
        assert "--stalled-stream-timeout" in line["message"]
        assert "ASGI callable returned without completing response" not in "\n".join(sp.raw)
        # The response is over: a client that reads at last gets what was sent before the stall, then the end
        # of the connection (no [DONE]: the answer was cut).
        sock.settimeout(30)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        assert b"data: " in received and b"[DONE]" not in received

        # A client that reads keeps its stream, however long it runs past the timeout.
        with httpx.Client(base_url=sp.base_url, timeout=120) as http:
            with http.stream("POST", "/v1/completions", json={"model": str(model), "prompt": "x", "max_tokens": 600,
                                                               "stream": True, "ignore_eos": True}) as r:
                events = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        assert sp.metric("loraserve_stalled_streams_total") == 1
    finally:
        if sock is not None:
            sock.close()
        assert sp.stop() == 0, sp.log_tail()
