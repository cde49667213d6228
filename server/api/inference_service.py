"""The Inference servicer: protos in, engine requests through, deltas out.

Lifetimes: every RPC submits one engine request and owns it until the stream ends;
if the RPC ends first (client cancel, deadline, server stop) the `finally` aborts
the engine request at once, which frees its KV blocks and slot pin. The servicer
also counts in-flight calls so a drain can wait for them.
"""
from __future__ import annotations

import asyncio
import importlib.metadata
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Optional

import grpc

from server.api import translate
from server.api.errors import status_for
from server.api.gen.loraserve.v1 import inference_pb2 as pb
from server.api.gen.loraserve.v1 import inference_pb2_grpc as pb_grpc
from server.core.identity import AdapterVersion
from server.engine.types import Request
from server.core.errors import UnavailableError
from server.core.limits import check_request_id
from server.metrics import ServerMetrics

log = logging.getLogger("loraserve.requests")


@dataclass
class ServingState:
    """What the servicers share with the bootstrap: the engine once loaded, drain flag, in-flight count."""

    engine: Any = None
    resolver: Any = None            # .resolve(tenant, adapter_id) -> AdapterVersion
    model_name: str = ""
    model_fingerprint: str = ""
    default_max_new_tokens: int = 128
    draining: bool = False
    in_flight: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    tenant_of: Callable[[Any], str] = lambda context: "default"
    # Called around each generate with (tenant, prompt_tokens, max_new_tokens); returns a release callable.
    admit: Optional[Callable[[str, int, int], Callable[[int], None]]] = None

    def __post_init__(self) -> None:
        self.idle.set()

    def check_serving(self) -> Any:
        if self.draining:
            raise UnavailableError("server is shutting down; retry on another replica")
        if self.engine is None:
            raise UnavailableError("model is still loading; retry shortly")
        return self.engine


class _Call:
    """Timing, metrics and the one structured log line of a single generate RPC."""

    def __init__(self, method: str, metrics: ServerMetrics, client_id: str, engine_id: str, tenant: str):
        self.method, self.metrics = method, metrics
        self.client_id, self.engine_id, self.tenant = client_id, engine_id, tenant
        self.start = time.monotonic()
        self.last_token: Optional[float] = None
        self.first_token: Optional[float] = None
        self.adapter: Optional[AdapterVersion] = None
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.finish_reason = ""

    def on_delta(self, d: Any) -> None:
        now = time.monotonic()
        n = len(d.token_ids)
        if n:
            if self.first_token is None:
                self.first_token = now
                self.metrics.ttft.observe(now - self.start)
                n_gaps, since = n - 1, now  # tokens after the first in this delta arrived together
            else:
                n_gaps, since = n, self.last_token or now
            for _ in range(n_gaps):
                self.metrics.itl.observe((now - since) / max(n, 1))
            self.last_token = now
            self.completion_tokens += n
            self.metrics.generated_tokens.labels(self.metrics.adapter_label(self.adapter_name)).inc(n)
        if d.adapter is not None:
            self.adapter = d.adapter
        if d.finished:
            self.finish_reason = d.finish_reason or ""
            self.prompt_tokens = d.prompt_tokens
            self.completion_tokens = d.completion_tokens or self.completion_tokens

    @property
    def adapter_name(self) -> str:
        return self.adapter.name if self.adapter is not None else ""

    def done(self, code: grpc.StatusCode, message: str = "") -> None:
        latency = time.monotonic() - self.start
        self.metrics.requests.labels(self.method, code.name).inc()
        self.metrics.adapter_requests.labels(self.metrics.adapter_label(self.adapter_name)).inc()
        if code == grpc.StatusCode.OK:
            self.metrics.duration.observe(latency)
            self.metrics.prompt_tokens.inc(self.prompt_tokens)
        line = {"event": "request", "method": self.method, "request_id": self.client_id,
                "engine_request_id": self.engine_id, "tenant": self.tenant, "adapter": self.adapter_name,
                "adapter_version": self.adapter.version if self.adapter is not None else 0,
                "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "finish_reason": self.finish_reason,
                "ttft_s": round(self.first_token - self.start, 6) if self.first_token else None,
                "latency_s": round(latency, 6), "status": code.name}
        if message and code != grpc.StatusCode.OK:
            line["message"] = message[:500]
        log.info(json.dumps(line))


