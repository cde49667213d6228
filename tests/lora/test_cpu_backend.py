"""The CPU kernel backend: one kernel call per projection and kind of row, each row its own adapter's
delta (on the bf16-rounded weights), a row's numbers the same alone as in any batch, and the torch
reference for what the plans do not cover."""
from __future__ import annotations

import shutil

import pytest
import torch

from server.lora import cpu_kernel
from server.lora.backend import StepRows
from server.lora.cpu_backend import CpuKernelBackend
from server.lora.segments import LoraSegments
from server.model.config import PROJECTIONS
from tests.lora.backend_utils import TINY, check_step, pool_with, random_adapter, scattered_pool_with

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None,
                                reason="no C compiler: the torch reference serves (tested elsewhere)")

ADAPTERS = [random_adapter(TINY, 8, ("q", "k", "v", "o", "gate", "up", "down"), 1, bf16_exact=True),
            random_adapter(TINY, 3, ("q", "v"), 2, bf16_exact=True),
            random_adapter(TINY, 16, ("gate", "up", "down"), 3, bf16_exact=True)]


@pytest.fixture(scope="module", params=[False, True], ids=["adjacent-rows", "scattered-rows"])
def backend(kernel, request):
    assert kernel is not None, "a C compiler is present, so the kernel must build and load"
    pool, slots = (scattered_pool_with if request.param else pool_with)(ADAPTERS, kernel_copies=torch.bfloat16)
    backend = CpuKernelBackend(pool, kernel)
    backend.test_slots = slots
    yield backend
    pool.shutdown()


def test_each_row_gets_its_own_adapters_delta_whatever_its_batch(backend, monkeypatch):
    calls = []
    real = cpu_kernel.CpuLoraKernel.run_prompt
    monkeypatch.setattr(cpu_kernel.CpuLoraKernel, "run_prompt",
                        lambda self, *a: calls.append(a[3].count) or real(self, *a))
    slots = backend.test_slots
    by_slot = dict(zip(slots, ADAPTERS))
    rows, num_decode = [0, 1, 2, 3, 1, 1, 1, 1, 1, 0, 0, 2, 3, 3], 4  # decode rows, then prompt rows
    rows = [slots[r - 1] if r else 0 for r in rows]
    step = backend.prepare(rows, num_decode)
    torch.manual_seed(0)
    for layer in range(TINY.num_layers):
        for targets in PROJECTIONS:
            projection = TINY.projection(targets)
            # Prompt rows as bf16 pairs round x and the rank values to bf16 (cpu_kernel.py): within 1% there.
            bf16 = backend.kernel.prompt_bf16
            x, y0, got = check_step(step, rows, by_slot, layer, projection, rtol=1e-4, atol=1e-3,
                                    where=(layer, targets), rel_from=num_decode if bf16 else None, rel=1e-2)
            for i in range(num_decode):  # a decode row alone: the same numbers, bit for bit
                alone = backend.prepare([rows[i]], 1)
                if alone is not None:
                    assert torch.equal(alone.apply(y0[i:i + 1].clone(), x[i:i + 1], layer, projection), got[i:i + 1])
    assert calls == [len(t) for _ in range(TINY.num_layers) for t in PROJECTIONS], "one call per projection"


def test_fused_projection_equals_its_targets_one_by_one(backend):
    """The model hands q/k/v over together; the result equals handing each target's column slice over
    alone, and a grouping the backend has no plan for still gets the right delta (from the fp32 torch path)."""
    parts = TINY.projection(("q", "k", "v"))
    width = sum(w for _, w in parts)
    slots = [backend.test_slots[i - 1] if i else 0 for i in (2, 1, 0, 1)]
    step = backend.prepare_rows(StepRows(slots, len(slots), LoraSegments.from_token_slots(slots), 8))
    torch.manual_seed(2)
    x = torch.randn(len(slots), TINY.hidden_size)
    y0 = torch.randn(len(slots), width)
    together = step.apply(y0.clone(), x, 0, parts)
    alone, lo = y0.clone(), 0
    for t, w in parts:
        step.apply(alone[:, lo:lo + w], x, 0, ((t, w),))
        lo += w
    assert torch.equal(together, alone)
    assert not torch.equal(together, y0)
    unplanned = (("q", parts[0][1]), ("v", parts[2][1]))  # no fused q+v projection: the torch path serves it
    cols = torch.cat([y0[:, :parts[0][1]], y0[:, -parts[2][1]:]], 1)
    got = step.apply(cols.clone(), x, 0, unplanned)
    want = torch.cat([together[:, :parts[0][1]], together[:, -parts[2][1]:]], 1)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-3)


