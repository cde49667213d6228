"""The CPU decode kernel (bf16 slot copies) against the torch reference on the same bf16-rounded weights."""
from __future__ import annotations

import shutil

import pytest
import torch

from server.lora import cpu_kernel, torch_ref
from server.lora.pool import AdapterPool, LoraBatch
from server.lora.segments import LoraSegments
from server.lora.weights import LoraModule, LoraWeights
from server.model.config import TARGETS, ModelConfig


@pytest.fixture(scope="module")
def tiny_config(tiny_dir):
    return ModelConfig.from_file(tiny_dir / "config.json")

needs_cc = pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None,
                              reason="no C compiler: the torch reference serves (tested elsewhere)")


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("LORASERVE_HOME", str(tmp_path_factory.mktemp("home")))
    cpu_kernel.load.cache_clear()
    k = cpu_kernel.load()
    yield k
    cpu_kernel.load.cache_clear()
    mp.undo()


@needs_cc
@pytest.mark.parametrize("shape,rank", [((576, 192), 16), ((100, 37), 13), ((64, 64), 1)])
def test_decode_matches_reference_on_bf16_weights(kernel, shape, rank):
    """Any decode rows: slots repeated, out of order, slot 0 (no adapter) among them."""
    assert kernel is not None, "a C compiler is present, so the kernel must build and load"
    torch.manual_seed(0)
    n, R, (k, out) = 9, 32, shape
    a = torch.randn(n, R, k).bfloat16()
    bt = torch.randn(n, R, out).bfloat16()
    scale = torch.rand(n)
    scale[0] = 0.0
    slots = torch.tensor([3, 3, 0, 8, 1, 5, 3], dtype=torch.int64)
    x = torch.randn(len(slots) + 2, k)  # two prompt rows after the decode rows: never touched
    y_wide = torch.randn(len(slots) + 2, out + 7)
    y = y_wide[:, 3:3 + out]  # a column slice, like q/k/v of the fused projection
    seg = LoraSegments.from_token_slots(slots.tolist())
    want = torch_ref.apply_lora(y[:len(slots)].clone(), x[:len(slots)], a.float()[:, :rank],
                                bt.float().transpose(1, 2)[:, :, :rank], scale, seg)
    before = y_wide.clone()
    kernel.decode(y, x, slots, a, bt, scale, rank)
    assert torch.allclose(y[:len(slots)], want, rtol=1e-5, atol=1e-4)
    assert torch.equal(y_wide[len(slots):], before[len(slots):])  # prompt rows untouched
    assert torch.equal(y_wide[:, :3], before[:, :3]) and torch.equal(y_wide[:, 3 + out:], before[:, 3 + out:])


@needs_cc
@pytest.mark.parametrize("rank", [16, 7])
def test_one_call_for_a_fused_projection_equals_each_target_alone(kernel, rank):
    """q/k/v in one call (x read once, outputs side by side in the fused projection's columns)
    give what each target's own reference gives on its column slice."""
    torch.manual_seed(1)
    n, R, k, outs = 6, 16, 96, (96, 32, 32)
    stacks = [(torch.randn(n, R, k).bfloat16(), torch.randn(n, R, o).bfloat16(), torch.rand(n)) for o in outs]
    offs = [0, outs[0], outs[0] + outs[1]]
    plan = cpu_kernel.KernelPlan([(a, bt, sc, off) for (a, bt, sc), off in zip(stacks, offs)])
    assert plan.width == sum(outs) and plan.count == 3
    slots = torch.tensor([2, 0, 5, 2, 1], dtype=torch.int64)
    x = torch.randn(len(slots) + 1, k)
    y = torch.randn(len(slots) + 1, sum(outs))
    want = y.clone()
    seg = LoraSegments.from_token_slots(slots.tolist())
    for (a, bt, sc), off, o in zip(stacks, offs, outs):
        part = want[:len(slots), off:off + o].clone()
        want[:len(slots), off:off + o] = torch_ref.apply_lora(
            part, x[:len(slots)], a.float()[:, :rank], bt.float().transpose(1, 2)[:, :, :rank], sc, seg)
    assert kernel.accepts(y, x, plan)
    kernel.check_slots(slots, rank, plan)
    assert kernel.try_run(y, x, slots, plan, rank)
    assert torch.allclose(y, want, rtol=1e-5, atol=1e-4)


