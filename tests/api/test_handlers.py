"""Strict method handlers: undecodable request bytes are INVALID_ARGUMENT, the RPC limit names its knob,
health checks pass a saturated server. A real in-process gRPC server with small servicers, no model."""
from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from server.api.gen.loraserve.v1 import adapters_pb2 as apb
from server.api.gen.loraserve.v1 import inference_pb2 as ipb
from server.api.handlers import RpcLimiter, add_service

GARBAGE = b"\xff\xff\xff\xff\x0f"  # a varint that never ends: no protobuf parser accepts it


class Inference:
    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.seen: list[str] = []

    async def Tokenize(self, request, context):
        self.seen.append(request.prompt)
        return ipb.TokenizeResponse(token_ids=[len(request.prompt)])

    async def GenerateStream(self, request, context):
        yield ipb.GenerateStreamResponse(text="first")
        await self.release.wait()
        yield ipb.GenerateStreamResponse(text="last")


class Adapters:
    async def RegisterAdapter(self, requests, context):
        n = 0
        async for _ in requests:
            n += 1
        return apb.RegisterAdapterResponse(adapter_id=f"x@{n}")


@pytest.fixture
def served():
    """(target, inference servicer, limiter, loop runner) for a server with an RPC limit of 1."""
    loop = asyncio.new_event_loop()
    inference, limiter = Inference(), RpcLimiter(1)

    async def start():
        server = grpc.aio.server()
        add_service(server, inference, ipb.DESCRIPTOR.services_by_name["Inference"], limiter)
        add_service(server, Adapters(), apb.DESCRIPTOR.services_by_name["Adapters"], limiter)
        add_service(server, HealthServicer(), health_pb2.DESCRIPTOR.services_by_name["Health"])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = loop.run_until_complete(start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{port}", inference, limiter, loop
    asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def _eventually(pred, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _code(fn, *args, **kw):
    try:
        out = fn(*args, **kw)
        if hasattr(out, "__next__"):
            list(out)
    except grpc.RpcError as e:
        return e.code(), e.details()
    return grpc.StatusCode.OK, ""


def test_undecodable_bytes_are_invalid_argument_naming_the_message(served):
    target, inference, _, _ = served
    with grpc.insecure_channel(target) as ch:
        code, details = _code(ch.unary_unary("/loraserve.v1.Inference/Tokenize"), GARBAGE, timeout=10)
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "5 bytes do not decode as loraserve.v1.TokenizeRequest" in details
        code, details = _code(ch.unary_stream("/loraserve.v1.Inference/GenerateStream"), GARBAGE, timeout=10)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "loraserve.v1.GenerateRequest" in details
        good = apb.RegisterAdapterRequest(chunk=b"abc").SerializeToString()
        code, details = _code(ch.stream_unary("/loraserve.v1.Adapters/RegisterAdapter"),
                              iter([good, good, GARBAGE]), timeout=10)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "loraserve.v1.RegisterAdapterRequest" in details
        # Bytes that decode reach the servicer as before.
        ok = ch.unary_unary("/loraserve.v1.Inference/Tokenize")(ipb.TokenizeRequest(prompt="hey").SerializeToString(),
                                                                timeout=10)
        assert ipb.TokenizeResponse.FromString(ok).token_ids == [3]
        assert ch.stream_unary("/loraserve.v1.Adapters/RegisterAdapter")(iter([good, good]), timeout=10)
    assert inference.seen == ["hey"]


def test_unimplemented_placeholders_are_not_bound(served):
    target = served[0]
    with grpc.insecure_channel(target) as ch:  # Generate is not defined on the small servicer above
        code, _ = _code(ch.unary_unary("/loraserve.v1.Inference/Generate"), b"", timeout=10)
    assert code == grpc.StatusCode.UNIMPLEMENTED


def test_rpc_limit_names_its_knob_and_spares_health_checks(served):
    target, inference, limiter, loop = served
    with grpc.insecure_channel(target) as ch:
        stub_stream = ch.unary_stream("/loraserve.v1.Inference/GenerateStream",
                                      response_deserializer=ipb.GenerateStreamResponse.FromString)
        held = stub_stream(ipb.GenerateRequest().SerializeToString(), timeout=30)
        assert next(held).text == "first"  # one RPC in progress: the limit of 1 is reached
        code, details = _code(ch.unary_unary("/loraserve.v1.Inference/Tokenize"),
                              ipb.TokenizeRequest(prompt="x").SerializeToString(), timeout=10)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-concurrent-rpcs" in details
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        held.cancel()  # a cancelled stream gives its slot back
        assert _eventually(lambda: limiter.in_progress == 0)
        assert _code(ch.unary_unary("/loraserve.v1.Inference/Tokenize"),
                     ipb.TokenizeRequest(prompt="x").SerializeToString(), timeout=10)[0] == grpc.StatusCode.OK
        held = stub_stream(ipb.GenerateRequest().SerializeToString(), timeout=30)
        assert next(held).text == "first"
        loop.call_soon_threadsafe(inference.release.set)
        assert [m.text for m in held] == ["last"]
    assert _eventually(lambda: limiter.in_progress == 0)  # the slot returns once the RPC's task is done
