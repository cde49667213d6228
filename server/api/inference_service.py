"""The Inference servicer: protos in, `GenerationService` through, deltas out.

Lifetimes: every generate RPC starts one `Generation` (server/api/generation.py, the path
the HTTP API takes too) and owns it until the stream ends; if the RPC ends first (client
cancel, deadline, server stop) the RPC's done callback or the `finally` closes it, which
aborts the engine request at once and frees its KV blocks and slot pin.
"""
from __future__ import annotations

import asyncio
import importlib.metadata
from typing import Any, AsyncIterator, Callable

import grpc

from server.api import translate
from server.api.errors import status_for
from server.api.gen.loraserve.v1 import inference_pb2 as pb
from server.api.gen.loraserve.v1 import inference_pb2_grpc as pb_grpc
from server.api.generation import Generation, GenerationService, ServingState
from server.api.stalls import StallMonitor
from server.engine.types import Delta
from server.metrics import ServerMetrics

__all__ = ["InferenceServicer", "ServingState", "model_info", "server_version"]


class InferenceServicer(pb_grpc.InferenceServicer):
    def __init__(self, state: ServingState, metrics: ServerMetrics):
        self.state = state
        self.metrics = metrics
        self.service = GenerationService(state, metrics)

    async def _run(self, method: str, req: pb.GenerateRequest, context: Any) -> AsyncIterator[tuple[Generation, Delta]]:
        """Start a generation and yield (generation, delta) pairs; every error ends the RPC with its status.

        Cleanup also runs from the RPC's done callback: a cancelled server-streaming handler may
        leave this generator suspended at `yield` until it is garbage-collected, and KV blocks
        must not wait for that.
        """
        try:
            gen = self.service.start(
                method, lambda: translate.generate_input(req, self.state.default_max_new_tokens),
                lambda: self.state.tenant_of(context), client_id=req.request_id, stream=method == "GenerateStream")
        except Exception as e:  # noqa: BLE001 - already counted; every error becomes a status
            await context.abort(*status_for(e))
        try:
            context.add_done_callback(lambda _: gen.close())
        except (AttributeError, NotImplementedError):  # test doubles without callbacks
            pass
        try:
            # gRPC takes several tokens a message: a consumer behind the engine catches up in one.
            async for delta in gen.deltas(coalesce=True):
                yield gen, delta
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as e:  # noqa: BLE001
            gen.close()
            await context.abort(*status_for(e))
        finally:
            gen.close()

    # -- RPCs ----------------------------------------------------------------------------------

    async def Generate(self, request: pb.GenerateRequest, context: Any) -> pb.GenerateResponse:
        ids: list[int] = []
        texts: list[str] = []
        logprobs: list[Any] = []
        last = None
        gen = None
        async for gen, delta in self._run("Generate", request, context):
            ids.extend(delta.token_ids)
            texts.append(delta.text)
            logprobs.extend(delta.logprobs or ())
            last = delta
        assert last is not None and gen is not None
        return translate.response(gen.client_id, ids, "".join(texts), last, logprobs)

    async def GenerateStream(self, request: pb.GenerateRequest, context: Any) -> AsyncIterator[pb.GenerateStreamResponse]:
        current: list[Generation] = []
        stalls = self.state.stalls
        watch = stalls.watch(self._on_stall(stalls, context, current)) if stalls is not None else None
        try:
            async for gen, delta in self._run("GenerateStream", request, context):
                current[:] = [gen]
                if delta.token_ids or delta.text or delta.finished:
                    chunk = translate.stream_chunk(gen.client_id, delta)
                    if watch is not None:
                        watch.writing()  # gRPC's write of this chunk waits while the client's window is full
                    yield chunk
                    if watch is not None:
                        watch.written()
        finally:
            if watch is not None:
                stalls.forget(watch)

    @staticmethod
    def _on_stall(stalls: StallMonitor, context: Any, current: list[Generation]) -> Callable[[], None]:
        """What the stall monitor does to this stream: log, end the RPC, cancel its task (whose done
        callback aborts the engine request: KV blocks and the slot pin are freed at once)."""
        task = asyncio.current_task()

        def on_stall() -> None:
            message = stalls.message
            if current:
                current[0].record.done(grpc.StatusCode.RESOURCE_EXHAUSTED, message)
            abort = asyncio.ensure_future(_abort_quietly(context, grpc.StatusCode.RESOURCE_EXHAUSTED, message))
            _PENDING_ABORTS.add(abort)  # the loop holds tasks weakly: kept until done, so it cannot be collected
            abort.add_done_callback(_PENDING_ABORTS.discard)
            if task is not None:
                task.cancel()

        return on_stall

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


_PENDING_ABORTS: set[asyncio.Future] = set()


async def _abort_quietly(context: Any, code: grpc.StatusCode, message: str) -> None:
    """Queue the status for a client that may read it later (or never: then gRPC drops it with the connection)."""
    try:
        await context.abort(code, message)
    except BaseException:  # noqa: BLE001 - AbortError is how abort returns; a closed call is fine too
        pass


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
        adapter_slots=getattr(getattr(engine, "pool", None), "sure_capacity", cfg.max_adapters_on_device),
        max_batch_size=cfg.max_batch_size, server_version=server_version(),
        lora_targets=list(TARGET_MODULES.values()), prefix_cache=cfg.prefix_cache)