@needs_cc
@pytest.mark.parametrize("rank", [16, 5])
def test_prompt_rows_match_the_reference_whatever_their_blocks(kernel, rank):
    """Prompt rows of several adapters (runs of 1 to 9 rows, so blocks of 4 and remainders, slot 0
    among them, widths not a multiple of 8) equal the torch reference on the same bf16 weights, and
    a row gets the same numbers alone as inside a run of its adapter."""
    torch.manual_seed(3)
    n, R, k, outs = 6, 16, 72, (40, 21)
    stacks = [(torch.randn(n, R, k).bfloat16(), torch.randn(n, R, o).bfloat16(), torch.rand(n)) for o in outs]
    plan = cpu_kernel.KernelPlan([(a, bt, sc, off) for (a, bt, sc), off in zip(stacks, (0, outs[0]))])
    decode_rows = 2  # before the prompt rows: the prompt kernel must leave them alone
    prompt = [1] * 9 + [0] * 3 + [4] * 5 + [2] + [5] * 4
    x = torch.randn(decode_rows + len(prompt), k)
    y0 = torch.randn(decode_rows + len(prompt), sum(outs))
    # The step's segments; the last decode row shares slot 1 with the first prompt rows (one segment).
    blocks = kernel.prompt_blocks(LoraSegments.from_token_slots([4, 1] + prompt), decode_rows)
    assert int((blocks[:, 0] + blocks[:, 1]).max()) == x.shape[0] and int(blocks[:, 0].min()) == decode_rows
    assert blocks[:, 1].max() <= 4 and 0 not in blocks[:, 2].tolist()
    kernel.check_slots(blocks[:, 2].contiguous(), rank, plan)
    y = y0.clone()
    assert kernel.try_run_prompt(y, x, blocks, plan, rank)
    want = y0.clone()
    seg = LoraSegments.from_token_slots(prompt)
    for (a, bt, sc), lo, o in zip(stacks, (0, outs[0]), outs):
        part = want[decode_rows:, lo:lo + o].clone()
        want[decode_rows:, lo:lo + o] = torch_ref.apply_lora(
            part, x[decode_rows:], a.float()[:, :rank], bt.float().transpose(1, 2)[:, :, :rank], sc, seg)
    assert torch.equal(y[:decode_rows], y0[:decode_rows])
    assert torch.allclose(y, want, rtol=1e-5, atol=1e-4)
    for row in (decode_rows + 0, decode_rows + 8, decode_rows + 13):  # first of a run, the 9th of a run, a middle one
        alone = y0[row:row + 1].clone()
        one = kernel.prompt_blocks(LoraSegments.from_token_slots([prompt[row - decode_rows]]), 0)
        assert kernel.try_run_prompt(alone, x[row:row + 1], one, plan, rank)
        assert torch.equal(alone, y[row:row + 1])
    assert not kernel.try_run_prompt(y[:5], x, blocks, plan, rank)  # fewer rows than the blocks reach


@needs_cc
def test_refuses_layouts_it_cannot_read(kernel):
    a = torch.zeros(3, 4, 8, dtype=torch.bfloat16)
    bt = torch.zeros(3, 4, 6, dtype=torch.bfloat16)
    x, y, s = torch.zeros(2, 8), torch.zeros(2, 6), torch.zeros(3)
    plan = cpu_kernel.KernelPlan([(a, bt, s, 0)])
    assert kernel.accepts(y, x, plan)
    with pytest.raises(ValueError, match="bf16"):
        cpu_kernel.KernelPlan([(a.float(), bt, s, 0)])  # fp32 stacks: the torch path's job
    with pytest.raises(ValueError, match="disagree"):
        cpu_kernel.KernelPlan([(a, bt[:, :2].contiguous(), s, 0)])  # ranks differ
    assert not kernel.accepts(y, x.t().contiguous().t(), plan)  # column-major x
    assert not kernel.accepts(y, torch.zeros(2, 9), plan)  # width mismatch
    assert not kernel.accepts(y.double(), x, plan)
    assert not kernel.try_run(torch.zeros(2, 7), x, torch.tensor([1, 2]), plan, 2)  # y wider than the plan
    with pytest.raises(ValueError):
        kernel.decode(y, x, torch.tensor([1, 2]), a, bt, s, 5)  # rank over the stack's R
    with pytest.raises(ValueError):
        kernel.decode(y, x, torch.tensor([1, 3]), a, bt, s, 2)  # slot out of range
    with pytest.raises(ValueError):
        kernel.decode(y, x, torch.tensor([1, -1]), a, bt, s, 2)  # negative slot
    with pytest.raises(ValueError):
        kernel.decode(y, x, torch.tensor([1, 2], dtype=torch.int32), a, bt, s, 2)  # not int64
    with pytest.raises(ValueError):
        kernel.decode(y, x, torch.tensor([1, 1, 1]), a, bt, s, 2)  # more tokens than rows


def test_off_switch(monkeypatch):
    monkeypatch.setenv("LORASERVE_CPU_KERNEL", "0")
    cpu_kernel.load.cache_clear()
    try:
        assert cpu_kernel.load() is None
    finally:
        cpu_kernel.load.cache_clear()


