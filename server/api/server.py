"""Server bootstrap: bind first, load the model second, drain on SIGTERM/SIGINT.

Order matters to operators: the gRPC port, the HTTP port and their health checks come
up at once (NOT_SERVING; HTTP /health 503), so orchestrators see a live process while
the model loads; health turns SERVING only when the engine runs and start-up adapters
are registered. On a signal, health goes NOT_SERVING (/health 503), new calls on either
protocol get UNAVAILABLE (HTTP 503; after `drain_delay`, while a load balancer notices),
in-flight calls get `grace_period` seconds to finish, then the rest are cancelled (which
aborts their engine requests) and the process exits 0. A second signal skips the waits.
"""
from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any, Optional

import grpc
from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection, reflection_pb2

from server.api.tenants import OPEN_TENANT, QuotaTracker, TenantDirectory
from server.api.audit import AuditRecord, audited
from server.api.auth import TenantResolver
from server.api.gen.loraserve.v1 import adapters_pb2, inference_pb2
from server.api.grpc_log import quiet_client_gone_writes
from server.api.handlers import HEADROOM, RpcLimiter, add_service
from server.api.inference_service import InferenceServicer, ServingState
from server.api.router_metrics import RouterMetrics
from server.api.stalls import StallMonitor
from server.api.tls import ServerTls
from server.core.config import Config, parse_adapter_flags, startup_warnings
from server.core.errors import LoraServeError, StartupError, UnavailableError
from server.metrics import ServerMetrics

log = logging.getLogger("loraserve.server")

