"""64 registered adapters, 4 device slots, a small host tier: random concurrent traffic, every output correct.

Correct means: equal to the same request alone on the same server afterwards, and, for a
few adapters, equal to Hugging Face PEFT's greedy output. The tier counters must show
that adapters really moved between disk, host memory and the device slots.
"""
from __future__ import annotations

import random
import time
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from adapter_registry.validate import RegistryLimits, validate_adapter
from server.api.gen.loraserve.v1 import adapters_pb2 as pb
from server.model.config import ModelConfig
from tests.e2e.conftest import start_server
from tests.helpers import make_tiny_model_dir, peft_greedy
from tests.registry.adapters import make_adapter
from tests.registry.client import Client

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

N_ADAPTERS = 64
SLOTS = 4
REQUESTS = 160
HOST_ENTRIES = 40  # host-tier budget in adapters: below 64, so it evicts too
PROMPTS = ([5, 17, 99, 3, 42], [200, 1, 1, 7, 64, 33, 12, 9, 80])
NEW_TOKENS = 4


def test_many_adapters_few_slots(tmp_path: Path):
    model = make_tiny_model_dir(tmp_path / "model")
    mc = ModelConfig.from_file(model / "config.json")
    adapters = {}
    for i in range(N_ADAPTERS):
        targets = [("q", "v"), ("q", "k", "v", "o"), ("gate", "up", "down"), ("q", "v", "gate", "down")][i % 4]
        adapters[f"ad{i:02d}"] = make_adapter(model=mc, rank=2 + i % 7, targets=targets, seed=100 + i,
                                              alpha=8 + i % 5)
    one = adapters["ad00"]
    size = validate_adapter(*one, mc, 32, RegistryLimits()).weights.nbytes
    marks = [("begin", time.monotonic())]
    sp = start_server(tmp_path, "--model", str(model), "--quantize", "none", "--dtype", "float32",
                      "--max-adapters-on-device", str(SLOTS), "--host-cache-bytes", str(size * HOST_ENTRIES),
                      env={"LORASERVE_HOME": str(tmp_path / "home")})
    try:
        marks.append(("server up", time.monotonic()))
        admin = Client(sp.target)
        for name, (cfg, weights) in adapters.items():
            assert admin.register(name, cfg, weights).version.version == 1
        marks.append(("registered", time.monotonic()))
        rng = random.Random(7)
        # each adapter always gets the same prompt (two prompt lengths overall), so the
        # alone-check afterwards is one request per adapter
        picks = [rng.choice(list(adapters) + [""] * 6) for _ in range(REQUESTS)]
        plan = [(n, (int(n[2:]) if n else k) % len(PROMPTS), rng.random() < 0.5) for k, n in enumerate(picks)]
        local = threading.local()

        def send(item):
            name, p, streaming = item
            if not hasattr(local, "c"):
                local.c = Client(sp.target)
            if streaming:
                ids, adapter, version, _ = local.c.stream(name, PROMPTS[p], NEW_TOKENS)
            else:
                r = local.c.generate(name, PROMPTS[p], NEW_TOKENS)
                ids, adapter, version = list(r.token_ids), r.adapter_id, r.adapter_version
            assert adapter == name and version == (1 if name else 0) and len(ids) == NEW_TOKENS
            return ids

        with ThreadPoolExecutor(8) as pool:
            outputs = list(pool.map(send, plan))
        marks.append(("traffic", time.monotonic()))
        expected = {}
        for name, p in sorted({(n, p) for n, p, _ in plan}):
            expected[(name, p)] = list(admin.generate(name, PROMPTS[p], NEW_TOKENS).token_ids)
        marks.append(("alone checks", time.monotonic()))
        wrong = [(n, p) for (n, p, _), ids in zip(plan, outputs) if ids != expected[(n, p)]]
        assert not wrong, f"{len(wrong)} of {REQUESTS} outputs differ from the same request alone: {wrong[:5]}"
        distinct = {tuple(v) for v in expected.values()}
        assert len(distinct) > len(expected) // 4, "adapters too weak to tell apart"
        # the exact reference: PEFT itself, for a few adapters
        for name in ("ad01", "ad02"):
            d = tmp_path / "peft" / name
            d.mkdir(parents=True)
            (d / "adapter_config.json").write_bytes(adapters[name][0])
            (d / "adapter_model.safetensors").write_bytes(adapters[name][1])
            for p, prompt in enumerate(PROMPTS):
                if (name, p) in expected:
                    assert expected[(name, p)] == peft_greedy(model, d, prompt, NEW_TOKENS), (name, p)
        marks.append(("peft checks", time.monotonic()))
        print("\n" + ", ".join(f"{m}: {t - marks[i][1]:.1f}s" for i, (m, t) in enumerate(marks[1:])))
        # the tiers really moved
        assert sp.metric("loraserve_adapter_evictions_total") > 0
        assert sp.metric("loraserve_adapter_host_evictions_total") > 0
        assert sp.metric("loraserve_adapter_disk_loads_total") > 0
        assert sp.metric("loraserve_adapter_host_cache_hits_total") > 0
        assert sp.metric("loraserve_adapters_on_device") <= SLOTS
        assert 0 < sp.metric("loraserve_adapters_in_host_memory") <= HOST_ENTRIES
        listed = admin.adapters.ListAdapters(pb.ListAdaptersRequest(), metadata=admin.md)
        tiers = [v.tier for a in listed.adapters for v in a.versions]
        assert len(tiers) == N_ADAPTERS and 1 <= tiers.count(pb.TIER_DEVICE) <= SLOTS
        assert tiers.count(pb.TIER_DISK) > 0 and tiers.count(pb.TIER_HOST) > 0
        admin.close()
    finally:
        assert sp.stop() == 0, sp.log_tail()