class InferenceServicer(pb_grpc.InferenceServicer):
    def __init__(self, state: ServingState, metrics: ServerMetrics):
        self.state = state
        self.metrics = metrics

    # -- helpers -------------------------------------------------------------------------------

    def _prepare(self, req: pb.GenerateRequest, context: Any) -> tuple[Request, str]:
        engine = self.state.check_serving()
        check_request_id(req.request_id)
        tenant = self.state.tenant_of(context)
        vocab = engine.model_config.vocab_size
        ids = translate.prompt_token_ids(req, engine.tokenizer, vocab)
        params = translate.sampling_params(req.params, self.state.default_max_new_tokens, vocab)
        adapter: Optional[AdapterVersion] = None
        if req.adapter_id:
            adapter = self.state.resolver.resolve(tenant, req.adapter_id)
        # Engine ids are always ours: client ids need not be unique, and one tenant's id never aborts another's.
        engine_id = uuid.uuid4().hex
        return Request(prompt_token_ids=ids, params=params, adapter=adapter, request_id=engine_id,
                       tenant=tenant), req.request_id or engine_id

    async def _run(self, method: str, req: pb.GenerateRequest, context: Any) -> AsyncIterator[tuple[_Call, Any]]:
        """Submit and yield (call, delta) pairs; abort the engine request if we stop early for any reason.

        Cleanup runs from `finally` and from the RPC's done callback, whichever comes first:
        a cancelled server-streaming handler may leave this generator suspended at `yield`
        until it is garbage-collected, and KV blocks must not wait for that.
        """
        call = _Call(method, self.metrics, req.request_id, "", "")
        state = self.state
        state.in_flight += 1
        state.idle.clear()
        release: list[Callable[[int], None]] = []
        engine_box: list[Any] = []
        finished = [False]
        cleaned = [False]

        def cleanup(*_: Any) -> None:
            if cleaned[0]:
                return
            cleaned[0] = True
            if engine_box and not finished[0]:
                engine_box[0].abort(call.engine_id)
            for r in release:
                r(call.completion_tokens)
            state.in_flight -= 1
            if state.in_flight == 0:
                state.idle.set()

        try:
            context.add_done_callback(cleanup)
        except (AttributeError, NotImplementedError):  # test doubles without callbacks
            pass
        try:
            try:
                request, client_id = self._prepare(req, context)
                call.client_id, call.engine_id, call.tenant = client_id, request.request_id, request.tenant
                call.adapter = request.adapter
                call.prompt_tokens = len(request.prompt_token_ids)
                if state.admit is not None:
                    release.append(state.admit(request.tenant, len(request.prompt_token_ids),
                                               request.params.max_new_tokens))
                engine = state.engine
                stream = engine.submit(request, loop=asyncio.get_running_loop())
                engine_box.append(engine)
                async for delta in stream:
                    call.on_delta(delta)
                    if delta.finished:
                        finished[0] = True
                    yield call, delta
            except (asyncio.CancelledError, GeneratorExit):
                call.done(grpc.StatusCode.CANCELLED, "cancelled by the client or deadline")
                raise
            except Exception as e:  # noqa: BLE001 - every error becomes a status, never a crash
                code, message = status_for(e)
                call.done(code, message)
                cleanup()
                await context.abort(code, message)
            else:
                call.done(grpc.StatusCode.OK)
        finally:
            cleanup()

    # -- RPCs ----------------------------------------------------------------------------------

    async def Generate(self, request: pb.GenerateRequest, context: Any) -> pb.GenerateResponse:
        ids: list[int] = []
        texts: list[str] = []
        last = None
        call = None
        async for call, delta in self._run("Generate", request, context):
            ids.extend(delta.token_ids)
            texts.append(delta.text)
            last = delta
        assert last is not None and call is not None
        return translate.response(call.client_id, ids, "".join(texts), last)

    async def GenerateStream(self, request: pb.GenerateRequest, context: Any) -> AsyncIterator[pb.GenerateStreamResponse]:
        async for call, delta in self._run("GenerateStream", request, context):
            if delta.token_ids or delta.text or delta.finished:
                yield translate.stream_chunk(call.client_id, delta)

    async def Tokenize(self, request: pb.TokenizeRequest, context: Any) -> pb.TokenizeResponse:
        try:
            engine = self.state.check_serving()
            ids = translate.prompt_token_ids(request, engine.tokenizer, engine.model_config.vocab_size)
        except Exception as e:  # noqa: BLE001
            code, message = status_for(e)
            self.metrics.requests.labels("Tokenize", code.name).inc()
            await context.abort(code, message)
        self.metrics.requests.labels("Tokenize", "OK").inc()
        return pb.TokenizeResponse(token_ids=ids)

    async def ModelInfo(self, request: pb.ModelInfoRequest, context: Any) -> pb.ModelInfoResponse:
        try:
            engine = self.state.check_serving()
        except Exception as e:  # noqa: BLE001
            code, message = status_for(e)
            await context.abort(code, message)
        return model_info(engine, self.state)


def server_version() -> str:
    try:
        return importlib.metadata.version("loraserve")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def model_info(engine: Any, state: ServingState) -> pb.ModelInfoResponse:
    from server.model.config import TARGET_MODULES

    cfg = engine.config
    mc = engine.model_config
    device = getattr(engine, "device", None) or cfg.resolve_device()
    dtype = getattr(engine, "dtype", None) or cfg.resolve_dtype(device)
    context_len = getattr(engine, "max_model_len", None) or mc.max_position_embeddings
    return pb.ModelInfoResponse(
        model_name=state.model_name or cfg.model, model_fingerprint=state.model_fingerprint,
        context_length=int(context_len), vocab_size=mc.vocab_size, device=str(getattr(device, "type", device)),
        dtype=str(dtype).removeprefix("torch."), quantization=cfg.quantize, max_rank=cfg.max_rank,
        adapter_slots=cfg.max_adapters_on_device, max_batch_size=cfg.max_batch_size, server_version=server_version(),
        lora_targets=list(TARGET_MODULES.values()), prefix_cache=cfg.prefix_cache)
