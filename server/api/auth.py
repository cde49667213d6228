"""The one authentication interceptor, and how a servicer learns who is calling.

With a tenants file every RPC except health and reflection must carry
`authorization: Bearer KEY`; the key's sha256 picks the tenant (UNAUTHENTICATED when
missing or wrong). An admin may act for another tenant with the `x-loraserve-tenant`
metadata (or the `tenant` field of an Adapters request); anyone else naming a tenant
not their own gets PERMISSION_DENIED. Without a tenants file no interceptor is installed
and every caller is the single open tenant with admin rights.

Live inference quotas (concurrent requests, tokens per minute) are held by the server's
`ServingState.admit` hook with a `QuotaTracker`, which knows the prompt length up front.
A server without that hook can pass `quotas=` here instead: the interceptor then holds a
slot around Generate/GenerateStream and charges the usage the responses report.
"""
from __future__ import annotations

import contextvars
import inspect
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Optional

import grpc

from adapter_registry.ids import check_tenant
from server.api.tenants import OPEN_TENANT, QuotaTracker, Tenant, TenantDirectory
from server.api.errors import status_for
from server.core.errors import AuthenticationError, InvalidRequestError, LoraServeError, PermissionDeniedError

log = logging.getLogger("loraserve.auth")

TENANT_HEADER = "x-loraserve-tenant"
# Why an authentication was refused: the label values of loraserve_auth_failures (never the key itself).
REFUSAL_REASONS = ("missing_key", "wrong_key", "permission_denied", "unknown_tenant")
EXEMPT_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
QUOTA_METHODS = ("/loraserve.v1.Inference/Generate", "/loraserve.v1.Inference/GenerateStream")


@dataclass(frozen=True)
class Caller:
    """The authenticated tenant, and the tenant it acts for (differs only for admins)."""

    tenant: Tenant
    acting_for: str
    known_tenants: Optional[frozenset[str]] = None  # None: open mode, any tenant name goes

    @property
    def is_admin(self) -> bool:
        return self.tenant.is_admin

    def act_for(self, tenant: str) -> str:
        """The tenant a request's own `tenant` field selects ('' = the caller's)."""
        if not tenant or tenant == self.acting_for:
            return self.acting_for
        check_tenant(tenant)
        if not self.is_admin:
            raise PermissionDeniedError(f"tenant {self.tenant.name!r} may not act for another tenant")
        if self.known_tenants is not None and tenant not in self.known_tenants:
            raise InvalidRequestError("tenant", f"{tenant!r} is not in the tenants file")
        return tenant


OPEN_CALLER = Caller(Tenant(OPEN_TENANT, "admin"), OPEN_TENANT)
_current: contextvars.ContextVar[Optional[Caller]] = contextvars.ContextVar("loraserve_caller", default=None)


def _bearer(metadata: dict[str, str]) -> Optional[str]:
    value = metadata.get("authorization", "")
    scheme, _, key = value.partition(" ")
    return key.strip() or None if scheme.lower() == "bearer" else None


def authenticate(directory: TenantDirectory, metadata: dict[str, str]) -> Caller:
    """Caller from request metadata; AuthenticationError / PermissionDeniedError otherwise."""
    tenant = directory.authenticate(_bearer(metadata))
    known = None if directory.open_mode else frozenset(directory.tenants)
    caller = Caller(tenant, tenant.name, known)
    acting = metadata.get(TENANT_HEADER, "")
    return Caller(tenant, caller.act_for(acting), known) if acting else caller


def refusal_reason(exc: LoraServeError, metadata: dict[str, str]) -> str:
    """One of REFUSAL_REASONS for an error `authenticate` raised (for the failed-auth counter and log)."""
    if isinstance(exc, AuthenticationError):
        return "missing_key" if _bearer(metadata) is None else "wrong_key"
    if isinstance(exc, PermissionDeniedError):
        return "permission_denied"
    return "unknown_tenant"


