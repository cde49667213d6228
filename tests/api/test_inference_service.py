"""The Inference servicer over real gRPC (in-process, loopback) with a fake engine: translation,
abort on cancel, error mapping, metrics accounting. No model, so it runs in about a second."""
from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import grpc
import pytest

from server.api.gen.loraserve.v1 import inference_pb2 as pb
from server.api.gen.loraserve.v1 import inference_pb2_grpc as pb_grpc
from server.api.inference_service import InferenceServicer, ServingState
from server.core.identity import AdapterVersion
from server.engine.types import Delta, RequestStream
from server.core.errors import AdapterNotFoundError, CapacityError
from server.metrics import ServerMetrics
from tests.e2e.conftest import parse_metric
from prometheus_client import generate_latest


class FakeTokenizer:
    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": [ord(c) % 100 for c in text]}

    def apply_chat_template(self, msgs, tokenize=False, add_generation_prompt=True) -> str:
        return "".join(f"<{m['role']}>{m['content']}" for m in msgs) + ("<assistant>" if add_generation_prompt else "")


class FakeConfig:
    vocab_size = 100


class FakeEngine:
    """Emits one token per delta; prompt 'boom' is an engine bug, 'slow' streams until aborted."""

    def __init__(self) -> None:
        self.tokenizer = FakeTokenizer()
        self.model_config = FakeConfig()
        self.aborted: list[str] = []
        self.requests: list[Any] = []

    def submit(self, request, loop=None, stream_interval=1) -> RequestStream:
        self.requests.append(request)
        if request.prompt_token_ids == FakeTokenizer()("boom")["input_ids"]:
            raise RuntimeError("/internal/path exploded")
        if request.prompt_token_ids == FakeTokenizer()("full")["input_ids"]:
            raise CapacityError("the waiting queue is full (1 requests); retry later")
        stream = RequestStream(request.request_id, loop, stream_interval=stream_interval)
        slow = request.prompt_token_ids == FakeTokenizer()("slow")["input_ids"]
        n = request.params.max_new_tokens
        a = request.adapter

        def run() -> None:
            for i in range(n):
                if request.request_id in self.aborted:
                    stream.put(Delta(request.request_id, [], "", "abort"))
                    return
                time.sleep(0.05 if slow else 0.001)
                last = i == n - 1
                stream.put(Delta(request.request_id, [i + 1], f"t{i}", "length" if last else None,
                                 len(request.prompt_token_ids), i + 1, a))

        threading.Thread(target=run, daemon=True).start()
        return stream

    def submit_many(self, requests, loop=None, stream_interval=1) -> list[RequestStream]:
        return [self.submit(r, loop, stream_interval) for r in requests]

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)


class FakeResolver:
    def resolve(self, tenant: str, adapter_id: str) -> AdapterVersion:
        if adapter_id != "good":
            raise AdapterNotFoundError(adapter_id)
        return AdapterVersion(tenant, "good", 3, "digest", lambda: None)