def test_pool_keeps_bf16_decode_copies_in_step_with_the_fp32_stacks(tiny_config):
    pool = AdapterPool(tiny_config, num_slots=2, max_rank=8, device=torch.device("cpu"), dtype=torch.float32,
                       decode_dtype=torch.bfloat16)
    torch.manual_seed(1)
    mods = {}
    for layer in range(tiny_config.num_layers):
        for t in TARGETS:
            out_f, in_f = tiny_config.target_shape(t)
            mods[(layer, t)] = LoraModule(a=torch.randn(4, in_f), b=torch.randn(out_f, 4), scale=0.5)
    w = LoraWeights(modules=mods)
    pool._copy(2, w)
    for (layer, t), mod in mods.items():
        assert torch.equal(pool.decode_a[layer][t][2, :4], mod.a.bfloat16())
        assert torch.equal(pool.decode_bt[layer][t][2, :4], mod.b.t().bfloat16())
        assert not pool.decode_a[layer][t][2, 4:].any() and not pool.decode_a[layer][t][1].any()
    plain = AdapterPool(tiny_config, num_slots=2, max_rank=8, device=torch.device("cpu"), dtype=torch.float32)
    assert not plain.decode_a and pool.nbytes == plain.nbytes * 3 // 2


def test_lora_decode_dtype_resolution():
    from server.core.engine_config import EngineConfig
    from server.core.errors import InvalidRequestError

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert EngineConfig(quantize="int8").resolve_lora_decode_dtype(cpu) == torch.bfloat16
    assert EngineConfig(quantize="none").resolve_lora_decode_dtype(cpu) == torch.float32  # the PEFT-exact setting
    assert EngineConfig(quantize="none", lora_decode_dtype="bfloat16").resolve_lora_decode_dtype(cpu) == torch.bfloat16
    assert EngineConfig(quantize="int8", lora_decode_dtype="float32").resolve_lora_decode_dtype(cpu) == torch.float32
    assert EngineConfig(quantize="int8").resolve_lora_decode_dtype(cuda) == torch.float32
    with pytest.raises(InvalidRequestError, match="lora_decode_dtype"):
        EngineConfig(lora_decode_dtype="fp8").resolve_lora_decode_dtype(cpu)


@needs_cc
def test_engine_decodes_through_the_kernel_whatever_the_batch(tiny_dir, tiny_adapters, monkeypatch):
    """bf16 decode copies: every decode step goes through the kernel (mixed steps too), a request gets the
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
    for dt in ("float32", "bfloat16"):
        eng = make_engine(tiny_dir, lora_decode_dtype=dt)
        try:
            outs[dt] = run(eng, range(4))
            if dt == "bfloat16":
                alone = [run(eng, [i])[0] for i in range(4)]
                assert alone == outs[dt]
        finally:
            eng.shutdown()
        if dt == "float32":
            assert not calls
    assert calls, "the bf16 engine's decode steps went through the kernel"
    assert {3, 2, 1} <= set(calls), "q/k/v and gate/up take one call each, o and down one alone"
    assert all(len(o) == 12 for o in outs["bfloat16"])
    same = sum(a == b for x, y in zip(outs["float32"], outs["bfloat16"]) for a, b in zip(x, y))
    assert same >= 0.75 * 48


@needs_cc
def test_fused_projection_through_the_pool_equals_its_targets_one_by_one(tiny_config, kernel):
    """The model hands q/k/v over together (`apply_group`); the result equals handing each target's
    column slice over alone, and a grouping the pool has no plan for still gets the right delta
    (from the fp32 torch path)."""
    pool = AdapterPool(tiny_config, num_slots=3, max_rank=8, device=torch.device("cpu"), dtype=torch.float32,
                       decode_dtype=torch.bfloat16)
    torch.manual_seed(2)
    for slot, r in ((1, 8), (2, 3)):
        mods = {}
        for layer in range(tiny_config.num_layers):
            for t in TARGETS:
                out_f, in_f = tiny_config.target_shape(t)
                mods[(layer, t)] = LoraModule(a=torch.randn(r, in_f).bfloat16().float(),
                                              b=torch.randn(out_f, r).bfloat16().float(), scale=0.5)
        pool._copy(slot, LoraWeights(modules=mods))
    parts = tuple((t, tiny_config.target_shape(t)[0]) for t in ("q", "k", "v"))
    width = sum(w for _, w in parts)
    slots = [2, 1, 0, 1]
    batch = LoraBatch(pool, LoraSegments.from_token_slots(slots), 8, slots, decode_rows=len(slots))
    x = torch.randn(len(slots), tiny_config.hidden_size)
    y0 = torch.randn(len(slots), width)
    together = batch.apply_group(y0.clone(), x, 0, parts)
    alone, lo = y0.clone(), 0
    for t, w in parts:
        batch.apply(alone[:, lo:lo + w], x, 0, t)
        lo += w
    assert torch.equal(together, alone)
    assert not torch.equal(together, y0)
    unplanned = (("q", parts[0][1]), ("v", parts[2][1]))  # no fused q+v projection: the torch path serves it
    cols = torch.cat([y0[:, :parts[0][1]], y0[:, -parts[2][1]:]], 1)
    got = batch.apply_group(cols.clone(), x, 0, unplanned)
    want = torch.cat([together[:, :parts[0][1]], together[:, -parts[2][1]:]], 1)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-3)
