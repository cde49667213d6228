"""The CPU kernels (bf16 slot copies) against the torch reference on the same bf16-rounded weights, called
as the CPU backend calls them: a `KernelPlan`, `check_slots` and `accepts` once, then `run` / `run_prompt`."""
from __future__ import annotations

import shutil

import pytest
import torch

from server.lora import cpu_kernel, torch_ref
from server.lora.segments import LoraSegments

needs_cc = pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None,
                              reason="no C compiler: the torch reference serves (tested elsewhere)")


def per_slot_plan(parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]]) -> cpu_kernel.KernelPlan:
    """A plan over per-slot stacks (A [n, R, k], B^T [n, R, out] per target): their rows, slot s's ranks at
    rows s*R.., named by a page table as the pool's would name them."""
    n, r = parts[0][0].shape[:2]
    pages = torch.arange(n * r, dtype=torch.int32).view(n, r)
    return cpu_kernel.KernelPlan([(a.reshape(n * r, -1), bt.reshape(n * r, -1), sc, off) for a, bt, sc, off in parts],
                                 pages)


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
    plan = per_slot_plan([(a, bt, scale, 0)])
    kernel.check_slots(slots, rank, plan)
    assert kernel.accepts(y, x, plan, len(slots))
    kernel.run(y, x, slots, plan, rank)
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
    plan = per_slot_plan([(a, bt, sc, off) for (a, bt, sc), off in zip(stacks, offs)])
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
    assert kernel.accepts(y, x, plan, len(slots))
    kernel.check_slots(slots, rank, plan)
    kernel.run(y, x, slots, plan, rank)
    assert torch.allclose(y, want, rtol=1e-5, atol=1e-4)


@needs_cc
@pytest.mark.parametrize("rank", [16, 5])
def test_prompt_rows_match_the_reference_whatever_their_blocks(kernel, rank):
    """Prompt rows of several adapters (runs of 1 to 163 rows, so full blocks, spans of blocks, remainders and
    partial register tiles, slot 0 among them, widths not a multiple of the vector width) equal the torch
    reference on the same bf16 weights, and a row gets the same numbers alone as inside a run of its adapter."""
    torch.manual_seed(3)
    n, R, k, outs = 6, 16, 72, (40, 21)
    stacks = [(torch.randn(n, R, k).bfloat16(), torch.randn(n, R, o).bfloat16(), torch.rand(n)) for o in outs]
    plan = per_slot_plan([(a, bt, sc, off) for (a, bt, sc), off in zip(stacks, (0, outs[0]))])
    decode_rows = 2  # before the prompt rows: the prompt kernel must leave them alone
    long_run = cpu_kernel.PROMPT_SPAN + cpu_kernel.PROMPT_BLOCK + 3  # a full span of blocks, then two more blocks
    prompt = [1] * (cpu_kernel.PROMPT_BLOCK + 5) + [0] * 3 + [4] * 5 + [2] + [5] * 4 + [3] * long_run
    x = torch.randn(decode_rows + len(prompt), k)
    y0 = torch.randn(decode_rows + len(prompt), sum(outs))
    # The step's segments; the last decode row shares slot 1 with the first prompt rows (one segment).
    blocks = kernel.prompt_blocks(LoraSegments.from_token_slots([4, 1] + prompt), decode_rows)
    assert int((blocks[:, 0] + blocks[:, 1]).max()) == x.shape[0] and int(blocks[:, 0].min()) == decode_rows
    assert blocks[:, 1].max() == cpu_kernel.PROMPT_BLOCK and 0 not in blocks[:, 2].tolist()
    kernel.check_slots(blocks[:, 2].contiguous(), rank, plan)
    y = y0.clone()
    end = int((blocks[:, 0] + blocks[:, 1]).max())
    assert kernel.accepts(y, x, plan, end)
    kernel.run_prompt(y, x, blocks, plan, rank)
    want = y0.clone()
    seg = LoraSegments.from_token_slots(prompt)
    for (a, bt, sc), lo, o in zip(stacks, (0, outs[0]), outs):
        part = want[decode_rows:, lo:lo + o].clone()
        want[decode_rows:, lo:lo + o] = torch_ref.apply_lora(
            part, x[decode_rows:], a.float()[:, :rank], bt.float().transpose(1, 2)[:, :, :rank], sc, seg)
    assert torch.equal(y[:decode_rows], y0[:decode_rows])
    assert torch.allclose(y, want, rtol=1e-5, atol=1e-4)
    last = decode_rows + cpu_kernel.PROMPT_BLOCK + 4  # the last of the first run, in its second block
    second_span = x.shape[0] - long_run + cpu_kernel.PROMPT_SPAN  # the long run's first row past its first span
    # first of a run, mid-tile, second block, a middle one, first and last of the long run's second span
    for row in (decode_rows + 0, decode_rows + 6, last, last + 6, second_span, x.shape[0] - 1):
        alone = y0[row:row + 1].clone()
        one = kernel.prompt_blocks(LoraSegments.from_token_slots([prompt[row - decode_rows]]), 0)
        assert kernel.accepts(alone, x[row:row + 1], plan, 1)
        kernel.run_prompt(alone, x[row:row + 1], one, plan, rank)
        assert torch.equal(alone, y[row:row + 1])
    assert not kernel.accepts(y[:5], x, plan, end)  # fewer rows than the blocks reach


