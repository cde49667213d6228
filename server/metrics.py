"""Every Prometheus metric loraserve exports, defined once, in base units.

Per-request timings are observed by the Inference servicer as deltas stream out;
engine and registry state (queue depths, KV blocks, slots, adapter tiers) is read
from their typed stats (`server/core/stats.py`: `Engine.stats()`, `Registry.stats()`)
at scrape time by a custom collector, so the engine thread never touches prometheus-client. Everything lives in its own
CollectorRegistry: tests and embedded uses never collide with the global one.
"""
from __future__ import annotations

import socket
import ssl
import threading
from typing import Any, Callable, Iterable, Optional

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from server.core.stats import EngineStats, RegistryStats, SharedIndexStats

OTHER = "other"
BASE = "base"

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12)


class AdapterLabels:
    """Bound per-adapter label values: the first `cap` adapter names keep their own label, later ones are 'other'."""

    def __init__(self, cap: int):
        self.cap = cap
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, adapter_id: str) -> str:
        name = adapter_id.split("@", 1)[0] if adapter_id else BASE
        with self._lock:
            if name in self._seen:
                return name
            if len(self._seen) < self.cap:
                self._seen.add(name)
                return name
        return OTHER


class ServerMetrics:
    """The servicer-side metrics plus the scrape-time collector for engine state."""

    def __init__(self, adapter_label_cap: int = 32, registry: Optional[CollectorRegistry] = None):
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self.adapter_label = AdapterLabels(adapter_label_cap)
        r = self.registry
        self.requests = Counter("loraserve_requests", "Finished RPCs by method and gRPC status code.",
                                ["method", "code"], registry=r)
        self.adapter_requests = Counter(
            "loraserve_adapter_requests", "Finished generate requests by adapter name (capped, then 'other').",
            ["adapter"], registry=r)
        self.ttft = Histogram("loraserve_time_to_first_token_seconds",
                              "From request arrival to the first generated token.",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("loraserve_inter_token_latency_seconds",
                             "Time between consecutive generated tokens of one request (per token).",
                             buckets=_ITL_BUCKETS, registry=r)
        self.duration = Histogram("loraserve_request_duration_seconds",
                                  "End-to-end generate latency, arrival to last token.",
                                  buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("loraserve_prompt_tokens", "Prompt tokens of finished generate requests.",
                                     registry=r)
        self.generated_tokens = Counter("loraserve_generated_tokens", "Tokens generated (streamed to clients).",
                                        ["adapter"], registry=r)
        self.auth_failures = Counter(
            "loraserve_auth_failures", "Refused authentications by reason: missing_key, wrong_key, "
            "permission_denied, unknown_tenant (never the key).", ["reason"], registry=r)
        for reason in ("missing_key", "wrong_key", "permission_denied", "unknown_tenant"):
            self.auth_failures.labels(reason)  # present at 0, so an alert can watch the rate from the start
        self.stalled_streams = Counter(
            "loraserve_stalled_streams", "Streams aborted because the client read nothing for "
            "--stalled-stream-timeout seconds (their KV blocks and slot were freed).", registry=r)
        self._engine_collector: Optional[EngineCollector] = None

    def count_auth_failure(self, reason: str) -> None:
        self.auth_failures.labels(reason).inc()

    def attach(self, engine_stats: Callable[[], EngineStats],
               registry_stats: Optional[Callable[[], RegistryStats]] = None) -> None:
        """Start exporting engine (and registry) state (`Engine.stats`, `Registry.stats`); call once they exist."""
        if self._engine_collector is None:
            self._engine_collector = EngineCollector(engine_stats, registry_stats)
            self.registry.register(self._engine_collector)

    def serve_http(self, host: str, port: int, ssl_context: Optional[ssl.SSLContext] = None) -> int:
        """Serve /metrics on its own port and return the port actually bound (HTTPS with `ssl_context`)."""
        if ssl_context is None:
            server, _thread = start_http_server(port, addr=host or "0.0.0.0", registry=self.registry)
        else:
            server = _https_server(host or "0.0.0.0", port, self.registry, ssl_context)
        return int(server.server_port)


def _https_server(host: str, port: int, registry: CollectorRegistry, ctx: ssl.SSLContext) -> Any:
    """prometheus_client's WSGI server behind TLS, the socket wrapped before the first accept.

    Handshakes run in the per-request thread, not in accept(): a client that stalls mid-handshake
    cannot hold the listener up (nor a thread for more than 30 s), and one that fails it (plaintext, wrong
    CA) is dropped quietly.
    """
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    from prometheus_client.exposition import ThreadingWSGIServer, make_wsgi_app

    class Quiet(WSGIRequestHandler):
        timeout = 30  # seconds a connection may sit mid-handshake or mid-request before it is dropped

        def log_message(self, format: str, *args: Any) -> None:
            pass

    class Server(ThreadingWSGIServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

        def handle_error(self, request: Any, client_address: Any) -> None:
            pass  # a refused handshake or a dropped connection is the client's business

    httpd = make_server(host.strip("[]"), port, make_wsgi_app(registry), Server, handler_class=Quiet)
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True, do_handshake_on_connect=False)
    threading.Thread(target=httpd.serve_forever, name="metrics-https", daemon=True).start()
    return httpd


# Scrape-time metrics: (name, help, the stats attribute it reads). Every reader names a field of the
# typed stats, so a renamed field fails the metrics test instead of exporting a silent 0.
EngineRead = Callable[[EngineStats], float]
RegistryRead = Callable[[RegistryStats], float]
SharedIndexRead = Callable[[SharedIndexStats], float]

ENGINE_GAUGES: tuple[tuple[str, str, EngineRead], ...] = (
    ("loraserve_requests_running", "Requests in the running batch.", lambda s: s.running),
    ("loraserve_requests_waiting", "Requests queued for admission.", lambda s: s.waiting),
    ("loraserve_kv_blocks_used", "Paged KV-cache blocks in use.", lambda s: s.kv_blocks_used),
    # Was loraserve_kv_blocks_total: a gauge must not wear a counter's suffix (promtool).
    ("loraserve_kv_blocks_capacity", "Paged KV-cache blocks in all.", lambda s: s.kv_blocks_total),
    ("loraserve_batch_size", "Sequences in the most recent engine step.", lambda s: s.last_batch_size),
    ("loraserve_adapters_on_device", "Adapters resident in device slots.", lambda s: s.pool.slots_ready),
    ("loraserve_adapter_slots", "Adapters the device may hold at once (slot 0, the bare base, not counted).",
     lambda s: s.pool.slots_total),
    ("loraserve_adapter_slots_in_use", "Device slots held by running requests (0 when idle: a leaked reference "
     "shows here).", lambda s: s.pool.slots_in_use),
    ("loraserve_adapter_rows", "Rank rows of device adapter memory (an adapter of rank r holds r).",
     lambda s: s.pool.rows_total),
    ("loraserve_adapter_rows_used", "Rank rows held by resident (or loading) adapters.", lambda s: s.pool.rows_used),
    ("loraserve_prefix_cache_blocks", "KV blocks held by the prefix cache (in use or idle, evictable when idle).",
     lambda s: s.prefix.cached_blocks),
)
ENGINE_COUNTERS: tuple[tuple[str, str, EngineRead], ...] = (
    ("loraserve_adapter_loads", "Adapter loads into device slots.", lambda s: s.pool.loads),
    ("loraserve_adapter_evictions", "Adapters evicted from device slots.", lambda s: s.pool.evictions),
    ("loraserve_adapter_load_seconds", "Seconds spent loading adapters into device slots.",
     lambda s: s.pool.load_seconds),
    ("loraserve_adapter_load_failures", "Adapter loads that failed (the request got an error).",
     lambda s: s.pool.load_failures),
    ("loraserve_adapter_slot_hits", "Requests whose adapter was already in a device slot.", lambda s: s.pool.hits),
    ("loraserve_adapter_slot_misses", "Adapter loads requests waited for (one per load, however many requests "
     "and steps waited).", lambda s: s.pool.misses),
    ("loraserve_preemptions", "Sequences preempted (recomputed) when the KV cache ran out.",
     lambda s: s.preemptions),
    ("loraserve_engine_steps", "Engine steps run.", lambda s: s.steps),
    ("loraserve_prefix_cache_hits", "Admitted requests that reused cached prompt blocks.", lambda s: s.prefix.hits),
    ("loraserve_prefix_cache_misses", "Admitted requests that found no cached prompt block (cache on).",
     lambda s: s.prefix.misses),
    ("loraserve_prefix_cache_tokens_saved", "Prompt tokens whose KV was reused instead of computed.",
     lambda s: s.prefix.tokens_saved),
)
REGISTRY_GAUGES: tuple[tuple[str, str, RegistryRead], ...] = (
    ("loraserve_adapter_host_cache_bytes", "Bytes of adapters held in host memory.", lambda s: s.host.bytes),
    ("loraserve_adapter_versions_stored", "Adapter versions in the registry.", lambda s: s.versions_stored),
)
REGISTRY_COUNTERS: tuple[tuple[str, str, RegistryRead], ...] = (
    ("loraserve_adapter_host_cache_hits", "Adapter loads served from host memory.", lambda s: s.host.hits),
    ("loraserve_adapter_host_cache_misses", "Adapter loads that had to read the disk tier.", lambda s: s.host.misses),
    ("loraserve_adapter_disk_loads", "Adapter versions read from disk.", lambda s: s.host.loads),
    ("loraserve_adapter_disk_load_seconds", "Seconds spent reading adapters from disk.",
     lambda s: s.host.load_seconds),
    ("loraserve_adapter_host_evictions", "Adapters evicted from host memory.", lambda s: s.host.evictions),
    ("loraserve_adapter_registrations", "Adapter versions registered.", lambda s: s.registered),
    ("loraserve_adapter_rejections", "Adapter registrations refused by validation.", lambda s: s.rejected),
)
HOST_ENTRIES = ("loraserve_adapters_in_host_memory", "Adapters held in the host-memory tier.")
# A registry whose index a fleet shares (PostgreSQL) exports these too; a local one does not.
SHARED_INDEX_GAUGES: tuple[tuple[str, str, SharedIndexRead], ...] = (
    ("loraserve_registry_index_up", "1 while the shared registry index is reachable.", lambda s: s.resolve.up),
)
SHARED_INDEX_COUNTERS: tuple[tuple[str, str, SharedIndexRead], ...] = (
    ("loraserve_registry_remote_changes", "Adapter publishes and deletes heard from the shared index.",
     lambda s: s.remote_changes),
    ("loraserve_registry_index_resyncs", "Times the resolve cache was re-read from the shared index.",
     lambda s: s.resyncs),
    ("loraserve_registry_index_disconnects", "Times the connection to the shared index was lost.",
     lambda s: s.disconnects),
    ("loraserve_registry_resolve_cache_hits", "Adapter ids resolved from memory.", lambda s: s.resolve.hits),
    ("loraserve_registry_resolve_cache_reads", "Adapter names read from the shared index.", lambda s: s.resolve.reads),
    ("loraserve_registry_resolve_stale_served", "Adapter ids served from memory while the index was down.",
     lambda s: s.resolve.stale_served),
    ("loraserve_registry_resolve_refused", "Adapter ids refused (UNAVAILABLE) while the index was down.",
     lambda s: s.resolve.refused),
)


class EngineCollector(Collector):
    """Reads the engine's (and the registry's) typed stats at scrape time."""

    def __init__(self, engine_stats: Callable[[], EngineStats],
                 registry_stats: Optional[Callable[[], RegistryStats]] = None):
        self.engine_stats = engine_stats
        self.registry_stats = registry_stats

    def describe(self) -> Iterable[Metric]:
        return []  # dynamic: do not call stats() at registration

    def collect(self) -> Iterable[Metric]:
        s = self.engine_stats()
        for name, doc, read in ENGINE_GAUGES:
            yield GaugeMetricFamily(name, doc, value=float(read(s)))
        for name, doc, read in ENGINE_COUNTERS:
            yield CounterMetricFamily(name, doc, value=float(read(s)))
        if self.registry_stats is None:
            yield GaugeMetricFamily(*HOST_ENTRIES, value=0.0)  # no registry: no host tier
            return
        rs = self.registry_stats()
        for name, doc, read in REGISTRY_COUNTERS:
            yield CounterMetricFamily(name, doc, value=float(read(rs)))
        for name, doc, read in REGISTRY_GAUGES:
            yield GaugeMetricFamily(name, doc, value=float(read(rs)))
        yield GaugeMetricFamily(*HOST_ENTRIES, value=float(rs.host.entries))
        if rs.shared is not None:
            for name, doc, read in SHARED_INDEX_GAUGES:
                yield GaugeMetricFamily(name, doc, value=float(read(rs.shared)))
            for name, doc, read in SHARED_INDEX_COUNTERS:
                yield CounterMetricFamily(name, doc, value=float(read(rs.shared)))
