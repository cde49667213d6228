"""Adapter slots: LRU eviction, pins, and loads that never stall the running batch."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from server.core.identity import AdapterVersion
from server.engine.types import Request, SamplingParams
from server.core.errors import AdapterInUseError, CapacityError
from server.lora.pool import AdapterPool
from server.lora.weights import LoraModule, LoraWeights, load_peft_adapter
from server.model.config import TARGETS, ModelConfig
from tests.engine.engine_utils import make_engine


@pytest.fixture(scope="module")
def mcfg(tiny_dir):
    return ModelConfig.from_file(tiny_dir / "config.json")


def _adapter(mcfg, name, path, delay=0.0):
    def load():
        time.sleep(delay)
        return load_peft_adapter(path, mcfg, 16)
    return AdapterVersion("default", name, 1, name, load)


def test_lru_eviction_spares_referenced_and_pinned_slots(mcfg, tiny_adapters):
    pool = AdapterPool(mcfg, num_slots=2, max_rank=16, device=torch.device("cpu"), dtype=torch.float32)
    a, b, c = (_adapter(mcfg, n, tiny_adapters[n]) for n in ("all_r8", "qv_r4", "mlp_rs"))
    pool.load(a)
    pool.load(b, pin=True)
    assert pool.is_pinned("qv_r4") and not pool.is_pinned("all_r8")
    sa = pool.acquire(a)  # a running sequence holds a
    assert sa is not None
    assert pool.acquire(c) is None  # both slots held: c waits, nothing is evicted
    assert {s.key for s in pool.resident()} == {"all_r8", "qv_r4"}
    with pytest.raises(AdapterInUseError):
        pool.unload("all_r8")
    pool.release(sa)
    pool.load(c)  # now a (unreferenced, unpinned, least recently used) goes
    assert {s.key for s in pool.resident()} == {"qv_r4", "mlp_rs"}
    assert pool.stats().evictions == 1
    pool.load(c, pin=True)  # both remaining slots pinned by an operator
    with pytest.raises(CapacityError, match="pinned"):
        pool.load(a)
    pool.unpin("qv_r4")
    assert not pool.is_pinned("qv_r4")
    pool.load(a)  # the unpinned one is evicted
    assert {s.key for s in pool.resident()} == {"all_r8", "mlp_rs"}
    pool.shutdown()


def test_slot_contents_are_exactly_the_adapter_zero_padded(mcfg, tiny_adapters):
    pool = AdapterPool(mcfg, num_slots=3, max_rank=16, device=torch.device("cpu"), dtype=torch.float32)
    w = load_peft_adapter(tiny_adapters["pattern"], mcfg, 16)
    idx = pool.load(_adapter(mcfg, "pattern", tiny_adapters["pattern"]))
    m = w.modules[(1, "down")]
    assert torch.equal(pool.stacks.a[1]["down"][idx, :m.rank], m.a)
    assert torch.all(pool.stacks.a[1]["down"][idx, m.rank:] == 0)
    assert torch.equal(pool.stacks.b[1]["down"][idx, :, :m.rank], m.b)
    assert pool.stacks.scale[1]["down"][idx].item() == pytest.approx(m.scale)
    st = pool.stacks
    assert torch.all(st.a[0]["q"][idx] == 0) and st.scale[0]["q"][idx].item() == 0  # untargeted module
    assert torch.all(st.a[0]["q"][0] == 0) and torch.all(st.b[1]["down"][0] == 0)  # slot 0 stays empty
    pool.shutdown()


def test_cold_adapter_load_does_not_stall_running_decode(tiny_dir, tiny_adapters):
    eng = make_engine(tiny_dir)
    try:
        stamps: list[float] = []
        running = eng.submit(Request([5] * 12, SamplingParams(max_new_tokens=400, ignore_eos=True)))

        def consume():
            for _ in running:
                stamps.append(time.monotonic())
        t = threading.Thread(target=consume)
        t.start()
        while len(stamps) < 5:
            time.sleep(0.005)
        slow = _adapter(eng.model_config, "slow", tiny_adapters["all_r8"], delay=1.0)
        t0 = time.monotonic()
        cold = eng.submit(Request([6] * 12, SamplingParams(max_new_tokens=5, ignore_eos=True), slow))
        out = cold.collect()
        t1 = time.monotonic()
        assert out.adapter.name == "slow" and len(out.token_ids) == 5
        during = [s for s in stamps if t0 + 0.1 < s < t0 + 0.9]
        assert len(during) >= 5, "decode of the running request stalled while the adapter loaded"
        assert t1 - t0 >= 1.0
        eng.abort(running.request_id)
        t.join()
    finally:
        eng.shutdown()


def test_pool_keeps_bf16_decode_copies_in_step_with_the_fp32_stacks(mcfg):
    pool = AdapterPool(mcfg, num_slots=2, max_rank=8, device=torch.device("cpu"), dtype=torch.float32,
                       bf16_copies=True)
    torch.manual_seed(1)
    mods = {}
    for layer in range(mcfg.num_layers):
        for t in TARGETS:
            out_f, in_f = mcfg.target_shape(t)
            mods[(layer, t)] = LoraModule(a=torch.randn(4, in_f), b=torch.randn(out_f, 4), scale=0.5)
    w = LoraWeights(modules=mods)
    pool._copy(2, w)
    copies = pool.bf16_stacks
    for (layer, t), mod in mods.items():
        assert torch.equal(copies.a[layer][t][2, :4], mod.a.bfloat16())
        assert torch.equal(copies.bt[layer][t][2, :4], mod.b.t().bfloat16())
        assert not copies.a[layer][t][2, 4:].any() and not copies.a[layer][t][1].any()
    plain = AdapterPool(mcfg, num_slots=2, max_rank=8, device=torch.device("cpu"), dtype=torch.float32)
    assert plain.bf16_stacks is None and pool.nbytes == plain.nbytes * 3 // 2