@needs_cc
def test_refuses_layouts_it_cannot_read(kernel):
    a = torch.zeros(12, 8, dtype=torch.bfloat16)  # 3 slots of rank 4, as rows
    bt = torch.zeros(12, 6, dtype=torch.bfloat16)
    pages = torch.arange(12, dtype=torch.int32).view(3, 4)
    x, y, s = torch.zeros(2, 8), torch.zeros(2, 6), torch.zeros(3)
    plan = cpu_kernel.KernelPlan([(a, bt, s, 0)], pages)
    assert kernel.accepts(y, x, plan)
    with pytest.raises(ValueError, match="bf16"):
        cpu_kernel.KernelPlan([(a.float(), bt, s, 0)], pages)  # fp32 rows: the torch path's job
    with pytest.raises(ValueError, match="disagree"):
        cpu_kernel.KernelPlan([(a, bt[:6].contiguous(), s, 0)], pages)  # row counts differ
    with pytest.raises(ValueError, match="disagree"):
        cpu_kernel.KernelPlan([(a, bt, torch.zeros(4), 0)], pages)  # scales for another slot count
    with pytest.raises(ValueError, match="page table"):
        cpu_kernel.KernelPlan([(a, bt, s, 0)], pages.long())
    assert not kernel.accepts(y, x.t().contiguous().t(), plan)  # column-major x
    assert not kernel.accepts(y, torch.zeros(2, 9), plan)  # width mismatch
    assert not kernel.accepts(y.double(), x, plan)
    assert not kernel.accepts(torch.zeros(2, 7), x, plan, 2)  # y wider than the plan
    with pytest.raises(ValueError, match="rank 5 outside"):
        kernel.check_slots(torch.tensor([1, 2]), 5, plan)  # rank over the stack's R
    with pytest.raises(ValueError, match="slot out of range"):
        kernel.check_slots(torch.tensor([1, 3]), 2, plan)  # slot out of range
    with pytest.raises(ValueError, match="slot out of range"):
        kernel.check_slots(torch.tensor([1, -1]), 2, plan)  # negative slot
    with pytest.raises(ValueError, match="contiguous 1-D int64"):
        kernel.check_slots(torch.tensor([1, 2], dtype=torch.int32), 2, plan)  # not int64
    assert not kernel.accepts(y, x, plan, 3)  # more tokens than rows


