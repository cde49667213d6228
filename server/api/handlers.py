"""Bind gRPC services so that any request bytes get a status a client can act on.

gRPC's generated `add_XServicer_to_server` parses requests with `Message.FromString`;
bytes that do not parse raise inside gRPC and the client gets UNKNOWN ("Exception
deserializing request"), which reads like a server fault. Here every method's
deserializer returns an `Undecodable` marker instead, and the method answers
INVALID_ARGUMENT naming the message type it expected (a client-streamed RPC when it
reads the bad message).

The same wrapper holds the server's own limit on RPCs in progress
(`--max-concurrent-rpcs`), so an over-limit call is refused with RESOURCE_EXHAUSTED and a
message naming the knob; health checks are exempt, so liveness probes still answer on a
saturated server (gRPC's own limit sits `HEADROOM` above ours as the last backstop).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Optional

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor

from server.core.errors import InvalidRequestError

HEADROOM = 64  # gRPC-level RPC slots beyond --max-concurrent-rpcs, for health checks and reflection
EXEMPT_SERVICES = ("grpc.health.v1.Health",)


@dataclass(frozen=True)
class Undecodable:
    """Stands in for a request message whose bytes did not parse."""

    type_name: str
    reason: str
    size: int

    def error(self) -> InvalidRequestError:
        return InvalidRequestError("request", f"{self.size} bytes do not decode as {self.type_name} "
                                   f"({self.reason[:200]}); send a serialized {self.type_name}")


class UndecodableRequestError(InvalidRequestError):
    """Raised to a client-streaming servicer when it reads a message that did not parse."""


class RpcLimiter:
    """Counts RPCs in progress (the event loop is single-threaded, so a plain int is enough)."""

    def __init__(self, limit: int):
        self.limit = int(limit)
        self.in_progress = 0

    def refusal(self) -> Optional[str]:
        if self.in_progress >= self.limit:
            return (f"the server has {self.in_progress} RPCs in progress, its limit (--max-concurrent-rpcs); "
                    "retry with backoff")
        return None


def _deserializer(cls: Any) -> Callable[[bytes], Any]:
    name = cls.DESCRIPTOR.full_name

    def parse(raw: bytes) -> Any:
        try:
            return cls.FromString(raw)
        except Exception as e:  # noqa: BLE001 - DecodeError, RecursionError, anything the parser raises
            return Undecodable(name, str(e) or type(e).__name__, len(raw))

    return parse


async def _checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for r in requests:
        if isinstance(r, Undecodable):
            e = r.error()
            raise UndecodableRequestError(e.field, str(e).partition(": ")[2])
        yield r


def _wrap(method: MethodDescriptor, behavior: Callable[..., Any], limiter: Optional[RpcLimiter]) -> Any:
    """The method handler for one RPC: decode check, limit, then the servicer's behaviour."""
    req_cls = message_factory.GetMessageClass(method.input_type)
    resp_cls = message_factory.GetMessageClass(method.output_type)
    client_streaming, server_streaming = method.client_streaming, method.server_streaming
    limited = limiter if method.containing_service.full_name not in EXEMPT_SERVICES else None

    async def enter(request: Any, context: Any) -> Any:
        """The request to hand on (aborts for an undecodable one or a full server)."""
        if limited is not None:
            message = limited.refusal()
            if message is not None:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, message)
            limited.in_progress += 1
            released = [False]

            def release(*_: Any) -> None:  # once, when the RPC ends however it ends
                if not released[0]:
                    released[0] = True
                    limited.in_progress -= 1

            context.add_done_callback(release)
        if client_streaming:
            return _checked(request)
        if isinstance(request, Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(request.error()))
        return request

    async def unary_response(request: Any, context: Any) -> Any:
        request = await enter(request, context)
        try:
            return await behavior(request, context)
        except UndecodableRequestError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

    if inspect.isasyncgenfunction(behavior):
        async def stream_response(request: Any, context: Any) -> AsyncIterator[Any]:
            request = await enter(request, context)
            try:
                async for item in behavior(request, context):
                    yield item
            except UndecodableRequestError as e:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
    else:  # a coroutine that writes with context.write()
        async def stream_response(request: Any, context: Any) -> None:  # type: ignore[misc]
            request = await enter(request, context)
            try:
                await behavior(request, context)
            except UndecodableRequestError as e:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

    kind = ("stream" if client_streaming else "unary") + "_" + ("stream" if server_streaming else "unary")
    make = getattr(grpc, f"{kind}_rpc_method_handler")
    return make(stream_response if server_streaming else unary_response,
                request_deserializer=_deserializer(req_cls), response_serializer=resp_cls.SerializeToString)


def add_service(server: Any, servicer: Any, service: ServiceDescriptor,
                limiter: Optional[RpcLimiter] = None) -> None:
    """Bind the methods of `service` that `servicer` implements (the generated add_*_to_server, made strict).

    Implemented means async: the generated base class's placeholders are plain functions that raise
    NotImplementedError, and gRPC answers an unbound method UNIMPLEMENTED without running anything.
    """
    handlers = {}
    for m in service.methods:
        behavior = getattr(servicer, m.name, None)
        if inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior):
            handlers[m.name] = _wrap(m, behavior, limiter)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)
