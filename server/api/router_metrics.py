"""The metrics cluster routers pick a replica by (llm-d / Gateway API Inference Extension endpoint picker).

The endpoint picker reads, per pod: waiting and running requests (`loraserve_requests_waiting`,
`loraserve_requests_running`, from server/metrics.py), the KV-cache usage as a 0-1 ratio, the
LoRA info gauge and the cache geometry. Names and label sets follow vLLM's model-server protocol
(`vllm:kv_cache_usage_perc`, `vllm:lora_requests_info`, `vllm:cache_config_info`) under
`loraserve_` names; deploy/llm-d/ maps them for the picker.

`loraserve_lora_requests_info{running_lora_adapters, waiting_lora_adapters, max_lora}` has one
series at a time, built at scrape time (so an old label set is gone as soon as it changes); its
value is the Unix time the label set last changed, which is how the picker finds the latest.
Adapter names are unique per tenant only, so with a tenants file each appears as `TENANT/NAME`;
a single-tenant (open) server lists plain `NAME`s, the `model` a client sends.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable, Iterable

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

LORA_INFO = "loraserve_lora_requests_info"
KV_USAGE = "loraserve_kv_cache_usage_ratio"
CACHE_INFO = "loraserve_cache_config_info"


class RouterMetrics(Collector):
    """Reads `engine.lora_activity()` and the KV allocator at scrape time."""

    def __init__(self, engine: Any, qualify_tenants: bool, clock: Callable[[], float] = time.time):
        self.engine = engine
        self.qualify_tenants = qualify_tenants
        self.clock = clock
        self._lock = threading.Lock()
        self._labels: tuple[str, str, str] = ("", "", "")
        self._changed_at = clock()

    def describe(self) -> Iterable[Metric]:
        return []  # dynamic: nothing is read at registration

    def _names(self, pairs: Iterable[tuple[str, str]]) -> str:
        return ",".join(f"{tenant}/{name}" if self.qualify_tenants else name for tenant, name in pairs)

    def collect(self) -> Iterable[Metric]:
        activity = self.engine.lora_activity()
        labels = (self._names(activity.running), self._names(activity.waiting), str(activity.max_lora))
        with self._lock:
            if labels != self._labels:
                self._labels, self._changed_at = labels, self.clock()
            changed_at = self._changed_at
        info = GaugeMetricFamily(LORA_INFO, "LoRA adapters of running and waiting requests, and device LoRA slots "
                                 "(value: Unix time the label set last changed).",
                                 labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"])
        info.add_metric(list(labels), changed_at)
        yield info
        blocks = self.engine.blocks
        total = max(int(blocks.num_blocks), 1)
        yield GaugeMetricFamily(KV_USAGE, "Fraction of paged KV-cache blocks in use (0-1).",
                                value=int(blocks.num_used) / total)
        geometry = GaugeMetricFamily(CACHE_INFO, "KV-cache geometry (value 1): tokens per block and blocks in all.",
                                     labels=["block_size", "num_gpu_blocks"])
        geometry.add_metric([str(int(blocks.block_size)), str(int(blocks.num_blocks))], 1.0)
        yield geometry
