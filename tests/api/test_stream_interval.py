"""--stream-interval: streamed responses (gRPC and HTTP) carry the same tokens in fewer messages, in the interval's
groups (several merged when the reader is behind; the strict first-token-alone rule is held in
tests/engine/test_request_stream.py); unary responses are unchanged."""
from __future__ import annotations

import json

import grpc
import httpx

from server.api.gen.loraserve.v1 import inference_pb2 as pb
from server.api.gen.loraserve.v1 import inference_pb2_grpc as pb_grpc
from tests.api.inprocess import InProcessServer

GROUPS = [1, 4, 4, 1]  # 10 tokens at interval 4: the first alone, then 4, 4, and the finish at once


def _grouped_by_interval(sizes: list[int]) -> bool:
    """Messages are the interval's groups, or several of them merged (a reader behind the engine catches up
    in one message): every message ends where a group ends."""
    ends = {sum(GROUPS[:i + 1]) for i in range(len(GROUPS))}
    return sum(sizes) == sum(GROUPS) and all(sum(sizes[:i + 1]) in ends for i in range(len(sizes)))


def test_streams_group_tokens_by_the_interval(tiny_dir, tmp_path):
    srv = InProcessServer(tmp_path, tiny_dir, {}, tenants=False, stream_interval=4)
    try:
        req = pb.GenerateRequest(prompt="hello there", params=pb.SamplingParams(max_new_tokens=10, ignore_eos=True))
        with grpc.insecure_channel(srv.target) as ch:
            stub = pb_grpc.InferenceStub(ch)
            chunks = list(stub.GenerateStream(req))
            unary = stub.Generate(req)
        assert _grouped_by_interval([len(c.token_ids) for c in chunks]), [len(c.token_ids) for c in chunks]
        assert [t for c in chunks for t in c.token_ids] == list(unary.token_ids)
        assert "".join(c.text for c in chunks) == unary.text
        assert chunks[-1].usage.completion_tokens == 10 and chunks[-1].finish_reason == unary.finish_reason

        body = {"model": "model", "prompt": "hello there", "max_tokens": 10, "ignore_eos": True, "temperature": 0,
                "return_token_ids": True}
        whole = httpx.post(srv.base_url + "/v1/completions", timeout=60, json=body).json()["choices"][0]
        with httpx.stream("POST", srv.base_url + "/v1/completions", timeout=60, json={**body, "stream": True}) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        ids = [e["choices"][0].get("token_ids") for e in events if e["choices"]]
        assert _grouped_by_interval([len(x) for x in ids]), [len(x) for x in ids]
        assert [t for x in ids for t in x] == whole["token_ids"]
    finally:
        srv.stop()