def log_refusal(method: str, reason: str, peer: str, status: str) -> None:
    """The `auth_refused` line, whichever protocol refused: method, reason and peer, never the key."""
    log.info(json.dumps({"event": "auth_refused", "method": method, "reason": reason, "peer": peer,
                         "status": status}))


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates every RPC but health and reflection; `on_refused(reason)` counts each refusal."""

    def __init__(self, directory: TenantDirectory, quotas: Optional[QuotaTracker] = None,
                 on_refused: Optional[Callable[[str], None]] = None):
        self.directory = directory
        self.quotas = quotas
        self.on_refused = on_refused

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]], details: Any) -> Any:
        handler = await continuation(details)
        method = details.method or ""
        if handler is None or method.startswith(EXEMPT_PREFIXES):
            return handler
        metadata = {k.lower(): v for k, v in (details.invocation_metadata or ()) if isinstance(v, str)}
        try:
            caller = authenticate(self.directory, metadata)
        except LoraServeError as e:
            reason = refusal_reason(e, metadata)
            if self.on_refused is not None:
                self.on_refused(reason)
            return _refusing(handler, e, method, reason)
        if self.quotas is None or method not in QUOTA_METHODS:
            return _wrapped(handler, caller, None, None)
        # quotas belong to the tenant the work is for: an admin acting for one spends its quota
        quota_tenant = self.directory.get(caller.acting_for) or Tenant(caller.acting_for)
        return _wrapped(handler, caller, self.quotas, quota_tenant)


def _peer(context: Any) -> str:
    try:
        return str(context.peer())
    except Exception:  # noqa: BLE001 - a peer is a nicety in a log line
        return ""


def _usage_tokens(msg: Any) -> Optional[int]:
    try:
        if msg.HasField("usage"):
            return int(msg.usage.prompt_tokens) + int(msg.usage.completion_tokens)
    except (AttributeError, ValueError):
        pass
    return None


def _rebuild(handler: Any, **behaviors: Any) -> Any:
    kind = ("unary_unary" if handler.unary_unary else "unary_stream" if handler.unary_stream
            else "stream_unary" if handler.stream_unary else "stream_stream")
    make = getattr(grpc, f"{kind}_rpc_method_handler")
    return make(behaviors[kind], request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


def _refusing(handler: Any, exc: LoraServeError, method: str = "", reason: str = "") -> Any:
    """A handler that logs the refusal (method, reason, peer; never the key) and answers its status."""
    code, message = status_for(exc)

    def note(context: Any) -> None:
        log_refusal(method, reason, _peer(context), code.name)

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        note(context)
        await context.abort(code, message)

    async def streaming(request: Any, context: grpc.aio.ServicerContext) -> Any:
        note(context)
        await context.abort(code, message)
        yield  # pragma: no cover - makes this an async generator

    return _rebuild(handler, unary_unary=unary, stream_unary=unary, unary_stream=streaming,
                    stream_stream=streaming)


def _wrapped(handler: Any, caller: Caller, quotas: Optional[QuotaTracker], quota_tenant: Optional[Tenant]) -> Any:
    """Run the servicer with `caller` set; hold and charge the tenant's quotas for inference calls."""

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        _current.set(caller)
        behavior = handler.unary_unary or handler.stream_unary
        if quotas is None:
            result = behavior(request, context)
            return await result if inspect.isawaitable(result) else result
        assert quota_tenant is not None
        try:
            slot = quotas.request(quota_tenant)
            slot.__enter__()
        except LoraServeError as e:
            await context.abort(*status_for(e))
        try:
            result = behavior(request, context)
            result = await result if inspect.isawaitable(result) else result
            quotas.charge(caller.acting_for, _usage_tokens(result) or 0)
            return result
        finally:
            slot.__exit__(None, None, None)

    async def streaming(request: Any, context: grpc.aio.ServicerContext) -> Any:
        _current.set(caller)
        behavior = handler.unary_stream or handler.stream_stream
        slot = None
        if quotas is not None and quota_tenant is not None:
            try:
                slot = quotas.request(quota_tenant)
                slot.__enter__()
            except LoraServeError as e:
                await context.abort(*status_for(e))
        counted, final = 0, None
        try:
            result = behavior(request, context)
            if hasattr(result, "__aiter__"):
                async for msg in result:
                    counted += len(getattr(msg, "token_ids", ()) or ())
                    final = _usage_tokens(msg) if quotas is not None else None
                    yield msg
            elif inspect.isawaitable(result):  # servicer writes with context.write()
                await result
        finally:
            if quotas is not None and slot is not None:
                quotas.charge(caller.acting_for, final if final is not None else counted)
                slot.__exit__(None, None, None)

    return _rebuild(handler, unary_unary=unary, stream_unary=unary, unary_stream=streaming,
                    stream_stream=streaming)


class TenantResolver:
    """`tenant_of(context)` for servicers: the interceptor's caller, or metadata as a fallback."""

    def __init__(self, directory: Optional[TenantDirectory]):
        self.directory = directory

    def caller(self, context: Any) -> Caller:
        found = _current.get()
        if found is not None:
            return found
        if self.directory is None or self.directory.open_mode:
            return OPEN_CALLER
        md = {k.lower(): v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        return authenticate(self.directory, md)  # fail closed if the interceptor was not installed

    def __call__(self, context: Any) -> str:
        return self.caller(context).acting_for


def from_tenants_file(path: Path) -> tuple[AuthInterceptor, TenantResolver]:
    """(interceptor to install, `tenant_of(context)`) for a `--tenants FILE.toml` server."""
    directory = TenantDirectory.from_toml(Path(path))
    log.info("auth: %d tenants from %s", len(directory.tenants), path)
    return AuthInterceptor(directory), TenantResolver(directory)


def current_caller() -> Optional[Caller]:
    return _current.get()


__all__ = ["AuthInterceptor", "Caller", "TenantResolver", "from_tenants_file", "authenticate", "current_caller",
           "log_refusal", "refusal_reason", "OPEN_CALLER", "REFUSAL_REASONS", "TENANT_HEADER", "AuthenticationError"]
