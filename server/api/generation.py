"""The one generate path both front-ends take (gRPC and the OpenAI-compatible HTTP API).

A front-end turns its message into a `GenerateInput` and calls `GenerationService.start`,
which checks the server is serving, encodes the prompt, resolves the adapter inside the
caller's tenant, holds the tenant's quota and submits one engine request; every refusal
is a typed error the front-end maps to its status (server/api/errors.py). The returned
`Generation` streams the engine's detokenized deltas and owns the engine request until
`close()`: a caller that stops early (client cancel or disconnect, deadline, server
stop) closes it, which aborts the engine request at once, freeing its KV blocks and slot
pin. One structured log line and the request metrics are written per generation,
whichever protocol carried it.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Mapping, Optional, Sequence

import grpc

from server.api import prompts
from server.api.errors import status_for
from server.api.stalls import StallMonitor
from server.core.errors import InvalidRequestError, UnavailableError
from server.core.identity import AdapterVersion
from server.core.limits import check_request_id
from server.engine.types import Delta, Request, SamplingParams
from server.metrics import ServerMetrics

log = logging.getLogger("loraserve.requests")

@dataclass
class ServingState:
    """What the front-ends share with the bootstrap: the engine once loaded, drain flag, in-flight count."""

    engine: Any = None
    resolver: Any = None            # .resolve(tenant, adapter_id) -> AdapterVersion
    model_name: str = ""
    model_fingerprint: str = ""
    default_max_new_tokens: int = 128
    draining: bool = False          # new calls are refused
    stopping: bool = False          # a signal arrived: health says not serving (calls still served in --drain-delay)
    in_flight: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    tenant_of: Callable[[Any], str] = lambda context: "default"
    # Called around each generate with (tenant, prompt_tokens, max_new_tokens); returns a release callable.
    admit: Optional[Callable[[str, int, int], Callable[[int], None]]] = None
    stalls: Optional[StallMonitor] = None  # aborts streams whose client stopped reading
    stream_interval: int = 1  # tokens a streamed message carries (--stream-interval)

    def __post_init__(self) -> None:
        self.idle.set()

    def check_serving(self) -> Any:
        if self.draining:
            raise UnavailableError("server is shutting down; retry on another replica")
        if self.engine is None:
            raise UnavailableError("model is still loading; retry shortly")
        return self.engine


@dataclass
class GenerateInput:
    """One generate request as a protocol states it: exactly one of prompt, messages, prompt_token_ids."""

    params: SamplingParams
    prompt: Optional[str] = None
    messages: Optional[list[dict[str, str]]] = None
    prompt_token_ids: Optional[list[int]] = None
    adapter_id: str = ""        # "" = the base model
    request_id: str = ""        # the client's id, echoed back; may be empty
    # How this protocol names our fields in error messages ({"max_new_tokens": "max_tokens"}).
    field_names: Mapping[str, str] = field(default_factory=dict)


class CallRecord:
    """Timing, metrics and the one structured log line of a single generation."""

    def __init__(self, method: str, metrics: ServerMetrics, client_id: str):
        self.method, self.metrics = method, metrics
        self.client_id, self.engine_id, self.tenant = client_id, "", ""
        self.start = time.monotonic()
        self.last_token: Optional[float] = None
        self.first_token: Optional[float] = None
        self.adapter: Optional[AdapterVersion] = None
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.finish_reason = ""
        self.status: Optional[grpc.StatusCode] = None

    def on_delta(self, d: Delta) -> None:
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
        """Count and log the outcome; only the first call counts."""
        if self.status is not None:
            return
        self.status = code
        latency = time.monotonic() - self.start
        self.metrics.requests.labels(self.method, code.name).inc()
        self.metrics.adapter_requests.labels(self.metrics.adapter_label(self.adapter_name)).inc()
        if code == grpc.StatusCode.OK:
            self.metrics.duration.observe(latency)
            self.metrics.prompt_tokens.inc(self.prompt_tokens)
        line = {"event": "request", "method": self.method, "request_id": self.client_id,
                "engine_request_id": self.engine_id, "tenant": self.tenant, "adapter": self.adapter_name,
                "adapter_version": self.adapter.version if self.adapter is not None else 0,
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "finish_reason": self.finish_reason,
                "ttft_s": round(self.first_token - self.start, 6) if self.first_token else None,
                "latency_s": round(latency, 6), "status": code.name}
        if message and code != grpc.StatusCode.OK:
            line["message"] = message[:500]
        log.info(json.dumps(line))


class Generation:
    """One submitted engine request: iterate `deltas()`, and always `close()` (idempotent)."""

    def __init__(self, state: ServingState, record: CallRecord, request: Request, client_id: str):
        self.state, self.record, self.request = state, record, request
        self.client_id = client_id
        self.prompt_tokens = len(request.prompt_token_ids)
        self._engine: Any = None
        self._stream: Any = None
        self._release: Optional[Callable[[int], None]] = None
        self._finished = False
        self._closed = False
        state.in_flight += 1
        state.idle.clear()

    @property
    def adapter(self) -> Optional[AdapterVersion]:
        return self.request.adapter

    async def deltas(self, coalesce: bool = False) -> AsyncIterator[Delta]:
        """The engine's deltas; an engine error is raised (after it is counted) as its typed error.
        `coalesce`: deltas waiting when the consumer looks come merged (RequestStream.coalesced)."""
        try:
            async for delta in (self._stream.coalesced() if coalesce else self._stream):
                self.record.on_delta(delta)
                if delta.finished:
                    self._finished = True
                yield delta
        except (asyncio.CancelledError, GeneratorExit):
            self.record.done(grpc.StatusCode.CANCELLED, "cancelled by the client, a deadline or the server")
            raise
        except Exception as e:  # noqa: BLE001 - counted here, mapped to a status by the front-end
            self.record.done(*status_for(e))
            raise
        else:
            self.record.done(grpc.StatusCode.OK)
        finally:
            self.close()

    def close(self) -> None:
        """Abort the engine request unless it finished, release the quota slot, leave the in-flight count."""
        if self._closed:
            return
        self._closed = True
        if self._finished:
            self.record.done(grpc.StatusCode.OK)
        else:
            self.record.done(grpc.StatusCode.CANCELLED, "closed before it finished")
            if self._engine is not None:
                self._engine.abort(self.request.request_id)
        if self._release is not None:
            self._release(self.record.completion_tokens)
        self.state.in_flight -= 1
        if self.state.in_flight == 0:
            self.state.idle.set()


def _renamed(e: InvalidRequestError, names: Mapping[str, str]) -> InvalidRequestError:
    """The same error under the protocol's name for its field (`max_new_tokens` -> `max_tokens`)."""
    new = names.get(e.field)
    if new is None:
        return e
    message = str(e)[len(e.field) + 2:] if str(e).startswith(e.field + ": ") else str(e)
    return InvalidRequestError(new, message)


