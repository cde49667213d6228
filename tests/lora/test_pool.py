"""Adapter slots and rank rows: LRU eviction, pins, memory shared out by rank, misses counted once per load,
and loads that never stall the running batch."""
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
    assert pool.stats().slots_in_use == 0  # loaded and pinned, but no sequence holds a slot
    sa = pool.acquire(a)  # a running sequence holds a
    assert sa is not None and pool.stats().slots_in_use == 1
    assert pool.acquire(c) is None  # both slots held: c waits, nothing is evicted
    assert {s.key for s in pool.resident()} == {"all_r8", "qv_r4"}
    with pytest.raises(AdapterInUseError):
        pool.unload("all_r8")
    pool.release(sa)
    assert pool.stats().slots_in_use == 0
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
    st = pool.stacks
    assert torch.equal(st.slot_a(1, "down", idx)[:m.rank], m.a)
    assert torch.all(st.slot_a(1, "down", idx)[m.rank:] == 0)
    assert torch.equal(st.slot_bt(1, "down", idx).t()[:, :m.rank], m.b)
    assert pool.stacks.scale[1]["down"][idx].item() == pytest.approx(m.scale)
    assert torch.all(st.slot_a(0, "q", idx) == 0) and st.scale[0]["q"][idx].item() == 0  # untargeted module
    assert torch.all(st.slot_a(0, "q", 0) == 0) and torch.all(st.slot_bt(1, "down", 0) == 0)  # slot 0 stays empty
    assert len(pool.rows_of(idx)) == w.rank == 6 and pool.stats().rows_used == 6  # rows by rank, not max rank
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
                       kernel_copies=torch.bfloat16)
    torch.manual_seed(1)
    mods = {}
    for layer in range(mcfg.num_layers):
        for t in TARGETS:
            out_f, in_f = mcfg.target_shape(t)
            mods[(layer, t)] = LoraModule(a=torch.randn(4, in_f), b=torch.randn(out_f, 4), scale=0.5)
    w = LoraWeights(modules=mods)
    idx = pool.load(AdapterVersion("default", "w", 1, "w", lambda: w))
    other = 3 - idx
    copies = pool.kernel_stacks
    for (layer, t), mod in mods.items():
        assert torch.equal(copies.slot_a(layer, t, idx)[:4], mod.a.bfloat16())
        assert torch.equal(copies.slot_bt(layer, t, idx)[:4], mod.b.t().bfloat16())
        assert not copies.slot_a(layer, t, idx)[4:].any() and not copies.slot_a(layer, t, other).any()
    plain = AdapterPool(mcfg, num_slots=2, max_rank=8, device=torch.device("cpu"), dtype=torch.float32)
    assert plain.kernel_stacks is None and pool.nbytes == plain.nbytes * 3 // 2
    pool.shutdown()
    plain.shutdown()


def _weights(mcfg, rank: int, seed: int, targets=TARGETS) -> LoraWeights:
    g = torch.Generator().manual_seed(seed)
    mods = {}
    for layer in range(mcfg.num_layers):
        for t in targets:
            out_f, in_f = mcfg.target_shape(t)
            mods[(layer, t)] = LoraModule(a=torch.randn(rank, in_f, generator=g),
                                          b=torch.randn(out_f, rank, generator=g), scale=0.5)
    return LoraWeights(modules=mods)


def _version(name: str, w: LoraWeights) -> AdapterVersion:
    return AdapterVersion("default", name, 1, name, lambda: w)


def _wait_until(cond, timeout: float = 10.0) -> None:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, "timed out"
        time.sleep(0.005)


def test_memory_is_shared_out_by_rank(mcfg):
    """32 rows: four rank-8 adapters resident at once where fixed rank-16 slots held two; a rank-16 adapter
    evicts the two least recently used rank-8 ones, and then the freed rows serve again."""
    pool = AdapterPool(mcfg, num_slots=32, max_rank=16, device=torch.device("cpu"), dtype=torch.float32,
                       num_rows=32)
    assert pool.sure_capacity == 2  # what routers are told: adapters of any rank up to 16
    small = [_version(f"s{i}", _weights(mcfg, 8, i)) for i in range(4)]
    slots = [pool.load(v) for v in small]
    assert len(set(slots)) == 4 and pool.stats().rows_used == 32 and pool.stats().slots_ready == 4
    assert sorted(r for s in slots for r in pool.rows_of(s)) == list(range(1, 33))  # every row once, none twice
    for s in slots[2:]:
        pool.release(pool.acquire(small[slots.index(s)]))  # s2, s3 used last: s0, s1 are the LRU ones
    big = pool.load(_version("big", _weights(mcfg, 16, 9)))
    assert {s.key for s in pool.resident()} == {"s2", "s3", "big"}
    assert pool.stats().evictions == 2 and pool.stats().rows_used == 32 and pool.rank_of(big) == 16
    pool.shutdown()


