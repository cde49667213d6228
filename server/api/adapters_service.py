"""The `Adapters` admin service: register, load/pin, unload, list, get, delete.

A thin translation between protos and `adapter_registry.Registry` plus the engine's
device pool. Blocking work (validation, fsync, device copies) runs in short-lived worker
threads (`server.core.threads`: a long-lived thread that ran tensor ops would slow the
engine loop's) so the event loop keeps serving inference. The caller's tenant comes from `server.api.auth`;
a request's `tenant` field is honoured for admins only.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Optional

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from adapter_registry import AdapterInfo, AdapterVersionInfo
from server.api.auth import Caller, TenantResolver
from server.api.errors import status_for
from server.api.gen.loraserve.v1 import adapters_pb2 as pb
from server.api.gen.loraserve.v1 import adapters_pb2_grpc as pb_grpc
from server.core.threads import ShortLivedThreads
from server.core.errors import AdapterInUseError, InvalidRequestError, UnavailableError

log = logging.getLogger("loraserve.adapters")


def _rpc(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Every failure becomes its status code (server/api/errors.py), never a crash."""

    @functools.wraps(fn)
    async def wrapper(self: "AdaptersServicer", request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await fn(self, request, context)
        except Exception as e:  # noqa: BLE001
            code, message = status_for(e)
            await context.abort(code, message)

    return wrapper


class AdaptersServicer(pb_grpc.AdaptersServicer):
    def __init__(self, registry: Any, engine: Any, tenant_resolver: TenantResolver, max_upload_bytes: int):
        self.registry = registry
        self.engine = engine
        self.tenants = tenant_resolver
        self.max_upload_bytes = max_upload_bytes
        self._workers = ShortLivedThreads(8, "loraserve-admin")

    async def _blocking(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._workers, functools.partial(fn, *args))

    # ---- helpers -------------------------------------------------------------------------------
    def _tenant(self, context: Any, requested: str) -> str:
        caller: Caller = self.tenants.caller(context)
        return caller.act_for(requested)

    def _device(self) -> dict[str, Any]:
        """digest (the slot key) -> SlotInfo of what is on the device now ({} while the model loads)."""
        try:
            return {s.key: s for s in self.engine.pool.resident()}
        except UnavailableError:
            return {}

    def _version_pb(self, v: AdapterVersionInfo, device: dict[str, Any]) -> pb.AdapterVersion:
        slot = device.get(v.digest)
        on_device = slot is not None and getattr(slot, "state", "ready") == "ready"
        tier = pb.TIER_DEVICE if on_device else pb.TIER_HOST if v.in_host_memory else pb.TIER_DISK
        created = Timestamp()
        created.FromNanoseconds(int(v.created_at * 1e9))
        return pb.AdapterVersion(version=v.version, digest=v.digest, rank=v.rank, targets=list(v.targets),
                                 size_bytes=v.size_bytes, created=created, metadata=v.metadata, tier=tier,
                                 pinned=v.pinned, base_model_fingerprint=v.base_fingerprint)

    def _info_pb(self, a: AdapterInfo, device: dict[str, Any]) -> pb.AdapterInfo:
        return pb.AdapterInfo(name=a.name, tenant=a.tenant, latest_version=a.latest_version,
                              versions=[self._version_pb(v, device) for v in a.versions])

    # ---- RPCs ----------------------------------------------------------------------------------
    async def RegisterAdapter(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await self._register(request_iterator, context)
        except Exception as e:  # noqa: BLE001
            await context.abort(*status_for(e))

    async def _register(self, request_iterator: Any, context: Any) -> pb.RegisterAdapterResponse:
        header: Optional[pb.RegisterAdapterHeader] = None
        chunks = bytearray()
        limit = min(self.max_upload_bytes, self.registry.limits.max_weights_bytes)
        async for msg in request_iterator:
            part = msg.WhichOneof("part")
            if header is None:
                if part != "header":
                    raise InvalidRequestError("header", "the first RegisterAdapter message must be the header")
                header = msg.header
                if header.total_size < 0 or header.total_size > limit:
                    raise InvalidRequestError("total_size", f"is {header.total_size}; allowed range is "
                                              f"[0, {limit}] bytes")
                continue
            if part != "chunk":
                raise InvalidRequestError("header", "only one header, as the first message")
            if header.server_path:
                raise InvalidRequestError("chunk", "an upload with server_path takes no chunks")
            if len(chunks) + len(msg.chunk) > limit:
                raise InvalidRequestError("chunk", f"the upload exceeds the limit of {limit} bytes")
            chunks += msg.chunk
        if header is None:
            raise InvalidRequestError("header", "the stream was empty; send a header first")
        tenant = self._tenant(context, header.tenant)
        metadata = dict(header.metadata)
        if header.server_path:
            if header.adapter_config_json:
                raise InvalidRequestError("adapter_config_json", "must be empty with server_path (read from there)")
            info = await self._blocking(self.registry.register_path, tenant, header.name,
                                           Path(header.server_path), metadata)
        else:
            if header.total_size and header.total_size != len(chunks):
                raise InvalidRequestError("total_size", f"says {header.total_size} bytes but "
                                          f"{len(chunks)} arrived (a truncated upload)")
            if not chunks:
                raise InvalidRequestError("chunk", "no adapter_model.safetensors bytes were sent")
            info = await self._blocking(self.registry.register_bytes, tenant, header.name,
                                           header.adapter_config_json.encode("utf-8"), bytes(chunks), metadata)
        log.info("registered %s/%s (%d bytes)", tenant, info.ref, info.size_bytes)
        return pb.RegisterAdapterResponse(name=info.name, version=self._version_pb(info, self._device()),
                                          adapter_id=info.ref)

    @_rpc
    async def LoadAdapter(self, request: pb.LoadAdapterRequest, context: Any) -> pb.LoadAdapterResponse:
        tenant = self._tenant(context, request.tenant)
        adapter = self.registry.resolve(tenant, request.adapter_id)
        t0 = time.perf_counter()
        await self._blocking(self.engine.pool.load, adapter, request.pin)  # the pool holds the pin
        return pb.LoadAdapterResponse(adapter_id=adapter.ref, version=adapter.version,
                                      pinned=request.pin, load_seconds=time.perf_counter() - t0)

    @_rpc
    async def UnloadAdapter(self, request: pb.UnloadAdapterRequest, context: Any) -> pb.UnloadAdapterResponse:
        tenant = self._tenant(context, request.tenant)
        adapter = self.registry.resolve(tenant, request.adapter_id)
        self.engine.pool.unpin(adapter.digest)
        was = bool(self.engine.pool.unload(adapter.digest))  # AdapterInUseError while requests run on it
        return pb.UnloadAdapterResponse(adapter_id=adapter.ref, was_on_device=was)

    @_rpc
    async def ListAdapters(self, request: pb.ListAdaptersRequest, context: Any) -> pb.ListAdaptersResponse:
        tenant = self._tenant(context, request.tenant)
        adapters = await self._blocking(self.registry.list, tenant)
        device = self._device()
        return pb.ListAdaptersResponse(adapters=[self._info_pb(a, device) for a in adapters])

    @_rpc
    async def GetAdapter(self, request: pb.GetAdapterRequest, context: Any) -> pb.AdapterInfo:
        tenant = self._tenant(context, request.tenant)
        info = await self._blocking(self.registry.get, tenant, request.adapter_id)
        return self._info_pb(info, self._device())

    @_rpc
    async def DeleteAdapter(self, request: pb.DeleteAdapterRequest, context: Any) -> pb.DeleteAdapterResponse:
        tenant = self._tenant(context, request.tenant)
        before = await self._blocking(self.registry.get, tenant, request.adapter_id)
        digests = {v.digest for v in before.versions}
        deleted = await self._blocking(self.registry.delete, tenant, request.adapter_id)
        for digest in digests:  # free device slots nobody can resolve any more (running ones finish first)
            if not self.registry.index.digest_referenced(digest):
                try:
                    self.engine.pool.unload(digest)
                except (AdapterInUseError, UnavailableError):
                    pass  # in-flight requests still use it; LRU reclaims the slot after them
        return pb.DeleteAdapterResponse(deleted_versions=deleted)


def add_adapters_service(server: grpc.aio.Server, registry: Any, engine: Any, cfg: Any = None,
                         tenant_resolver: Optional[TenantResolver] = None) -> AdaptersServicer:
    """Bind the Adapters service; `registry` and `engine` may be lazy stand-ins set after start-up."""
    if tenant_resolver is None:
        tenants_file = getattr(getattr(cfg, "server", None), "tenants", "") if cfg is not None else ""
        tenant_resolver = TenantResolver(TenantDirectory.from_toml(Path(tenants_file)) if tenants_file else None)
    max_upload = getattr(getattr(cfg, "server", None), "max_upload_bytes", 512 << 20) if cfg is not None else 512 << 20
    servicer = AdaptersServicer(registry, engine, tenant_resolver, max_upload)
    pb_grpc.add_AdaptersServicer_to_server(servicer, server)
    return servicer