INFERENCE = inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name
ADAPTERS = adapters_pb2.DESCRIPTOR.services_by_name["Adapters"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Lazy:
    """Stands in for an object built after the server starts (engine, registry).

    Services are bound before the model loads; until `set` is called every attribute
    access raises UnavailableError, which callers map to UNAVAILABLE like any other.
    """

    def __init__(self, what: str):
        object.__setattr__(self, "_what", what)
        object.__setattr__(self, "_target", None)

    def set(self, target: Any) -> None:
        object.__setattr__(self, "_target", target)

    def __getattr__(self, name: str) -> Any:
        target = object.__getattribute__(self, "_target")
        if target is None:
            raise UnavailableError(f"{object.__getattribute__(self, '_what')} is still loading; retry shortly")
        return getattr(target, name)


class LoraServer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.metrics = ServerMetrics(cfg.server.metrics_adapter_labels)
        self.state = ServingState(default_max_new_tokens=cfg.server.default_max_new_tokens,
                                  model_name=cfg.engine.model, stream_interval=cfg.server.stream_interval)
        self.state.stalls = StallMonitor(cfg.server.stalled_stream_timeout, on_abort=self.metrics.stalled_streams.inc)
        self.health = HealthServicer()
        self.engine: Optional[Any] = None
        self.registry: Optional[Any] = None
        self.lazy_engine = Lazy("model")
        self.lazy_registry = Lazy("adapter registry")
        self.grpc: Optional[grpc.aio.Server] = None
        self.tenants = (TenantDirectory.from_toml(Path(cfg.server.tenants)) if cfg.server.tenants
                        else TenantDirectory.open())
        self.tls = ServerTls.from_config(cfg.server)  # None: plaintext listeners
        self.quotas = QuotaTracker()
        self.state.admit = self._admit
        self.startup_tenant = OPEN_TENANT
        self.tenant_resolver = TenantResolver(self.tenants)
        self.state.tenant_of = self.tenant_resolver
        self.port = 0
        self.metrics_port = 0
        self.http: Optional[Any] = None
        self.http_port = 0
        self._stop = asyncio.Event()
        self._second = asyncio.Event()
        self._signals = 0

    # ---- phases ----------------------------------------------------------------------------------
    async def start(self) -> None:
        """Bind gRPC (health NOT_SERVING) and /metrics; no model yet."""
        s = self.cfg.server
        for w in startup_warnings(self.cfg):
            log.warning(w)
        quiet_client_gone_writes()
        options = [("grpc.max_receive_message_length", s.max_request_bytes),
                   ("grpc.max_send_message_length", s.max_response_bytes),
                   ("grpc.so_reuseport", 0)]
        interceptors = self._interceptors()
        # Our limit answers with a message naming the knob; gRPC's, HEADROOM above it, keeps health checks answerable.
        self.limiter = RpcLimiter(s.max_concurrent_rpcs)
        self.grpc = grpc.aio.server(options=options, interceptors=interceptors,
                                    maximum_concurrent_rpcs=s.max_concurrent_rpcs + HEADROOM)
        add_service(self.grpc, InferenceServicer(self.state, self.metrics), _service(inference_pb2, "Inference"),
                    self.limiter)
        self._add_adapters_service()
        add_service(self.grpc, self.health, _service(health_pb2, "Health"))
        names = [INFERENCE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME,
                 ADAPTERS]
        add_service(self.grpc, reflection.aio.ReflectionServicer(names), _service(reflection_pb2, "ServerReflection"),
                    self.limiter)
        await self._set_health(NOT_SERVING)
        address = f"{_bracket(s.host)}:{s.port}"
        try:
            if self.tls is not None:
                self.port = self.grpc.add_secure_port(address, self.tls.grpc_credentials())
            else:
                self.port = self.grpc.add_insecure_port(address)
        except RuntimeError:  # grpcio raises where it used to return 0
            self.port = 0
        if self.port == 0:
            raise StartupError(f"cannot bind gRPC to {address}: the port is in use or the address is not this "
                               "machine's (--host, --port)")
        await self.grpc.start()
        self.state.stalls.start()
        if s.http_port >= 0:
            self.http_port = await self._start_http()
        if s.metrics_port >= 0:
            metrics_ssl = self.tls.ssl_context() if self.tls is not None and s.metrics_tls else None
            metrics_host = s.metrics_host or s.host
            try:
                self.metrics_port = self.metrics.serve_http(metrics_host, s.metrics_port, metrics_ssl)
            except OSError as e:
                raise StartupError(f"cannot bind /metrics to {metrics_host}:{s.metrics_port}: {e.strerror} "
                                   "(--metrics-host, --metrics-port)") from None
        host = _bracket(s.host)
        scheme = "https" if self.tls is not None else "http"
        log.info(json.dumps({"event": "listening", "host": s.host, "grpc_port": self.port,
                             "http_port": self.http_port if s.http_port >= 0 else None,
                             "metrics_port": self.metrics_port if s.metrics_port >= 0 else None,
                             "grpc_target": f"{host}:{self.port}",
                             "http_url": f"{scheme}://{host}:{self.http_port}/v1" if s.http_port >= 0 else None,
                             "tls": self.tls.describe() if self.tls is not None else None,
                             "metrics_tls": bool(self.tls is not None and s.metrics_tls),
                             "event_loop": type(asyncio.get_running_loop()).__module__.split(".")[0]}))

    async def load(self, freeze_gc: bool = False) -> None:
        """Load the model off the event loop (health stays answerable), then go SERVING.

        `freeze_gc` (the server process's own `run`, not a server embedded in a longer-lived process): freeze
        what is loaded by then out of the garbage collector, which would otherwise never collect it."""
        from server.engine.engine import Engine

        engine = await _in_thread(Engine.from_config, self.cfg.engine)
        engine.start()
        self.engine = engine
        self.lazy_engine.set(engine)
        fingerprint = await _in_thread(self._fingerprint, engine)
        registry = await _in_thread(self._make_registry, engine, fingerprint)
        self.registry = registry
        self.lazy_registry.set(registry)
        for name, path in parse_adapter_flags(self.cfg.server.adapters):
            await _in_thread(self._register_startup_adapter, registry, name, path)
        self.state.resolver = registry
        self.state.model_fingerprint = fingerprint
        self.state.engine = engine
        self.metrics.attach(engine.stats, registry.stats)
        self.metrics.registry.register(RouterMetrics(engine, qualify_tenants=bool(self.cfg.server.tenants)))
        if freeze_gc:
            # What is loaded by now (model, tokenizer, modules: about 390,000 objects with SmolLM2) lives as long
            # as the process: frozen out of the collector's generations, a full collection while serving no longer
            # walks it (measured on SmolLM2 decode: 300 ms of collections in a run where one was full, 8.5 ms
            # frozen).
            await _in_thread(gc.collect)
            gc.freeze()
        await self._set_health(SERVING)
        log.info(json.dumps({"event": "serving", "model": self.cfg.engine.model,
                             "fingerprint": self.state.model_fingerprint}))

    async def drain(self) -> None:
        """NOT_SERVING, refuse new calls, give in-flight ones the grace period, then stop everything.

        With `drain_delay`, new calls are still served for that long after health turns NOT_SERVING:
        a load balancer that health-checks every few seconds stops sending before any call is refused.
        """
        grace = self.cfg.server.grace_period
        self.state.stopping = True  # HTTP /health 503 from now on, as gRPC health
        await self._set_health(NOT_SERVING)
        delay = self.cfg.server.drain_delay
        if delay > 0 and self._signals < 2:
            log.info(json.dumps({"event": "drain_delay", "seconds": delay, "in_flight": self.state.in_flight}))
            second = asyncio.ensure_future(self._second_signal())
            await asyncio.wait([second], timeout=delay)
            second.cancel()
        self.state.draining = True
        log.info(json.dumps({"event": "draining", "in_flight": self.state.in_flight, "grace_period_s": grace}))
        if self.state.in_flight and self._signals < 2:
            waiter = asyncio.ensure_future(self.state.idle.wait())
            second = asyncio.ensure_future(self._second_signal())
            await asyncio.wait([waiter, second], timeout=grace, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            second.cancel()
        left = self.state.in_flight
        await self.state.stalls.stop()
        # Cancels what is left on both protocols: their cleanups abort the engine requests.
        stops = [self._stop_http()]
        if self.grpc is not None:
            stops.append(self.grpc.stop(0))
        await asyncio.gather(*stops)
        if self.engine is not None:
            await _in_thread(self.engine.shutdown, 10.0)
        if self.registry is not None:
            # Waits for pending file removals and releases the registry directory's lock.
            await _in_thread(self.registry.close)
        log.info(json.dumps({"event": "stopped", "cancelled_in_flight": left}))

    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT; returns the process exit code."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self._on_reload)
        try:
            await self.start()
        except StartupError as e:
            await self._stop_listeners()
            return _start_failure(e)
        loader = asyncio.ensure_future(self.load(freeze_gc=True))
        stopper = asyncio.ensure_future(self._stop.wait())
        await asyncio.wait([loader, stopper], return_when=asyncio.FIRST_COMPLETED)
        if loader.done() and loader.exception() is not None:
            await self._set_health(NOT_SERVING)
            await self._stop_listeners()
            if self.engine is not None:
                await _in_thread(self.engine.shutdown, 10.0)
            if self.registry is not None:
                await _in_thread(self.registry.close)
            return _start_failure(loader.exception())
        await stopper
        if not loader.done():
            loader.cancel()  # the loading thread finishes on its own; nothing will use it
        await self.drain()
        return 0

    # ---- pieces ----------------------------------------------------------------------------------
    def _on_signal(self, sig: int) -> None:
        self._signals += 1
        log.info(json.dumps({"event": "signal", "signal": signal.Signals(sig).name, "count": self._signals}))
        self._stop.set()
        if self._signals >= 2:
            self._second.set()

    def _on_reload(self) -> None:
        """SIGHUP: re-read the TLS files; new handshakes use them, established connections carry on."""
        if self.tls is None:
            log.info(json.dumps({"event": "reload", "tls": None, "note": "no --tls-cert: nothing to reload"}))
            return
        try:
            material = self.tls.reload()
        except LoraServeError as e:
            log.error(json.dumps({"event": "tls_reload_failed", "error": str(e),
                                  "kept_fingerprint_sha256": self.tls.fingerprint}))
            return
        log.info(json.dumps({"event": "tls_reloaded", "fingerprint_sha256": material.fingerprint,
                             "reloads": self.tls.reloads}))

    async def _second_signal(self) -> None:
        await self._second.wait()

    async def _start_http(self) -> int:
        """The OpenAI-compatible API on --http-port: same state, generate path, tenants and metrics as gRPC."""
        from server.api.http.app import HttpContext, create_app
        from server.api.http.convert import ModelNames, base_model_id
        from server.api.http.server import HttpServer

        s, model = self.cfg.server, self.cfg.engine.model
        names = ModelNames(base_model_id(model), frozenset({model}))
        ctx = HttpContext(self.state, self.metrics, self.tenants, names, max_request_bytes=s.max_request_bytes)
        self.http = HttpServer(create_app(ctx))
        ssl_context = self.tls.ssl_context(HttpServer.ALPN) if self.tls is not None else None
        return await self.http.start(s.host, s.http_port, ssl_context)

    async def _stop_http(self) -> None:
        if self.http is not None:
            await self.http.stop()

    async def _stop_listeners(self) -> None:
        """Start-up failed: close the gRPC and HTTP ports (the /metrics thread ends with the process)."""
        if self.grpc is not None:
            await self.grpc.stop(0)
        await self._stop_http()

    def _admit(self, tenant_name: str, prompt_tokens: int, max_new_tokens: int) -> Any:
        """Hold a concurrent-request quota slot; the returned release charges the tokens actually used."""
        tenant = self.tenants.get(tenant_name)
        if tenant is None:
            return lambda completion_tokens: None
        slot = self.quotas.request(tenant)
        slot.__enter__()  # raises QuotaExceededError naming the limit

        def release(completion_tokens: int) -> None:
            self.quotas.charge(tenant.name, prompt_tokens + completion_tokens)
            slot.__exit__(None, None, None)

        return release

    async def _set_health(self, status: int) -> None:
        for name in ("", INFERENCE, ADAPTERS):
            await self.health.set(name, status)

    def _interceptors(self) -> list[Any]:
        """The auth interceptor when a tenants file is configured (single-tenant and open otherwise)."""
        if not self.cfg.server.tenants:
            return []
        from server.api.auth import AuthInterceptor

        log.info(json.dumps({"event": "auth", "tenants": len(self.tenants.tenants), "file": self.cfg.server.tenants}))
        # quotas stay with ServingState.admit (it knows prompt lengths)
        return [AuthInterceptor(self.tenants, on_refused=self.metrics.count_auth_failure)]

    def _add_adapters_service(self) -> None:
        from server.api.adapters_service import add_adapters_service

        add_adapters_service(self.grpc, self.lazy_registry, self.lazy_engine, self.cfg,
                             tenant_resolver=self.tenant_resolver, limiter=self.limiter)

    def _make_registry(self, engine: Any, fingerprint: str) -> Any:
        from adapter_registry import Registry, RegistryLimits
        from adapter_registry.index_api import is_index_url

        s = self.cfg.server
        if is_index_url(s.registry):
            root: Any = s.registry  # PostgreSQL, shared by a fleet
        else:
            root = Path(s.registry).expanduser() if s.registry else self.cfg.engine.resolve_home() / "registry"
        try:
            return Registry(root, engine.model_config, fingerprint, self.cfg.engine.max_rank,
                            import_dirs=[Path(d).expanduser() for d in s.import_dirs],
                            host_cache_bytes=s.host_cache_bytes,
                            limits=RegistryLimits(max_weights_bytes=s.max_upload_bytes), tenants=self.tenants,
                            objects=Path(s.objects).expanduser() if s.objects else None,
                            object_grace_s=s.object_grace_period, is_pinned=engine.pool.is_pinned)
        except OSError as e:  # a read-only or missing directory is the operator's to fix, not a bug
            where = os.fsdecode(e.filename) if e.filename else root
            raise StartupError(f"the adapter registry cannot use {where} ({e.strerror or e}): give --registry "
                               "(default: <home>/registry, see --home) and --objects writable directories") from e

    def _register_startup_adapter(self, registry: Any, name: str, path: Path) -> None:
        """`--adapter NAME=PATH`: a new version unless the newest one already has these exact bytes."""
        tenant, _, name = name.rpartition("/")  # "tenant/name=PATH" registers for that tenant
        record = AuditRecord("register", tenant=tenant or self.startup_tenant, caller="serve --adapter", adapter=name)
        with audited(record):
            info = registry.register_path(record.tenant, name, path, {"source": "serve --adapter"},
                                          allow_any_path=True, reuse_identical_latest=True)
            record.version, record.digest = info.version, info.digest
        log.info(json.dumps({"event": "adapter_registered", "adapter_id": info.ref, "path": str(path)}))

    def _fingerprint(self, engine: Any) -> str:
        from server.model.loader import model_fingerprint

        if engine.model_dir is None:
            return ""
        return model_fingerprint(Path(engine.model_dir), self.cfg.engine.resolve_home())


def _service(module: Any, name: str) -> Any:
    return module.DESCRIPTOR.services_by_name[name]


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


async def _in_thread(fn: Any, *args: Any) -> Any:
    """Run blocking work in a daemon thread, so a signal during model loading can still exit promptly."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future = loop.create_future()

    def settle(error: Optional[BaseException], result: Any) -> None:
        if not fut.done():
            fut.set_exception(error) if error is not None else fut.set_result(result)

    def work() -> None:
        # The exception is passed as an argument: a closure over `except ... as e` would find the name unbound
        # by the time the loop runs it (Python deletes it when the handler ends), and the await would hang.
        try:
            result = fn(*args)
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting coroutine
            loop.call_soon_threadsafe(settle, e, None)
        else:
            loop.call_soon_threadsafe(settle, None, result)

    threading.Thread(target=work, name=f"loraserve-{getattr(fn, '__name__', 'work')}", daemon=True).start()
    return await fut


def _start_failure(error: BaseException) -> int:
    """How a failed start-up ends, logged; returns the exit code. A LoraServeError is the operator's to fix (a bad
    tenants or certificate file, an --adapter that does not load, a port in use): one `start_failed` line saying
    what, exit code 2. Anything else is a bug: its traceback, exit code 1."""
    if isinstance(error, LoraServeError):
        log.error(json.dumps({"event": "start_failed", "error": str(error)}))
        return 2
    log.error("start-up failed: %s", error, exc_info=error)
    return 1


async def serve(cfg: Config) -> int:
    try:
        server = LoraServer(cfg)
    except LoraServeError as e:
        return _start_failure(e)
    return await server.run()
