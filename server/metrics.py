"""Every Prometheus metric loraserve exports, defined once, in base units.

Per-request timings are observed by the Inference servicer as deltas stream out;
engine and registry state (queue depths, KV blocks, slots, adapter tiers) is read
from `engine.stats()` / `registry.stats()` at scrape time by a custom collector, so
the engine thread never touches prometheus-client. Everything lives in its own
CollectorRegistry: tests and embedded uses never collide with the global one.
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Iterable, Optional

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

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
        self._engine_collector: Optional[EngineCollector] = None

    def attach(self, engine: Any, registry_stats: Optional[Callable[[], Any]] = None) -> None:
        """Start exporting engine (and registry) state; call once the engine exists."""
        if self._engine_collector is None:
            self._engine_collector = EngineCollector(engine, registry_stats)
            self.registry.register(self._engine_collector)

    def serve_http(self, host: str, port: int) -> int:
        """Serve /metrics on its own port and return the port actually bound."""
        server, _thread = start_http_server(port, addr=host or "0.0.0.0", registry=self.registry)
        return int(server.server_port)


def _get(obj: Any, *names: str, default: float = 0.0) -> float:
    """First present attribute (or dict key) of `names`: tolerate engine stats growing new fields."""
    for n in names:
        v = obj.get(n) if isinstance(obj, dict) else getattr(obj, n, None)
        if v is not None:
            return float(v)
    return default


class EngineCollector(Collector):
    """Reads `engine.stats()` (and the registry's tier stats) at scrape time."""

    def __init__(self, engine: Any, registry_stats: Optional[Callable[[], Any]] = None):
        self.engine = engine
        self.registry_stats = registry_stats

    def describe(self) -> Iterable[Metric]:
        return []  # dynamic: do not call stats() at registration

    def collect(self) -> Iterable[Metric]:
        s = self.engine.stats()
        gauges = {
            "loraserve_requests_running": ("Requests in the running batch.", ("running",)),
            "loraserve_requests_waiting": ("Requests queued for admission.", ("waiting",)),
            "loraserve_kv_blocks_used": ("Paged KV-cache blocks in use.", ("kv_blocks_used",)),
            "loraserve_kv_blocks_total": ("Paged KV-cache blocks in all.", ("kv_blocks_total",)),
            "loraserve_batch_size": ("Sequences in the most recent engine step.", ("last_batch_size", "batch_size")),
            "loraserve_adapters_on_device": ("Adapters resident in device slots.", ("adapters_on_device",)),
            "loraserve_adapter_slots": ("Device LoRA slots (slot 0, the bare base, not counted).",
                                        ("adapter_slots_total", "adapter_slots")),
        }
        for name, (doc, keys) in gauges.items():
            yield GaugeMetricFamily(name, doc, value=_get(s, *keys))
        counters = {
            "loraserve_adapter_loads": ("Adapter loads into device slots.", ("adapter_loads", "adapter_loads_total")),
            "loraserve_adapter_evictions": ("Adapters evicted from device slots.",
                                            ("adapter_evictions", "adapter_evictions_total")),
            "loraserve_adapter_load_seconds": ("Seconds spent loading adapters into device slots.",
                                               ("adapter_load_seconds", "adapter_load_seconds_total")),
            "loraserve_adapter_load_failures": ("Adapter loads that failed (the request got an error).",
                                                ("adapter_load_failures",)),
            "loraserve_adapter_slot_hits": ("Requests whose adapter was already in a device slot.",
                                            ("adapter_hits",)),
            "loraserve_adapter_slot_misses": ("Requests whose adapter had to be loaded into a slot.",
                                              ("adapter_misses",)),
            "loraserve_preemptions": ("Sequences preempted (recomputed) when the KV cache ran out.",
                                      ("preemptions", "preemptions_total")),
            "loraserve_engine_steps": ("Engine steps run.", ("steps", "steps_total")),
        }
        for name, (doc, keys) in counters.items():
            yield CounterMetricFamily(name, doc, value=_get(s, *keys))
        yield from self._registry_metrics()

    def _registry_metrics(self) -> Iterable[Metric]:
        host = None
        if self.registry_stats is not None:
            rs = self.registry_stats()
            host = _get(rs, "host_entries", "adapters_in_host_memory", default=-1)
            hits = CounterMetricFamily("loraserve_adapter_host_cache_hits", "Adapter loads served from host memory.",
                                       value=_get(rs, "host_hits_total"))
            misses = CounterMetricFamily("loraserve_adapter_host_cache_misses",
                                         "Adapter loads that had to read the disk tier.",
                                         value=_get(rs, "host_misses_total"))
            yield hits
            yield misses
            yield CounterMetricFamily("loraserve_adapter_disk_loads", "Adapter versions read from disk.",
                                      value=_get(rs, "disk_loads_total"))
            yield CounterMetricFamily("loraserve_adapter_disk_load_seconds", "Seconds spent reading adapters from disk.",
                                      value=_get(rs, "disk_load_seconds_total"))
            yield GaugeMetricFamily("loraserve_adapter_host_cache_bytes", "Bytes of adapters held in host memory.",
                                    value=_get(rs, "host_bytes"))
            yield CounterMetricFamily("loraserve_adapter_host_evictions", "Adapters evicted from host memory.",
                                      value=_get(rs, "host_evictions_total"))
            yield GaugeMetricFamily("loraserve_adapter_versions_stored", "Adapter versions in the registry.",
                                    value=_get(rs, "versions_stored"))
            yield CounterMetricFamily("loraserve_adapter_registrations", "Adapter versions registered.",
                                      value=_get(rs, "registered_total"))
            yield CounterMetricFamily("loraserve_adapter_rejections", "Adapter registrations refused by validation.",
                                      value=_get(rs, "rejected_total"))
            yield from _fleet_metrics(rs)
        if host is None or host < 0:
            host = 0.0
        yield GaugeMetricFamily("loraserve_adapters_in_host_memory", "Adapters held in the host-memory tier.",
                                value=host)


# A registry shared by a fleet (PostgreSQL index) reports these; a local one does not.
_FLEET_COUNTERS = {
    "loraserve_registry_remote_changes": ("Adapter publishes and deletes heard from the shared index.",
                                          "remote_changes_total"),
    "loraserve_registry_index_resyncs": ("Times the resolve cache was re-read from the shared index.",
                                         "index_resyncs_total"),
    "loraserve_registry_index_disconnects": ("Times the connection to the shared index was lost.",
                                             "index_disconnects_total"),
    "loraserve_registry_resolve_cache_hits": ("Adapter ids resolved from memory.", "resolve_cache_hits_total"),
    "loraserve_registry_resolve_cache_reads": ("Adapter ids read from the shared index.", "resolve_cache_reads_total"),
    "loraserve_registry_resolve_stale_served": ("Adapter ids served from memory while the index was down.",
                                                "resolve_stale_served_total"),
    "loraserve_registry_resolve_refused": ("Adapter ids refused (UNAVAILABLE) while the index was down.",
                                           "resolve_refused_total"),
}


def _fleet_metrics(rs: Any) -> Iterable[Metric]:
    if _get(rs, "index_up", default=-1) < 0:
        return
    yield GaugeMetricFamily("loraserve_registry_index_up", "1 while the shared registry index is reachable.",
                            value=_get(rs, "index_up"))
    for name, (doc, key) in _FLEET_COUNTERS.items():
        yield CounterMetricFamily(name, doc, value=_get(rs, key))