def test_rows_freed_anywhere_serve_the_next_adapter_exactly(mcfg):
    """Evicting every other adapter leaves free rows that are not adjacent; a new adapter takes them and reads
    back exactly (its page table names them), and the rank rows past it read zero."""
    pool = AdapterPool(mcfg, num_slots=8, max_rank=8, device=torch.device("cpu"), dtype=torch.float32, num_rows=16)
    four = [_version(f"q{i}", _weights(mcfg, 4, i)) for i in range(4)]
    slots = [pool.load(v) for v in four]
    freed = pool.rows_of(slots[0]) + pool.rows_of(slots[2])
    for i in (0, 2):
        assert pool.unload(f"q{i}")
    w = _weights(mcfg, 8, 7)
    idx = pool.load(_version("w", w))
    rows = pool.rows_of(idx)
    assert sorted(rows) == sorted(freed) and rows[-1] - rows[0] > 7  # not one run of 8
    assert pool.pages[idx].tolist() == rows
    for (layer, t), m in w.modules.items():
        assert torch.equal(pool.stacks.slot_a(layer, t, idx), m.a)
        assert torch.equal(pool.stacks.slot_bt(layer, t, idx), m.b.t())
    kept = _weights(mcfg, 4, 1)  # q1 is untouched by all this
    for (layer, t), m in kept.modules.items():
        assert torch.equal(pool.stacks.slot_a(layer, t, slots[1])[:4], m.a)
        assert not pool.stacks.slot_a(layer, t, slots[1])[4:].any()
    pool.shutdown()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_an_adapter_loaded_into_a_freed_slot_reads_back_exactly(mcfg):
    """On CUDA (pinned host copies on a side stream) an adapter reads back bit-exactly in the stacks' dtype, and
    a slot freed while the compute stream is busy and loaded again at once keeps the new adapter's page-table
    row: freeing zeroes that row, and the zeroing must not land after the load wrote it."""
    pool = AdapterPool(mcfg, num_slots=1, max_rank=8, device=torch.device("cuda"), dtype=torch.bfloat16)
    idx = pool.load(_version("a", _weights(mcfg, 8, 1)))
    w = _weights(mcfg, 6, 2)
    torch.cuda._sleep(1_000_000_000)  # the compute stream busy for a while: what is queued on it runs late
    assert pool.unload("a")
    assert pool.load(_version("b", w)) == idx
    torch.cuda.synchronize()
    rows = pool.rows_of(idx)
    assert pool.pages[idx].tolist() == rows + [0, 0]
    for (layer, t), m in w.modules.items():
        assert torch.equal(pool.stacks.slot_a(layer, t, idx)[:6].cpu(), m.a.bfloat16())
        assert torch.equal(pool.stacks.slot_bt(layer, t, idx)[:6].cpu(), m.b.t().bfloat16())
        assert not pool.stacks.slot_a(layer, t, idx)[6:].any()
    pool.shutdown()


def test_a_miss_is_counted_once_per_load_not_per_waiting_step(mcfg):
    """Sequences ask for an adapter every step while it loads or waits for room: one miss, one load."""
    pool = AdapterPool(mcfg, num_slots=1, max_rank=8, device=torch.device("cpu"), dtype=torch.float32)
    a, b = _version("a", _weights(mcfg, 8, 1)), _version("b", _weights(mcfg, 8, 2))
    sa = pool.load(a)
    assert pool.acquire(a) == sa  # a running sequence holds a, the only slot
    for _ in range(50):  # b waits for room, step after step
        assert pool.acquire(b) is None
    _wait_until(lambda: pool._pending["b"].weights is not None)
    for _ in range(50):
        assert pool.acquire(b) is None
    assert pool.stats().misses == 1 and pool.stats().loads == 1 and pool.stats().evictions == 0
    pool.release(sa)
    _wait_until(lambda: pool.acquire(b) is not None)  # now a is evicted and b copied in
    st = pool.stats()
    assert st.misses == 1 and st.loads == 2 and st.evictions == 1 and st.hits == 2
    pool.shutdown()


def test_pins_that_leave_no_room_refuse_at_once(mcfg):
    pool = AdapterPool(mcfg, num_slots=4, max_rank=16, device=torch.device("cpu"), dtype=torch.float32, num_rows=24)
    pool.load(_version("p", _weights(mcfg, 16, 1)), pin=True)
    pool.load(_version("small", _weights(mcfg, 8, 2)))  # fits beside the pin
    with pytest.raises(CapacityError, match="pinned"):
        pool.load(_version("big", _weights(mcfg, 16, 3)))  # 24 - 16 pinned rows < 16
    big = _version("big2", _weights(mcfg, 16, 4))
    assert pool.acquire(big) is None
    _wait_until(lambda: pool._pending["big2"].weights is not None)
    with pytest.raises(CapacityError, match="pinned"):
        pool.acquire(big)  # a request gets the same answer instead of waiting forever
    pool.shutdown()


def test_an_adapter_loaded_for_waiting_requests_is_not_evicted_before_they_take_it(mcfg):
    """The loader is faster than the engine's steps: a second adapter must not undo the first one's load before
    the requests that missed it had their turn (they take it at their next step), or nobody would be served."""
    pool = AdapterPool(mcfg, num_slots=1, max_rank=8, device=torch.device("cpu"), dtype=torch.float32)
    x, y = _version("x", _weights(mcfg, 8, 1)), _version("y", _weights(mcfg, 8, 2))
    assert pool.acquire(x) is None
    _wait_until(lambda: [s.state for s in pool.resident()] == ["ready"])
    assert pool.acquire(y) is None  # y is read and waits: x's requests have not taken it yet
    _wait_until(lambda: pool._pending["y"].weights is not None)
    assert pool.acquire(y) is None
    sx = pool.acquire(x)
    assert sx is not None and pool.stats().loads == 1 and pool.stats().evictions == 0
    pool.release(sx)  # used and released: now it may go
    _wait_until(lambda: pool.acquire(y) is not None)
    assert pool.stats().loads == 2 and pool.stats().evictions == 1 and pool.stats().misses == 2
    pool.shutdown()
