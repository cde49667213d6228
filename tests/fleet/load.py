"""Steady client load through the proxy while a test breaks things, with every call recorded."""
from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import grpc

from server.api.gen.loraserve.v1 import inference_pb2 as pb
from server.api.gen.loraserve.v1 import inference_pb2_grpc as pb_grpc
from server.client.routing import CHANNEL_OPTIONS, failed_call, routing_metadata

PROMPT = "the quick brown fox"
MAX_NEW_TOKENS = 12


@dataclass
class Call:
    start: float
    end: float
    adapter: str
    kind: str              # "unary" | "stream"
    code: str              # status name as our clients report it (server.client.routing.failed_call)
    details: str
    tokens: tuple[int, ...]
    finish: int            # FinishReason; 0 when the call never finished
    version: int
    grpc_code: str = "OK"  # the status name gRPC itself gave

    @property
    def ok(self) -> bool:
        return self.code == "OK"


def request(adapter_id: str, max_new_tokens: int = MAX_NEW_TOKENS) -> pb.GenerateRequest:
    return pb.GenerateRequest(adapter_id=adapter_id, prompt=PROMPT,
                              params=pb.SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True))


def call(stub: pb_grpc.InferenceStub, adapter_id: str, kind: str = "unary", header: Optional[str] = None,
         max_new_tokens: int = MAX_NEW_TOKENS, timeout: float = 60) -> Call:
    """One generate call; `header` overrides the routing key (None: our clients' own, '' : no header)."""
    md = routing_metadata(adapter_id if header is None else header)
    t0 = time.monotonic()
    tokens: list[int] = []
    finish = version = 0
    code, details = "OK", ""
    try:
        if kind == "stream":
            for c in stub.GenerateStream(request(adapter_id, max_new_tokens), metadata=md, timeout=timeout):
                tokens.extend(c.token_ids)
                finish = c.finish_reason or finish
                version = c.adapter_version or version
        else:
            r = stub.Generate(request(adapter_id, max_new_tokens), metadata=md, timeout=timeout)
            tokens, finish, version = list(r.token_ids), r.finish_reason, r.adapter_version
    except grpc.RpcError as e:
        code, details = failed_call(e)
        return Call(t0, time.monotonic(), adapter_id, kind, code, details, tuple(tokens), finish, version,
                    e.code().name)
    return Call(t0, time.monotonic(), adapter_id, kind, code, details, tuple(tokens), finish, version)


class Load:
    """`threads` clients in a loop over `adapters`, half unary, half streaming, through `target`."""

    def __init__(self, target: str, adapters: Sequence[str], threads: int = 4,
                 max_new_tokens: int = MAX_NEW_TOKENS):
        self.adapters = list(adapters)
        self.max_new_tokens = max_new_tokens
        self.channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        self.stub = pb_grpc.InferenceStub(self.channel)
        self.calls: list[Call] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._go = threading.Event()
        self._go.set()
        self._in_flight = 0
        self._threads = [threading.Thread(target=self._run, args=(k, threads), daemon=True) for k in range(threads)]

    def _run(self, k: int, n: int) -> None:
        i = k
        while not self._stop.is_set():
            self._go.wait()
            with self._lock:
                if not self._go.is_set():
                    continue
                self._in_flight += 1
            c = call(self.stub, self.adapters[i % len(self.adapters)], "stream" if k % 2 else "unary",
                     max_new_tokens=self.max_new_tokens)
            with self._lock:
                self.calls.append(c)
                self._in_flight -= 1
            i += n

    @contextlib.contextmanager
    def paused(self, timeout: float = 60) -> Iterator[None]:
        """No call of this load in flight inside the block: the proxy sees only what the test sends."""
        with self._lock:
            self._go.clear()
        t0 = time.monotonic()
        while True:
            with self._lock:
                if not self._in_flight:
                    break
            if time.monotonic() - t0 > timeout:
                raise AssertionError(f"load calls still in flight after {timeout}s")
            time.sleep(0.01)
        try:
            yield
        finally:
            self._go.set()

    def __enter__(self) -> "Load":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._go.set()
        for t in self._threads:
            t.join(90)
        self.channel.close()

    def since(self, t: float) -> list[Call]:
        with self._lock:
            return [c for c in self.calls if c.start >= t]

    def wait_calls(self, n: int, after: float, timeout: float = 60) -> None:
        t0 = time.monotonic()
        while len([c for c in self.since(after) if c.ok]) < n:
            if time.monotonic() - t0 > timeout:
                raise AssertionError(f"fewer than {n} calls finished in {timeout}s")
            time.sleep(0.05)
