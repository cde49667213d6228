"""Every metric docs/operations.md lists is exported with its type, and the scrape-time ones read the right stats.

A real engine (tiny model) and a real registry feed the collector: a stats field renamed without
the metrics module following fails here, instead of exporting a silent 0.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from adapter_registry import Registry, RegistryLimits
from adapter_registry.validate import validate_adapter
from server.api.router_metrics import RouterMetrics
from server.engine.types import SamplingParams
from server.metrics import SHARED_INDEX_COUNTERS, SHARED_INDEX_GAUGES, ServerMetrics
from tests.engine.engine_utils import make_engine

DOCS = Path(__file__).resolve().parents[1] / "docs" / "operations.md"
# Exported only by a registry whose index a fleet shares (tests/registry/test_shared_index.py checks them).
SHARED_INDEX_METRICS = {name for name, _, _ in SHARED_INDEX_GAUGES} | {f"{name}_total"
                                                                        for name, _, _ in SHARED_INDEX_COUNTERS}


def documented_metrics() -> dict[str, str]:
    """name (without labels) -> type, from the Metrics table of docs/operations.md."""
    out = {}
    for line in DOCS.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and "`loraserve_" in cells[0]:
            for name in re.findall(r"`(loraserve_\w+)", cells[0]):
                out[name] = cells[1]
    return out


def exported(metrics: ServerMetrics) -> dict[str, str]:
    """What a scrape exposes: name as a Prometheus client sees it (counters with `_total`) -> type."""
    return {f"{m.name}_total" if m.type == "counter" else m.name: m.type for m in metrics.registry.collect()}


def weights_nbytes(path: Path, engine) -> int:
    files = (path / "adapter_config.json", path / "adapter_model.safetensors")
    return validate_adapter(*(f.read_bytes() for f in files), engine.model_config, 16, RegistryLimits()).weights.nbytes


@pytest.fixture(scope="module")
def served(tiny_dir, tiny_adapters, tmp_path_factory):
    """Two adapters through one device slot and a host tier that holds one: every tier loads and evicts.

    Registering warms the host tier (b pushes a out); a's request reads disk (pushing b out), then
    b's request reads disk again (pushing a out) and evicts a from the device slot.
    """
    engine = make_engine(tiny_dir, max_adapters_on_device=1)
    paths = {"a": tiny_adapters["all_r8"], "b": tiny_adapters["qv_r4"]}
    budget = max(weights_nbytes(p, engine) for p in paths.values())
    registry = Registry(tmp_path_factory.mktemp("metrics") / "reg", engine.model_config, "tiny", 16,
                        host_cache_bytes=budget, is_pinned=engine.pool.is_pinned)
    for name, path in paths.items():
        registry.register_path("t", name, path, allow_any_path=True)
    for name in paths:
        out = engine.generate([1, 2, 3, 4], SamplingParams(max_new_tokens=3, ignore_eos=True),
                              adapter=registry.resolve("t", name))
        assert len(out.token_ids) == 3
    yield engine, registry
    engine.shutdown()
    registry.close()


def test_every_documented_metric_is_exported_with_its_type(served):
    engine, registry = served
    metrics = ServerMetrics()
    metrics.attach(engine.stats, registry.stats)
    metrics.registry.register(RouterMetrics(engine, qualify_tenants=True))  # as the server does
    documented = documented_metrics()
    assert len(documented) == 44 + len(SHARED_INDEX_METRICS)  # the table parsed (not empty when reformatted)
    assert SHARED_INDEX_METRICS <= set(documented)
    assert exported(metrics) == {n: t for n, t in documented.items() if n not in SHARED_INDEX_METRICS}


def test_scrape_reads_engine_and_registry_stats(served):
    engine, registry = served
    metrics = ServerMetrics()
    metrics.attach(engine.stats, registry.stats)
    value = metrics.registry.get_sample_value
    host = registry.stats().host
    expected = {
        # engine: idle again after two requests of 3 tokens (a prompt step and two decode steps each)
        "loraserve_requests_running": 0, "loraserve_requests_waiting": 0, "loraserve_kv_blocks_used": 0,
        "loraserve_kv_blocks_capacity": engine.blocks.num_blocks, "loraserve_batch_size": 1,
        "loraserve_preemptions_total": 0, "loraserve_engine_steps_total": 6,
        # prefix cache: two 4-token prompts hold no full 16-token block, so nothing is cached or reused
        "loraserve_prefix_cache_blocks": 0, "loraserve_prefix_cache_hits_total": 0,
        "loraserve_prefix_cache_misses_total": 2, "loraserve_prefix_cache_tokens_saved_total": 0,
        # device tier: one slot; each adapter a miss, a load, then a hit once ready; b evicted a
        "loraserve_adapter_slots": 1, "loraserve_adapters_on_device": 1, "loraserve_adapter_loads_total": 2,
        "loraserve_adapter_slots_in_use": 0,  # no request runs: no slot is held
        "loraserve_adapter_evictions_total": 1, "loraserve_adapter_load_failures_total": 0,
        "loraserve_adapter_slot_misses_total": 2, "loraserve_adapter_slot_hits_total": 2,
        # adapter memory: auto = one adapter of --max-rank 16; b (rank 4) holds 4 of its rows
        "loraserve_adapter_rows": 16, "loraserve_adapter_rows_used": 4,
        # host tier: holds one adapter; both device loads missed it and read disk; three evictions
        "loraserve_adapters_in_host_memory": 1, "loraserve_adapter_host_cache_bytes": host.bytes,
        "loraserve_adapter_host_cache_hits_total": 0, "loraserve_adapter_host_cache_misses_total": 2,
        "loraserve_adapter_host_evictions_total": 3, "loraserve_adapter_disk_loads_total": 2,
        "loraserve_adapter_disk_load_seconds_total": host.load_seconds,
        # registry
        "loraserve_adapter_versions_stored": 2, "loraserve_adapter_registrations_total": 2,
        "loraserve_adapter_rejections_total": 0,
    }
    assert {name: value(name) for name in expected} == expected
    assert host.bytes > 0 and host.load_seconds > 0
    assert value("loraserve_adapter_load_seconds_total") == engine.stats().pool.load_seconds > 0


def test_without_a_registry_the_host_tier_reads_empty(served):
    engine, _ = served
    metrics = ServerMetrics()
    metrics.attach(engine.stats)
    names = exported(metrics)
    assert metrics.registry.get_sample_value("loraserve_adapters_in_host_memory") == 0
    assert "loraserve_adapter_loads_total" in names and "loraserve_adapter_versions_stored" not in names