def test_engine_decodes_through_the_kernel_whatever_the_batch(tiny_dir, tiny_adapters, kernel_home, monkeypatch):
    """bf16 LoRA weights: every decode step goes through the kernel (mixed steps too), a request gets the
    same tokens alone and batched with other adapters and the base, and greedy tokens stay close to the
    fp32 engine's (bf16 weights may move a near-tie now and then, never the whole output)."""
    from server.engine.types import Request, SamplingParams
    from tests.engine.engine_utils import local_adapter, make_engine

    calls = []
    real = cpu_kernel.CpuLoraKernel.run
    monkeypatch.setattr(cpu_kernel.CpuLoraKernel, "run", lambda self, *a: calls.append(a[3].count) or real(self, *a))
    names = ["all_r8", "qv_r4", "mlp_rs", None]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)

    def run(eng, which):
        streams = [eng.submit(Request([5 + i, 9, 17, 33, 2 * i + 40][: 3 + i], params,
                                      local_adapter(eng, n, tiny_adapters[n]) if n else None))
                   for i, n in enumerate(names) if i in which]
        return [s.collect().token_ids for s in streams]

    outs = {}
    for dt in ("float32", "bfloat16", "int8"):
        eng = make_engine(tiny_dir, lora_decode_dtype=dt, home=str(kernel_home))
        assert eng.lora_backend.name == ("torch" if dt == "float32" else "cpu")
        try:
            outs[dt] = run(eng, range(4))
            if dt != "float32":
                alone = [run(eng, [i])[0] for i in range(4)]
                assert alone == outs[dt]
        finally:
            eng.shutdown()
        if dt == "float32":
            assert not calls
    assert calls, "the bf16 engine's decode steps went through the kernel"
    assert {3, 2, 1} <= set(calls), "q/k/v and gate/up take one call each, o and down one alone"
    for dt in ("bfloat16", "int8"):
        assert all(len(o) == 12 for o in outs[dt])
        same = sum(a == b for x, y in zip(outs["float32"], outs[dt]) for a, b in zip(x, y))
        assert same >= 0.75 * 48, dt


@pytest.mark.parametrize("copies", [torch.bfloat16, torch.int8])
def test_int8_copies_give_each_row_its_adapters_delta_to_int8s_precision(kernel, copies):
    """The pool's int8 copies (one scale a rank row) through the backend: each row's delta within about 1% of
    the fp32 reference's (bf16 copies: within bf16's rounding), decode and prompt rows alike."""
    assert kernel is not None
    adapters = [random_adapter(TINY, 8, ("q", "k", "v", "o", "gate", "up", "down"), 11),
                random_adapter(TINY, 16, ("q", "v", "down"), 12)]
    pool, slots = scattered_pool_with(adapters, kernel_copies=copies)
    try:
        assert pool.kernel_stacks.dtype == copies
        backend = CpuKernelBackend(pool, kernel)
        rows = [slots[1], 0, slots[0], slots[0], slots[0], slots[1], slots[1]]
        step = backend.prepare(rows, 3)
        torch.manual_seed(4)
        for layer in range(TINY.num_layers):
            for targets in PROJECTIONS:
                projection = TINY.projection(targets)
                in_f = TINY.target_shape(targets[0])[1]
                x = torch.randn(len(rows), in_f)
                y0 = torch.randn(len(rows), sum(w for _, w in projection))
                got = step.apply(y0.clone(), x, layer, projection) - y0
                want = backend.reference.prepare(rows, 3).apply(y0.clone(), x, layer, projection) - y0
                err = (got - want).norm(dim=1) / want.norm(dim=1).clamp(min=1e-6)
                # bf16 copies round the weights to bf16; prompt rows as bf16 pairs also x and the rank values
                bound = 2e-2 if copies == torch.int8 else 1e-2 if kernel.prompt_bf16 else 5e-3
                assert (err[want.norm(dim=1) > 0] < bound).all(), (layer, targets, err)
                assert not got[1].any()  # the base row
    finally:
        pool.shutdown()