async def _with_server(fn) -> Any:
    engine = FakeEngine()
    metrics = ServerMetrics(adapter_label_cap=1)
    state = ServingState(engine=engine, resolver=FakeResolver(), default_max_new_tokens=5)
    server = grpc.aio.server()
    pb_grpc.add_InferenceServicer_to_server(InferenceServicer(state, metrics), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            return await fn(pb_grpc.InferenceStub(ch), engine, state, metrics)
    finally:
        await server.stop(0)


def run(fn) -> Any:
    return asyncio.run(_with_server(fn))


def test_generate_translates_both_ways() -> None:
    async def body(stub, engine, state, metrics):
        params = pb.SamplingParams(temperature=0.5, top_k=4, seed=9, stop=["x"], stop_token_ids=[7], ignore_eos=True)
        r = await stub.Generate(pb.GenerateRequest(request_id="mine", adapter_id="good", prompt="abc", params=params))
        req = engine.requests[-1]
        assert req.request_id != "mine" and len(req.request_id) == 32  # engine ids are the server's own
        p = req.params
        assert (p.max_new_tokens, p.temperature, p.top_p, p.top_k, p.seed, p.stop, p.stop_token_ids, p.ignore_eos) \
            == (5, 0.5, 1.0, 4, 9, ("x",), (7,), True)
        assert req.adapter.name == "good"
        assert r.request_id == "mine" and list(r.token_ids) == [1, 2, 3, 4, 5] and r.text == "t0t1t2t3t4"
        assert r.finish_reason == pb.FINISH_REASON_LENGTH and r.adapter_id == "good" and r.adapter_version == 3
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (3, 5)
        chat = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="hi")])
        await stub.Generate(pb.GenerateRequest(messages=chat, params=pb.SamplingParams(max_new_tokens=1)))
        assert engine.requests[-1].prompt_token_ids == FakeTokenizer()("<user>hi<assistant>")["input_ids"]
        text = generate_latest(metrics.registry).decode()
        assert parse_metric(text, "loraserve_requests_total", {"method": "Generate", "code": "OK"}) == 2
        assert parse_metric(text, "loraserve_generated_tokens_total", {"adapter": "good"}) == 5
        assert parse_metric(text, "loraserve_generated_tokens_total", {"adapter": "other"}) == 1  # label cap 1
        assert parse_metric(text, "loraserve_inter_token_latency_seconds_count") == 4
        assert parse_metric(text, "loraserve_prompt_tokens_total") == 3 + len(engine.requests[-1].prompt_token_ids)
        assert state.in_flight == 0 and engine.aborted == []

    run(body)


def test_errors_map_and_never_leak() -> None:
    async def body(stub, engine, state, metrics):
        async def code_of(req):
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.Generate(req)
            return e.value.code(), e.value.details()

        code, msg = await code_of(pb.GenerateRequest(prompt="boom"))
        assert code == grpc.StatusCode.INTERNAL and "exploded" not in msg and "/internal" not in msg
        assert await code_of(pb.GenerateRequest(prompt="full")) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED, "the waiting queue is full (1 requests); retry later")
        assert await code_of(pb.GenerateRequest(prompt="a", adapter_id="bad")) == (
            grpc.StatusCode.NOT_FOUND, "adapter 'bad' not found")
        code, msg = await code_of(pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=[5, 100])))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and msg == \
            "prompt_token_ids: contains 100; allowed range is [0, 100)"
        code, msg = await code_of(pb.GenerateRequest(prompt="a", request_id="r" * 200))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and msg.startswith("request_id:")
        state.draining = True
        assert (await code_of(pb.GenerateRequest(prompt="a")))[0] == grpc.StatusCode.UNAVAILABLE
        state.draining, state.engine = False, None
        code, msg = await code_of(pb.GenerateRequest(prompt="a"))
        assert code == grpc.StatusCode.UNAVAILABLE and "loading" in msg
        assert state.in_flight == 0
        text = generate_latest(metrics.registry).decode()
        assert parse_metric(text, "loraserve_requests_total", {"method": "Generate", "code": "INVALID_ARGUMENT"}) == 2

    run(body)


def test_cancel_mid_stream_aborts_the_engine_request() -> None:
    async def body(stub, engine, state, metrics):
        call = stub.GenerateStream(pb.GenerateRequest(prompt="slow", params=pb.SamplingParams(max_new_tokens=100)))
        got = 0
        async for chunk in call:
            got += len(chunk.token_ids)
            if got == 2:
                call.cancel()
                break
        for _ in range(100):
            if engine.aborted and state.in_flight == 0:
                break
            await asyncio.sleep(0.02)
        assert engine.aborted == [engine.requests[-1].request_id]
        assert state.in_flight == 0 and state.idle.is_set()

    run(body)


def test_deadline_aborts_the_engine_request() -> None:
    async def body(stub, engine, state, metrics):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.Generate(pb.GenerateRequest(prompt="slow", params=pb.SamplingParams(max_new_tokens=100)),
                                timeout=0.3)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        for _ in range(100):
            if engine.aborted:
                break
            await asyncio.sleep(0.02)
        assert engine.aborted == [engine.requests[-1].request_id]

    run(body)