@needs_cc
def test_plans_read_the_pools_projection_layout(kernel):
    """A target's rows inside its projection's tensor (rows of one target contiguous, targets apart) are a
    valid plan part; rows that are not row-major are not."""
    from server.lora.stacks import ProjectionStacks

    st = ProjectionStacks.zeros(("q", "k"), (12, 4), 8, 3, 4, torch.bfloat16, "cpu")
    plan = cpu_kernel.KernelPlan([(st.a_of(g), st.bt_of(g), st.scale[g], off) for g, off in ((0, 0), (1, 12))],
                                 st.pages)
    assert plan.width == 16 and plan.count == 2
    with pytest.raises(ValueError, match="bf16"):
        cpu_kernel.KernelPlan([(st.a_of(0).t(), st.bt_of(0), st.scale[0], 0)], st.pages)


def test_quantized_rows_are_within_half_a_step_of_the_rows():
    from server.lora.stacks import quantize_rows

    torch.manual_seed(5)
    rows = torch.randn(7, 300) * torch.logspace(-4, 2, 7)[:, None]
    rows[3] = 0.0
    q, scale = quantize_rows(rows)
    assert q.dtype == torch.int8 and scale.shape == (7,) and scale[3] == 0 and not q[3].any()
    assert int(q.abs().max()) == 127
    assert ((q.float() * scale[:, None] - rows).abs() <= scale[:, None] / 2 + 1e-12).all()


@needs_cc
@pytest.mark.parametrize("rank", [16, 5])
def test_int8_rows_match_the_reference_on_their_dequantized_weights(kernel, rank):
    """int8 rank rows with a scale each: decode and prompt rows get what the torch reference gives on the
    dequantized weights (rows x their scales), for a fused projection of two targets."""
    from server.lora.stacks import quantize_rows

    torch.manual_seed(6)
    n, R, k, outs = 6, 16, 72, (40, 21)
    parts, scales, deq = [], [], []
    for off, o in zip((0, outs[0]), outs):
        (qa, sa), (qb, sb) = quantize_rows(torch.randn(n * R, k)), quantize_rows(torch.randn(n * R, o) * 0.1)
        sc = torch.rand(n)
        parts.append((qa, qb, sc, off))
        scales.append((sa, sb))
        deq.append(((qa.float() * sa[:, None]).view(n, R, k), (qb.float() * sb[:, None]).view(n, R, o), sc))
    plan = cpu_kernel.KernelPlan(parts, torch.arange(n * R, dtype=torch.int32).view(n, R), scales)
    assert plan.dtype == torch.int8
    slots = [3, 0, 5, 1, 1, 1, 1, 1, 2, 4, 4]  # 3 decode rows, then prompt rows by slot
    decode = 3
    x = torch.randn(len(slots), k)
    y0 = torch.randn(len(slots), sum(outs))
    y = y0.clone()
    dslots = torch.tensor(slots[:decode], dtype=torch.int64)
    blocks = kernel.prompt_blocks(LoraSegments.from_token_slots(slots), decode)
    kernel.check_slots(dslots, rank, plan)
    assert kernel.accepts(y, x, plan, len(slots))
    kernel.run(y, x, dslots, plan, rank)
    kernel.run_prompt(y, x, blocks, plan, rank)
    want = y0.clone()
    seg = LoraSegments.from_token_slots(slots)
    for (a, bt, sc), lo, o in zip(deq, (0, outs[0]), outs):
        want[:, lo:lo + o] = torch_ref.apply_lora(want[:, lo:lo + o].clone(), x, a[:, :rank],
                                                  bt.transpose(1, 2)[:, :, :rank], sc, seg)
    assert torch.allclose(y, want, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="row scales"):
        cpu_kernel.KernelPlan(parts, plan.pages)



