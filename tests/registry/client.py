"""gRPC helpers the registry's end-to-end tests share (they start the real server via tests/e2e/conftest.py)."""
from __future__ import annotations

from typing import Iterator, Optional

import grpc

from server.api.gen.loraserve.v1 import adapters_pb2 as pb
from server.api.gen.loraserve.v1 import adapters_pb2_grpc as pb_grpc
from server.api.gen.loraserve.v1 import inference_pb2 as ipb
from server.api.gen.loraserve.v1 import inference_pb2_grpc as ipb_grpc


def auth(key: Optional[str], tenant: Optional[str] = None) -> list[tuple[str, str]]:
    md = [("authorization", f"Bearer {key}")] if key else []
    return md + ([("x-loraserve-tenant", tenant)] if tenant else [])


def upload_requests(name: str, config_json: bytes, weights: bytes, chunk: int = 64 << 10,
                    **header) -> Iterator[pb.RegisterAdapterRequest]:
    yield pb.RegisterAdapterRequest(header=pb.RegisterAdapterHeader(
        name=name, adapter_config_json=config_json.decode(), total_size=len(weights), **header))
    for i in range(0, len(weights), chunk):
        yield pb.RegisterAdapterRequest(chunk=weights[i:i + chunk])


def _request(adapter_id: str, prompt, max_new_tokens: int) -> ipb.GenerateRequest:
    params = ipb.SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True)
    if isinstance(prompt, str):
        return ipb.GenerateRequest(adapter_id=adapter_id, prompt=prompt, params=params)
    return ipb.GenerateRequest(adapter_id=adapter_id, prompt_token_ids=ipb.TokenIds(ids=list(prompt)), params=params)


class Client:
    def __init__(self, target: str, key: Optional[str] = None):
        self.channel = grpc.insecure_channel(target)
        self.adapters = pb_grpc.AdaptersStub(self.channel)
        self.inference = ipb_grpc.InferenceStub(self.channel)
        self.md = auth(key)

    def register(self, name: str, config_json: bytes, weights: bytes, **header) -> pb.RegisterAdapterResponse:
        return self.adapters.RegisterAdapter(upload_requests(name, config_json, weights, **header),
                                             metadata=self.md, timeout=60)

    def generate(self, adapter_id: str, prompt, max_new_tokens: int, timeout: float = 60,
                 metadata=None) -> ipb.GenerateResponse:
        """Unary greedy generation; `prompt` is text or a list of token ids."""
        return self.inference.Generate(_request(adapter_id, prompt, max_new_tokens),
                                       metadata=self.md if metadata is None else metadata, timeout=timeout)

    def stream(self, adapter_id: str, prompt: str, max_new_tokens: int, timeout: float = 60,
               metadata=None) -> tuple[list[int], str, int, int]:
        """(token ids, adapter id, adapter version, finish reason) of one streamed generation."""
        ids: list[int] = []
        adapter, version, finish = "", 0, 0
        for chunk in self.inference.GenerateStream(_request(adapter_id, prompt, max_new_tokens),
                                                   metadata=self.md if metadata is None else metadata,
                                                   timeout=timeout):
            ids.extend(chunk.token_ids)
            adapter = chunk.adapter_id or adapter
            version = chunk.adapter_version or version
            finish = chunk.finish_reason or finish
        return ids, adapter, version, finish

    def close(self) -> None:
        self.channel.close()
