"""Many connections: 2,000 idle HTTP/2 connections held open, then --max-concurrent-rpcs reached.

The idle connections are real HTTP/2 sessions (client preface, SETTINGS exchanged and acknowledged) that
then send nothing, as a pool of load-balancer or client connections does between requests. Beside them
the server answers as before; with every RPC slot taken a new call gets RESOURCE_EXHAUSTED naming the
knob, health checks still answer, and once the slots free up calls succeed again. No crash, no traceback.
"""
from __future__ import annotations

import resource
import selectors
import socket
import statistics
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.api.gen.loraserve.v1 import inference_pb2 as ipb
from server.api.gen.loraserve.v1 import inference_pb2_grpc as ipb_grpc
from tests.e2e.conftest import start_server
from tests.registry.client import Client
from tests.reliability.conftest import TINY_SERVER_ARGS
from tests.reliability.test_slow_consumers import rss_mb

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

IDLE = 2000
MAX_RPCS = 16
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"      # an empty SETTINGS frame
SETTINGS_ACK = b"\x00\x00\x00\x04\x01\x00\x00\x00\x00"


def open_idle_connections(port: int, n: int) -> list[socket.socket]:
    """`n` HTTP/2 connections that finished the SETTINGS exchange and then say nothing."""
    socks = []
    sel = selectors.DefaultSelector()
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        s.sendall(PREFACE + SETTINGS)
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
        socks.append(s)
    pending = set(socks)
    deadline = time.monotonic() + 120
    while pending and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=1):
            s = key.fileobj
            if s in pending and s.recv(65536):  # the server's SETTINGS (and its ACK of ours)
                s.setblocking(True)
                s.sendall(SETTINGS_ACK)
                s.setblocking(False)
                pending.discard(s)
                sel.unregister(s)
    sel.close()
    assert not pending, f"{len(pending)} of {n} connections got no SETTINGS from the server"
    return socks


def still_open(socks: list[socket.socket]) -> int:
    """How many the server has not closed (a closed one reads EOF)."""
    n = 0
    for s in socks:
        try:
            data = s.recv(65536)
            n += bool(data)  # the server sent something (a PING, a GOAWAY): still a live connection unless EOF
        except BlockingIOError:
            n += 1
        except OSError:
            pass
    return n


def median_latency(client: Client, n: int = 5) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        assert len(client.generate("", "probe", 8).token_ids) == 8
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def test_two_thousand_idle_connections_and_the_rpc_limit(tmp_path, tiny_dir):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 3 * IDLE
    if soft < want:  # the server inherits it: room for 2,000 sockets on each side
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= want, "the file-descriptor limit is below 6000"
    sp = start_server(tmp_path, "--model", str(tiny_dir), *TINY_SERVER_ARGS, "--max-concurrent-rpcs",
                      str(MAX_RPCS), "--max-batch-size", "32", env={"LORASERVE_HOME": str(tmp_path / "home")})
    client = Client(sp.target)
    socks: list[socket.socket] = []
    try:
        median_latency(client, 2)
        alone = median_latency(client)
        rss_before = rss_mb(sp.proc.pid)
        t0 = time.monotonic()
        socks = open_idle_connections(sp.port, IDLE)
        opened_s = time.monotonic() - t0
        rss_idle = rss_mb(sp.proc.pid)
        beside_idle = median_latency(client)

        # Every RPC slot taken by streams that run a while; the next call is refused by name.
        release = threading.Event()
        started = threading.Semaphore(0)
        codes: list[grpc.StatusCode] = []

        def hold() -> None:
            ch = grpc.insecure_channel(sp.target)
            req = ipb.GenerateRequest(prompt="x", params=ipb.SamplingParams(max_new_tokens=480, ignore_eos=True))
            try:
                it = ipb_grpc.InferenceStub(ch).GenerateStream(req, timeout=300)
                next(it)
                started.release()
                release.wait(120)
                for _ in it:
                    pass
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as e:
                codes.append(e.code())
                started.release()
            finally:
                ch.close()

        holders = [threading.Thread(target=hold) for _ in range(MAX_RPCS)]
        for t in holders:
            t.start()
        for _ in holders:
            assert started.acquire(timeout=120)
        with pytest.raises(grpc.RpcError) as refused:
            client.generate("", "one too many", 4, timeout=30)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-concurrent-rpcs" in refused.value.details()
        health = health_pb2_grpc.HealthStub(client.channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING  # liveness probes still answer
        release.set()
        for t in holders:
            t.join(300)
        assert codes == [grpc.StatusCode.OK] * MAX_RPCS
        assert len(client.generate("", "after", 4).token_ids) == 4

        open_now = still_open(socks)
        print(f"\nconnections: {IDLE} idle HTTP/2 connections opened in {opened_s:.1f}s, {open_now} still open at "
              f"the end; server RSS {rss_before:.0f} -> {rss_idle:.0f} MB (+{(rss_idle - rss_before) * 1024 / IDLE:.1f}"
              f" KiB per connection); 8-token request p50 {alone * 1000:.0f} ms alone, {beside_idle * 1000:.0f} ms "
              f"beside them; call {MAX_RPCS + 1} refused: {refused.value.details()!r}")
        assert open_now == IDLE
        assert beside_idle <= 2 * alone + 0.05
        assert sp.proc.poll() is None and sp.metric("loraserve_requests_total", {"code": "OK"}) > 0
    finally:
        for s in socks:
            s.close()
        client.close()
        assert sp.stop() == 0, sp.log_tail()
    assert "Traceback" not in "\n".join(sp.raw)
