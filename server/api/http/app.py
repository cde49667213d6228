"""The OpenAI-compatible HTTP API: a FastAPI app over the same `GenerationService` as gRPC.

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /v1/models/{id},
GET /health (200 only while serving), GET /metrics (Prometheus text). Every /v1 route takes
`Authorization: Bearer KEY` (and, for admins, `x-loraserve-tenant`) exactly as gRPC metadata;
`x-loraserve-adapter`, a fleet proxy's routing key (docs/fleet.md), is never read: the body's `model`
decides what is served. Errors are OpenAI-shaped with the status their gRPC code maps to (server/api/errors.py).

Each request owns its generations from start to response: a client that disconnects (streaming
or not) closes them, which aborts the engine requests at once.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Optional, Sequence

import grpc
from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request

from server.api.auth import TENANT_HEADER, Caller, authenticate, log_refusal, refusal_reason
from server.api.errors import HttpError, http_error_for, status_for
from server.api.generation import Generation, GenerationService, GenerateInput, ServingState
from server.api.http import convert
from server.api.http.errors import error_response, respond, validation_error
from server.api.http.limits import BodyLimit
from server.api.http.schemas import ChatCompletionRequest, CompletionRequest
from server.api.http.streaming import DONE, abandon_response, merged, sse, until_disconnected, watched
from server.api.stalls import StallMonitor
from server.api.tenants import TenantDirectory
from server.core.errors import AdapterNotFoundError, InvalidRequestError, LoraServeError
from server.engine.types import Delta
from server.metrics import ServerMetrics

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class _ClientGone(Exception):
    """The client disconnected before its answer began."""


@dataclass
class HttpContext:
    """What the HTTP API shares with gRPC: serving state, the generate path, tenants, metrics."""

    state: ServingState
    metrics: ServerMetrics
    tenants: TenantDirectory
    names: convert.ModelNames
    max_request_bytes: int = 4 << 20
    service: Optional[GenerationService] = None
    started_at: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        if self.service is None:
            self.service = GenerationService(self.state, self.metrics)


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Any] = field(default_factory=list)
    finish_reason: Optional[str] = None


class GenerationResponse(StreamingResponse):
    """A server-sent event stream that closes its generations however it ends (disconnect included).

    With a stall monitor (--stalled-stream-timeout), every write is watched: uvicorn's write waits while the
    connection's buffers are full, i.e. while the client reads nothing, and one that waits past the timeout
    ends the response the way gRPC's does (docs/reliability.md): the generations are aborted (KV blocks and
    the slot pin freed at the engine's next turn), the request is logged RESOURCE_EXHAUSTED, and the
    connection is closed (no status can follow a 200 already sent).
    """

    def __init__(self, content: AsyncIterator[bytes], gens: Sequence[Generation],
                 stalls: Optional[StallMonitor] = None):
        super().__init__(content, media_type="text/event-stream", headers=SSE_HEADERS)
        self._gens = gens
        self._stalls = stalls if stalls is not None and stalls.enabled else None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        watch = None
        if self._stalls is not None:
            watch = self._stalls.watch(self._on_stall(self._stalls, asyncio.current_task()))
            send = watched(send, watch)
        try:
            await super().__call__(scope, receive, send)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if watch is None or not watch.stalled or task is None:
                raise
            task.uncancel()  # ours, not the server's: end this response quietly
            abandon_response()
        finally:
            if watch is not None and self._stalls is not None:
                self._stalls.forget(watch)
            for g in self._gens:
                g.close()

    def _on_stall(self, stalls: StallMonitor, task: Optional["asyncio.Task[Any]"]) -> Callable[[], None]:
        def on_stall() -> None:
            for g in self._gens:
                g.record.done(grpc.StatusCode.RESOURCE_EXHAUSTED, stalls.message)
            if task is not None:
                task.cancel()

        return on_stall


class OpenAIApi:
    def __init__(self, ctx: HttpContext):
        self.ctx = ctx
        self.service: GenerationService = ctx.service  # type: ignore[assignment]

    # ---- shared steps ----------------------------------------------------------------------------
    def _caller(self, request: Request) -> Caller:
        """The caller, or its refusal counted and logged exactly as gRPC's interceptor does (never the key)."""
        headers = {"authorization": request.headers.get("authorization", ""),
                   TENANT_HEADER: request.headers.get(TENANT_HEADER, "")}
        try:
            return authenticate(self.ctx.tenants, headers)
        except LoraServeError as e:
            reason = refusal_reason(e, headers)
            self.ctx.metrics.count_auth_failure(reason)
            peer = f"{request.client.host}:{request.client.port}" if request.client else ""
            log_refusal(f"{request.method} {request.url.path}", reason, peer, status_for(e)[0].name)
            raise

    async def _body(self, request: Request, model: type[BaseModel]) -> Any:
        raw = await request.body()
        try:
            return model.model_validate_json(raw or b"null")
        except ValidationError as e:
            raise validation_error(e) from None

    def _start(self, method: str, inputs: list[GenerateInput], caller: Caller, model: str,
               stream: bool = False) -> list[Generation]:
        """Start every choice as one arrival, all on the adapter version the first one resolved."""
        try:
            return self.service.start_many(method, [lambda inp=inp: inp for inp in inputs],
                                           lambda: caller.acting_for, stream=stream, same_adapter=True)
        except InvalidRequestError as e:
            if e.field == "model":
                raise AdapterNotFoundError(model) from None  # a malformed id names no model either
            raise

    async def _collect(self, gens: Sequence[Generation]) -> list[_Choice]:
        choices = [_Choice() for _ in gens]
        async for i, d in merged(gens):
            c = choices[i]
            c.text.append(d.text)
            c.token_ids.extend(d.token_ids)
            c.logprobs.extend(d.logprobs or ())
            if d.finished:
                c.finish_reason = d.finish_reason
        return choices

    async def _unary(self, request: Request, gens: Sequence[Generation],
                     build: Callable[[list[_Choice]], dict[str, Any]]) -> Response:
        """Collect every choice, unless the client disconnects first (then abort them all)."""
        collect = asyncio.ensure_future(self._collect(gens))
        gone = asyncio.ensure_future(until_disconnected(request.receive))
        try:
            await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not collect.done():
                return Response(status_code=499)  # nobody is listening; the finally aborts the work
            try:
                choices = collect.result()
            except Exception as e:  # noqa: BLE001
                return error_response(e)
            return JSONResponse(build(choices))
        finally:
            for task in (collect, gone):
                task.cancel()
            for g in gens:
                g.close()

    async def _stream(self, request: Request, gens: Sequence[Generation],
                      events: Callable[[AsyncIterator[tuple[int, Delta]]], AsyncIterator[bytes]]) -> Response:
        """An event stream that opens with the first delta, so refusals before it keep their HTTP status.

        An adapter that cannot be loaded, for example, fails before the first token: the client gets
        503, not 200 and an error event. A client that leaves while waiting still aborts the work.
        """
        deltas = merged(gens)
        first_delta = asyncio.ensure_future(deltas.__anext__())
        gone = asyncio.ensure_future(until_disconnected(request.receive))
        try:
            await asyncio.wait({first_delta, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not first_delta.done():
                raise _ClientGone
            first = first_delta.result()
        except BaseException as e:
            first_delta.cancel()
            for g in gens:
                g.close()
            if isinstance(e, _ClientGone):
                return Response(status_code=499)
            if isinstance(e, Exception):
                return error_response(e)
            raise
        finally:
            gone.cancel()

        async def all_deltas() -> AsyncIterator[tuple[int, Delta]]:
            yield first
            async for item in deltas:
                yield item

        return GenerationResponse(events(all_deltas()), gens, self.ctx.state.stalls)

    def _usage(self, gens: Sequence[Generation], n: int) -> dict[str, int]:
        prompt = sum(g.prompt_tokens for g in gens[::n])  # each prompt once, however many choices
        return convert.usage(prompt, sum(g.record.completion_tokens for g in gens))

    def _texts(self) -> convert.TokenTexts:
        return convert.TokenTexts(self.ctx.state.engine.tokenizer)

    # ---- /v1/completions -------------------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        try:
            caller = self._caller(request)
            body: CompletionRequest = await self._body(request, CompletionRequest)
            inputs = convert.completion_inputs(body, self.ctx.names, self.ctx.state.default_max_new_tokens)
            gens = self._start("Completions", inputs, caller, body.model, body.stream)
        except Exception as e:  # noqa: BLE001
            return error_response(e)
        model = self.ctx.names.served(gens[0])
        cid, created = convert.new_id("cmpl"), convert.now()
        texts = self._texts() if body.logprobs is not None else None

        def choice(i: int, c: _Choice) -> dict[str, Any]:
            out: dict[str, Any] = {"index": i, "text": "".join(c.text), "logprobs": None,
                                   "finish_reason": convert.finish_reason(c.finish_reason)}
            if texts is not None:
                out["logprobs"] = convert.completion_logprobs(c.logprobs, texts, 0)
            if body.return_token_ids:
                out["token_ids"] = c.token_ids
            return out

        if not body.stream:
            return await self._unary(request, gens, lambda cs: {
                "id": cid, "object": "text_completion", "created": created, "model": model,
                "choices": [choice(i, c) for i, c in enumerate(cs)], "usage": self._usage(gens, body.n)})
        return await self._stream(request, gens, lambda deltas: self._completion_events(
            body, gens, deltas, cid, created, model, texts))

    async def _completion_events(self, body: CompletionRequest, gens: list[Generation],
                                 deltas: AsyncIterator[tuple[int, Delta]], cid: str, created: int, model: str,
                                 texts: Optional[convert.TokenTexts]) -> AsyncIterator[bytes]:
        offsets = [0] * len(gens)

        def choice(i: int, d: Delta) -> dict[str, Any]:
            c: dict[str, Any] = {"index": i, "text": d.text, "logprobs": None,
                                 "finish_reason": convert.finish_reason(d.finish_reason)}
            if texts is not None:
                c["logprobs"] = lp = convert.completion_logprobs(d.logprobs or (), texts, offsets[i])
                offsets[i] += sum(len(t) for t in lp["tokens"])
            if body.return_token_ids:
                c["token_ids"] = d.token_ids
            return c

        head = {"id": cid, "object": "text_completion", "created": created, "model": model}
        async for event in self._events(gens, deltas, head, body.stream_options, body.n, choice):
            yield event

    async def _events(self, gens: Sequence[Generation], deltas: AsyncIterator[tuple[int, Delta]],
                      head: dict[str, Any], stream_options: Any, usage_n: int,
                      choice: Callable[[int, Delta], dict[str, Any]],
                      opening: Sequence[dict[str, Any]] = ()) -> AsyncIterator[bytes]:
        """The event stream both endpoints send: `opening` chunks, a chunk per delta that carries something, the
        usage chunk when `stream_options.include_usage` asks, an error (after the 200) as an event, then [DONE]."""
        include_usage = bool(stream_options and stream_options.include_usage)

        def chunk(c: dict[str, Any]) -> bytes:
            out = {**head, "choices": [c]}
            if include_usage:
                out["usage"] = None
            return sse(out)

        try:
            for c in opening:
                yield chunk(c)
            async for i, d in deltas:
                if d.token_ids or d.text or d.finished:
                    yield chunk(choice(i, d))
            if include_usage:
                yield sse({**head, "choices": [], "usage": self._usage(gens, usage_n)})
        except Exception as e:  # noqa: BLE001 - the status line is sent: the error travels as an event
            yield sse(http_error_for(e).body())
        yield DONE

    # ---- /v1/chat/completions --------------------------------------------------------------------
    async def chat_completions(self, request: Request) -> Response:
        try:
            caller = self._caller(request)
            body: ChatCompletionRequest = await self._body(request, ChatCompletionRequest)
            inputs = convert.chat_inputs(body, self.ctx.names, self.ctx.state.default_max_new_tokens)
            gens = self._start("ChatCompletions", inputs, caller, body.model, body.stream)
        except Exception as e:  # noqa: BLE001
            return error_response(e)
        model = self.ctx.names.served(gens[0])
        cid, created = convert.new_id("chatcmpl"), convert.now()
        texts = self._texts() if body.logprobs else None

        def choice(i: int, c: _Choice) -> dict[str, Any]:
            out: dict[str, Any] = {"index": i, "message": {"role": "assistant", "content": "".join(c.text)},
                                   "logprobs": convert.chat_logprobs(c.logprobs, texts) if texts else None,
                                   "finish_reason": convert.finish_reason(c.finish_reason)}
            if body.return_token_ids:
                out["token_ids"] = c.token_ids
            return out

        if not body.stream:
            return await self._unary(request, gens, lambda cs: {
                "id": cid, "object": "chat.completion", "created": created, "model": model,
                "choices": [choice(i, c) for i, c in enumerate(cs)], "usage": self._usage(gens, len(gens))})
        return await self._stream(request, gens, lambda deltas: self._chat_events(
            body, gens, deltas, cid, created, model, texts))

    async def _chat_events(self, body: ChatCompletionRequest, gens: list[Generation],
                           deltas: AsyncIterator[tuple[int, Delta]], cid: str, created: int, model: str,
                           texts: Optional[convert.TokenTexts]) -> AsyncIterator[bytes]:
        def choice(i: int, d: Delta) -> dict[str, Any]:
            c: dict[str, Any] = {"index": i, "delta": {"content": d.text} if (d.text or d.token_ids) else {},
                                 "logprobs": convert.chat_logprobs(d.logprobs or (), texts) if texts else None,
                                 "finish_reason": convert.finish_reason(d.finish_reason)}
            if body.return_token_ids:
                c["token_ids"] = d.token_ids
            return c

        head = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model}
        roles = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                 for i in range(len(gens))]
        async for event in self._events(gens, deltas, head, body.stream_options, len(gens), choice, roles):
            yield event

    # ---- /v1/models ----------------------------------------------------------------------------------
    def _base_card(self) -> dict[str, Any]:
        engine = self.ctx.state.engine
        return {"id": self.ctx.names.base_id, "object": "model", "created": self.ctx.started_at,
                "owned_by": "loraserve", "root": self.ctx.state.model_name or self.ctx.names.base_id,
                "parent": None, "max_model_len": int(getattr(engine, "max_model_len", 0) or 0)}

    def _card(self, model_id: str, root: str, created: float, tenant: str) -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": int(created), "owned_by": tenant, "root": root,
                "parent": self.ctx.names.base_id,
                "max_model_len": int(getattr(self.ctx.state.engine, "max_model_len", 0) or 0)}

    def _adapter_cards(self, tenant: str) -> list[dict[str, Any]]:
        cards = []
        for info in self.ctx.state.resolver.list(tenant):
            latest = info.versions[-1]
            cards.append(self._card(info.name, latest.ref, latest.created_at, tenant))
            cards.extend(self._card(v.ref, v.ref, v.created_at, tenant) for v in info.versions)
        return cards

    def _adapter_card(self, tenant: str, model_id: str) -> dict[str, Any]:
        try:
            info = self.ctx.state.resolver.get(tenant, model_id)
        except InvalidRequestError:
            raise AdapterNotFoundError(model_id) from None
        v = info.versions[-1]  # `name` and `name@latest`: the newest; `name@N`: that one
        return self._card(model_id, v.ref, v.created_at, tenant)

    async def list_models(self, request: Request) -> Response:
        try:
            caller = self._caller(request)
            self.ctx.state.check_serving()
            cards = [self._base_card(), *await asyncio.to_thread(self._adapter_cards, caller.acting_for)]
        except Exception as e:  # noqa: BLE001
            return error_response(e)
        return JSONResponse({"object": "list", "data": cards})

    async def get_model(self, request: Request, model_id: str) -> Response:
        try:
            caller = self._caller(request)
            self.ctx.state.check_serving()
            if not self.ctx.names.adapter_of(model_id):
                return JSONResponse(self._base_card())
            card = await asyncio.to_thread(self._adapter_card, caller.acting_for, model_id)
        except Exception as e:  # noqa: BLE001
            return error_response(e)
        return JSONResponse(card)

    # ---- health and metrics --------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        state = self.ctx.state
        status = "draining" if state.draining or state.stopping else "loading" if state.engine is None else "serving"
        return JSONResponse({"status": status}, status_code=200 if status == "serving" else 503)

    async def prometheus(self, request: Request) -> Response:
        data = await asyncio.to_thread(generate_latest, self.ctx.metrics.registry)
        return Response(data, media_type=CONTENT_TYPE_LATEST)


async def _http_exception(request: Request, exc: StarletteHTTPException) -> Response:
    """Unknown routes and methods, in the same error shape as everything else."""
    what = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
    return respond(HttpError.of(exc.status_code, what.get(exc.status_code, str(exc.detail)),
                                code={404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)))


def create_app(ctx: HttpContext) -> FastAPI:
    api = OpenAIApi(ctx)
    app = FastAPI(title="loraserve", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_api_route("/v1/completions", api.completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", api.chat_completions, methods=["POST"])
    app.add_api_route("/v1/models", api.list_models, methods=["GET"])
    app.add_api_route("/v1/models/{model_id}", api.get_model, methods=["GET"])
    app.add_api_route("/health", api.health, methods=["GET"])
    app.add_api_route("/metrics", api.prometheus, methods=["GET"])
    app.add_exception_handler(StarletteHTTPException, _http_exception)  # type: ignore[arg-type]
    app.add_middleware(BodyLimit, limit=ctx.max_request_bytes)
    return app