@needs_cc
@pytest.mark.parametrize("k,outs", [(576, (576, 192)), (72, (40, 21))])
def test_int8_decode_tokens_get_the_same_bits_whoever_shares_their_adapter(kernel, k, outs):
    """Decode tokens on one adapter go through together (its int8 rows converted once for up to four of them);
    a token's output is the same bits alone as beside 1-11 others on its adapter and others, in any order, and
    matches the reference."""
    from server.lora.stacks import quantize_rows

    torch.manual_seed(7)
    n, R, rank = 4, 16, 16
    parts, scales, deq = [], [], []
    for off, o in zip((0, outs[0]), outs):
        (qa, sa), (qb, sb) = quantize_rows(torch.randn(n * R, k)), quantize_rows(torch.randn(n * R, o) * 0.1)
        sc = torch.rand(n) + 0.5
        parts.append((qa, qb, sc, off))
        scales.append((sa, sb))
        deq.append(((qa.float() * sa[:, None]).view(n, R, k), (qb.float() * sb[:, None]).view(n, R, o), sc))
    plan = cpu_kernel.KernelPlan(parts, torch.arange(n * R, dtype=torch.int32).view(n, R), scales)
    tokens = 12
    x, y0 = torch.randn(tokens, k), torch.randn(tokens, sum(outs))

    def decode(rows: list[int], slots: list[int]) -> torch.Tensor:
        y = y0[rows].clone()
        ts = torch.tensor(slots, dtype=torch.int64)
        kernel.check_slots(ts, rank, plan)
        kernel.run(y, x[rows].contiguous(), ts, plan, rank)
        return y

    batches = [[1] * 12, [1, 2, 1, 3, 1, 1, 0, 1, 2, 1, 3, 1], [3, 3, 3, 3, 3, 2, 2, 1, 0, 3, 3, 3], [2] * 5 + [1] * 7]
    for slots in batches:
        together = decode(list(range(tokens)), slots)
        for t, s in enumerate(slots):
            assert torch.equal(together[t], decode([t], [s])[0]), (slots, t)
        seg = LoraSegments.from_token_slots(slots)
        want = y0.clone()
        for (a, bt, sc), lo, o in zip(deq, (0, outs[0]), outs):
            want[:, lo:lo + o] = torch_ref.apply_lora(want[:, lo:lo + o].clone(), x, a[:, :rank],
                                                      bt.transpose(1, 2)[:, :, :rank], sc, seg)
        assert torch.allclose(together, want, rtol=1e-5, atol=1e-4)

@needs_cc
def test_prompt_paths_follow_the_cpu(kernel):
    """The bf16 pair paths are there exactly where the CPU multiplies bf16 pairs (a build that missed them would
    quietly serve prompts at half the speed), and the best of them serves."""
    from server.core.native import cpu_flag_set

    flags = cpu_flag_set()
    if not flags:
        pytest.skip("no /proc/cpuinfo flags to compare with")
    paths = kernel.prompt_paths
    assert paths[0] == "vector FMA"
    assert ("AVX-512 bf16 dot products" in paths) == ({"avx512_bf16", "avx512f"} <= flags)
    if "AMX bf16 tiles" in paths:
        assert {"amx_bf16", "amx_tile"} <= flags
    assert kernel.prompt_path == paths[-1]


@needs_cc
@pytest.mark.parametrize("rank", [16, 5, 20])
@pytest.mark.parametrize("rows", ["bf16", "int8"])
@pytest.mark.parametrize("runs", ["long", "many"])
@pytest.mark.parametrize("path", cpu_kernel.PROMPT_PATHS[1:])
def test_prompt_rows_as_bf16_pairs_get_the_reference_to_bf16_activations(kernel, rank, rows, runs, path):
    """On a CPU that multiplies bf16 pairs (AMX tiles, or AVX-512 BF16's dot products), prompt rows of shapes they
    take (in a multiple of 32, outputs of 16) go through them: each row's delta within 1% of the reference's (x and
    the rank values rounded to bf16, the weights exact), a row's numbers the same alone as in any block or span of
    blocks, and no row outside the blocks touched, also where a block ends inside a tile of 16 rows."""
    if path not in kernel.prompt_paths:
        pytest.skip(f"this CPU has no {path} (or Linux refused them): {kernel.prompt_path} serves, tested above")
    best = kernel.prompt_path
    assert best == kernel.prompt_paths[-1], "the best path this CPU has serves"
    kernel.use_prompt_path(path)
    try:
        _check_bf16_pair_prompt_rows(kernel, rank, rows, runs)
    finally:
        kernel.use_prompt_path(best)
    assert kernel.prompt_path == best