class GenerationService:
    """Validation, tenant-scoped adapter resolution, quotas and engine submission for every front-end."""

    def __init__(self, state: ServingState, metrics: ServerMetrics):
        self.state = state
        self.metrics = metrics

    def start(self, method: str, make_input: Callable[[], GenerateInput], tenant_of: Callable[[], str],
              client_id: str = "", stream: bool = False) -> Generation:
        """Submit one engine request; raise a typed error (already counted and logged) if refused.
        `stream`: the client reads tokens as they come (then `--stream-interval` groups them).

        `make_input` and `tenant_of` are called here, after the serving check, so that their
        errors (a malformed message, a bad key) are counted like every other refusal.
        """
        return self.start_many(method, [make_input], tenant_of, client_id, stream)[0]

    def start_many(self, method: str, make_inputs: Sequence[Callable[[], GenerateInput]],
                   tenant_of: Callable[[], str], client_id: str = "", stream: bool = False,
                   same_adapter: bool = False) -> list[Generation]:
        """Submit several engine requests as one arrival (a prompt's choices, a list of prompts): all are
        accepted or none, and the engine schedules them side by side. `same_adapter`: every request
        runs on the adapter version the first one resolved, even if a new version lands meanwhile."""
        gens: list[Generation] = []
        records: list[CallRecord] = []
        names: Mapping[str, str] = {}
        try:
            engine = self.state.check_serving()
            for make_input in make_inputs:
                records.append(CallRecord(method, self.metrics, client_id))
                pinned = gens[0].adapter if same_adapter and gens else None
                gen, names = self._prepare(engine, records[-1], make_input, tenant_of, pinned)
                gens.append(gen)
            interval = self.state.stream_interval if stream else 1
            streams = engine.submit_many([g.request for g in gens], asyncio.get_running_loop(), interval)
        except Exception as e:  # noqa: BLE001 - counted, then the front-end maps it
            if isinstance(e, InvalidRequestError):
                e = _renamed(e, names)
            if not records:
                records.append(CallRecord(method, self.metrics, client_id))
            code, message = status_for(e)
            for record in records:
                record.done(code, message)  # none was submitted: each counts the refusal
            for g in gens:
                g.close()
            raise e from None
        for g, stream_ in zip(gens, streams):
            g._engine, g._stream = engine, stream_
        return gens

    def _prepare(self, engine: Any, record: CallRecord, make_input: Callable[[], GenerateInput],
                 tenant_of: Callable[[], str], pinned: Optional[AdapterVersion]
                 ) -> tuple[Generation, Mapping[str, str]]:
        """A Generation ready to submit (input read, tenant and adapter resolved, quota taken), and the
        protocol's names for the engine's fields, for errors."""
        names: Mapping[str, str] = {}
        try:
            inp = make_input()
            names = inp.field_names
            if pinned is not None:
                inp.adapter_id = pinned.ref
            check_request_id(inp.request_id)
            tenant = record.tenant = tenant_of()
            request = self._request(engine, inp, tenant)
        except InvalidRequestError as e:
            raise _renamed(e, names) from None
        record.client_id = inp.request_id or request.request_id
        record.engine_id = request.request_id
        record.adapter = request.adapter
        record.prompt_tokens = len(request.prompt_token_ids)
        gen = Generation(self.state, record, request, record.client_id)
        if self.state.admit is not None:
            try:
                gen._release = self.state.admit(tenant, len(request.prompt_token_ids), request.params.max_new_tokens)
            except Exception as e:  # noqa: BLE001 - counted as itself, not as the close's CANCELLED
                record.done(*status_for(e))
                gen.close()
                raise
        return gen, names

    def _request(self, engine: Any, inp: GenerateInput, tenant: str) -> Request:
        vocab = engine.model_config.vocab_size
        if inp.prompt is not None:
            ids = prompts.encode_prompt(inp.prompt, engine.tokenizer)
        elif inp.messages is not None:
            ids = prompts.encode_messages(inp.messages, engine.tokenizer)
        elif inp.prompt_token_ids is not None:
            if not inp.prompt_token_ids:
                raise InvalidRequestError("prompt_token_ids", "must contain at least one token")
            ids = prompts.check_token_ids(inp.prompt_token_ids, vocab, "prompt_token_ids")
        else:
            raise InvalidRequestError("input", "set one of prompt, messages or prompt_token_ids")
        prompts.check_token_ids(inp.params.stop_token_ids, vocab, "stop_token_ids")
        adapter: Optional[AdapterVersion] = None
        if inp.adapter_id:
            adapter = self.state.resolver.resolve(tenant, inp.adapter_id)
        # Engine ids are always ours: client ids need not be unique, and one tenant's id never aborts another's.
        return Request(prompt_token_ids=ids, params=inp.params, adapter=adapter, request_id=uuid.uuid4().hex,
                       tenant=tenant)