def _check_bf16_pair_prompt_rows(kernel, rank, rows, runs):
    from server.lora.stacks import quantize_rows

    torch.manual_seed(7)
    n, R, k, outs = 6, 32, 96, (48, 16, 32)
    offs = (0, 48, 64)
    parts, scales, deq = [], [], []
    for off, o in zip(offs, outs):
        a, bt, sc = torch.randn(n * R, k), torch.randn(n * R, o) * 0.1, torch.rand(n)
        if rows == "int8":
            (qa, sa), (qb, sb) = quantize_rows(a), quantize_rows(bt)
            parts.append((qa, qb, sc, off))
            scales.append((sa, sb))
            a, bt = qa.float() * sa[:, None], qb.float() * sb[:, None]
        else:
            a, bt = a.bfloat16(), bt.bfloat16()
            parts.append((a, bt, sc, off))
        deq.append((a.float().view(n, R, k), bt.float().view(n, R, o), sc))
    plan = cpu_kernel.KernelPlan(parts, torch.arange(n * R, dtype=torch.int32).view(n, R), scales or None)
    decode_rows = 2
    # runs: a block and a 5-row tail (a partial second tile), one row, 20 rows (a full tile and 4), exactly 16,
    # and one longer than a span of blocks (the kernel lays a slot's rows out once a span: a full span, then a tail)
    prompt = ([1] * (cpu_kernel.PROMPT_BLOCK + 5) + [0] * 3 + [4] + [2] * 20 + [5] * 16 + [3] * 7
              + [2] * (cpu_kernel.PROMPT_SPAN + cpu_kernel.PROMPT_BLOCK + 9))
    if runs == "many":  # more blocks than the kernel plans for on its stack: 90 runs of one row, then one of 20
        prompt = [1 + i % 5 for i in range(90)] + [3] * 20
    x = torch.randn(decode_rows + len(prompt), k)
    y0 = torch.randn(decode_rows + len(prompt), sum(outs))
    blocks = kernel.prompt_blocks(LoraSegments.from_token_slots([4, 1] + prompt), decode_rows)
    kernel.check_slots(blocks[:, 2].contiguous(), rank, plan)
    assert kernel.accepts(y0, x, plan, x.shape[0])
    y = y0.clone()
    kernel.run_prompt(y, x, blocks, plan, rank)
    want = y0.clone()
    seg = LoraSegments.from_token_slots(prompt)
    for (a, bt, sc), lo, o in zip(deq, offs, outs):
        want[decode_rows:, lo:lo + o] = torch_ref.apply_lora(
            want[decode_rows:, lo:lo + o].clone(), x[decode_rows:], a[:, :rank], bt.transpose(1, 2)[:, :, :rank], sc, seg)
    got_delta, want_delta = (y - y0)[decode_rows:], (want - y0)[decode_rows:]
    adapted = torch.tensor([s != 0 for s in prompt])
    err = (got_delta - want_delta).norm(dim=1) / want_delta.norm(dim=1).clamp(min=1e-12)
    assert (err[adapted] < 1e-2).all(), err
    assert (err[adapted] > 0).any(), "the rows went through the tiles (bf16 activations), not the fp32 vector path"
    assert torch.equal(y[:decode_rows], y0[:decode_rows]) and torch.equal(y[decode_rows:][~adapted], y0[decode_rows:][~adapted])
    for row in range(decode_rows, x.shape[0]):
        alone = y0[row:row + 1].clone()
        kernel.run_prompt(alone, x[row:row + 1], kernel.prompt_blocks(LoraSegments.from_token_slots([prompt[row - decode_rows]]), 0),
                          plan, rank)
        assert torch.equal(alone, y[row:row + 1]), row
    kernel.use_prompt_path("vector FMA")  # fp32 activations, the reference's numbers to fp32 rounding
    assert not kernel.prompt_bf16
    vec = y0.clone()
    kernel.run_prompt(vec, x, blocks, plan, rank)
    assert torch.allclose(vec, want, rtol=1e-5, atol=1e-4)
