"""Triton SGMV/BGMV kernels, and the Triton backend that runs them, against the torch reference.

On CPU the kernels run under Triton's interpreter on small shapes. The
interpreter must be chosen before triton is first imported (its own library
functions are decorated then, and it keeps reading the variable lazily), so the
interpreter tests run in a child pytest over this file with TRITON_INTERPRET=1
and no CUDA; this process only starts it (`test_kernels_under_interpreter`).
Tests marked gpu run the compiled kernels at model sizes and skip without CUDA.
Run the interpreter tests directly with:
    TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES= python -m pytest tests/lora/test_triton_sgmv.py -m "not gpu"
"""
from __future__ import annotations

import os
import random

import pytest
import torch

pytest.importorskip("triton")

from server.lora import torch_ref  # noqa: E402
from server.lora.segments import LoraSegments  # noqa: E402
from tests.helpers import interpreter_child_cases, run_under_triton_interpreter  # noqa: E402

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Relative error bound against the largest reference value, per dtype.
_TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}

# Deselected (not skipped) outside the interpreter by tests/lora/conftest.py: the parent runs them
# all in one TRITON_INTERPRET=1 child (test_kernels_under_interpreter) and asserts it passed.
interp = pytest.mark.interpreter_child


@pytest.mark.slow
@pytest.mark.skipif(_INTERPRET, reason="this is the child")
def test_kernels_under_interpreter():
    run_under_triton_interpreter(__file__, interpreter_child_cases(globals()))


@pytest.fixture(scope="module")
def K():
    from server.lora import triton_sgmv

    assert triton_sgmv._INTERPRETED, "kernels were not decorated for the interpreter"
    return triton_sgmv


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-6))


def _case(seed: int, slots: list[int], lens: list[int], in_f: int, out_f: int, rank: int,
          n_slots: int, dtype: torch.dtype, device: str = "cpu"):
    """Random slot tensors (slot 0 zero, like the pool's), segments, x and y."""
    g = torch.Generator().manual_seed(seed)
    seg = LoraSegments.from_sequences(slots, lens, device)
    T = seg.num_tokens
    x = torch.randn(T, in_f, generator=g).to(dtype)
    a = (torch.randn(n_slots, rank, in_f, generator=g) / in_f ** 0.5).to(dtype)
    b = torch.randn(n_slots, out_f, rank, generator=g).to(dtype)
    scale = torch.rand(n_slots, generator=g) + 0.5
    a[0], b[0], scale[0] = 0, 0, 0
    y = torch.randn(T, out_f, generator=g).to(dtype)
    return seg, *(t.to(device) for t in (x, a, b, scale, y))


# (slots per sequence, tokens per sequence, in, out, rank): empty segments, slot 0 in
# the middle, one slot in several segments, ranks that are not powers of two, K and
# N that are not multiples of any block.
CASES = [
    ([1, 2, 3], [1, 1, 1], 64, 48, 8),                  # decode, distinct adapters
    ([1, 0, 2, 3, 1], [5, 3, 0, 20, 1], 48, 40, 16),    # prefill, slot 0, empty segment
    ([0, 0], [4, 2], 32, 32, 8),                         # base only: nothing to do
    ([2, 2, 2, 0, 1], [1, 1, 1, 1, 1], 100, 72, 24),   # decode, uniform mix, rank 24
    ([3], [37], 80, 33, 64),                            # one long segment, spans M tiles
    ([1, 2], [17, 0], 130, 20, 128),                    # rank 128, K not a block multiple
]


# Every case in fp32 and bf16 (the engine's dtypes); fp16 takes the same code with another element type, so
# two of its cases (the decode and the prefill shapes) cover it at a third of the interpreter's time.
DTYPE_CASES = [(c, d) for c in range(len(CASES)) for d in (torch.float32, torch.bfloat16)] + \
    [(0, torch.float16), (1, torch.float16)]


@interp
@pytest.mark.parametrize("case,dtype", DTYPE_CASES, ids=lambda v: str(v))
def test_apply_lora_matches_reference(K, case, dtype):
    slots, lens, in_f, out_f, rank = CASES[case]
    seg, x, a, b, scale, y = _case(case, slots, lens, in_f, out_f, rank, 4, dtype)
    want_v = torch_ref.shrink(x, a, seg)
    want_y = torch_ref.apply_lora(y.clone(), x, a, b, scale, seg)
    for mode in ("sgmv", "bgmv", "auto"):
        v = K.shrink(x, a, seg, mode=mode)
        assert v.shape == want_v.shape and v.dtype == dtype
        if seg.has_lora:
            assert _rel_err(v, want_v) <= _TOL[dtype], mode
        else:
            assert not v.any()
        # expand from the reference's v isolates the expand kernel's error.
        got_e = K.expand(y.clone(), want_v, b, scale, seg, mode=mode)
        want_e = torch_ref.expand(y.clone(), want_v, b, scale, seg)
        assert _rel_err(got_e, want_e) <= _TOL[dtype], mode
        got = K.apply_lora(y.clone(), x, a, b, scale, seg, mode=mode)
        assert _rel_err(got, want_y) <= _TOL[dtype], mode
    # Slot-0 rows: v is exactly zero and y is untouched, bit for bit.
    base_rows = seg.token_slots == 0
    got = K.apply_lora(y.clone(), x, a, b, scale, seg)
    assert torch.equal(got[base_rows], y[base_rows])
    assert not K.shrink(x, a, seg)[base_rows].any()


@interp
@pytest.mark.parametrize("mode", ["sgmv", "bgmv"])
@pytest.mark.parametrize("split_k", [1, 2, 3, 8])
def test_split_k_is_exact_and_deterministic(K, mode, split_k):
    seg, x, a, b, scale, y = _case(7, [1, 2, 0, 3], [3, 9, 2, 1], 200, 16, 16, 4, torch.float32)
    v1 = K.shrink(x, a, seg, mode=mode, split_k=split_k)
    v2 = K.shrink(x, a, seg, mode=mode, split_k=split_k)
    assert torch.equal(v1, v2)
    assert _rel_err(v1, torch_ref.shrink(x, a, seg)) <= 1e-5


@interp
def test_random_segments_fuzz(K):
    """Random batches: sequence count, lengths (0 included), slots, ranks, sizes."""
    rng = random.Random(1234)
    for i in range(12):
        n_seq = rng.randint(1, 6)
        n_slots = rng.randint(2, 6)
        slots = [rng.randrange(n_slots) for _ in range(n_seq)]
        lens = [rng.choice([0, 1, 1, 2, 5, 19]) for _ in range(n_seq)]
        if sum(lens) == 0:
            lens[0] = 1
        rank = rng.choice([8, 16, 32, 12])
        dtype = rng.choice([torch.float32, torch.float16, torch.bfloat16])
        seg, x, a, b, scale, y = _case(i, slots, lens, rng.randint(9, 90), rng.randint(5, 70),
                                       rank, n_slots, dtype)
        want = torch_ref.apply_lora(y.clone(), x, a, b, scale, seg)
        got = K.apply_lora(y.clone(), x, a, b, scale, seg)
        if seg.has_lora:
            assert _rel_err(got, want) <= _TOL[dtype], (i, slots, lens, rank, dtype)
        else:
            assert torch.equal(got, y)


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_non_contiguous_inputs(K, dtype):
    """x a column slice, x transposed in memory, y a slice, a/b narrowed from wider pool tensors."""
    seg, x, a, b, scale, y = _case(3, [1, 0, 2], [6, 2, 3], 40, 24, 16, 3, dtype)
    T = seg.num_tokens
    x_wide = torch.randn(T, 80).to(dtype)
    x_wide[:, 10:50] = x
    x_slice = x_wide[:, 10:50]
    x_t = x.t().contiguous().t()  # column-major
    a_wide = torch.zeros(3, 32, 40, dtype=dtype)
    a_wide[:, :16] = a
    b_wide = torch.zeros(3, 24, 32, dtype=dtype)
    b_wide[:, :, :16] = b
    a_view, b_view = a_wide[:, :16], b_wide[:, :, :16]
    b_pool = torch.zeros(3, 32, 24, dtype=dtype).transpose(1, 2)  # the pool's layout: B^T stored slot-major
    b_pool[:, :, :16] = b
    y_wide = torch.randn(T, 50).to(dtype)
    y_wide[:, 5:29] = y
    assert not (x_slice.is_contiguous() or x_t.is_contiguous() or a_view.is_contiguous()
                or b_view.is_contiguous())
    want = torch_ref.apply_lora(y.clone(), x, a, b, scale, seg)
    for xs, bv in ((x_slice, b_view), (x_t, b_view), (x_slice, b_pool[:, :, :16])):
        for mode in ("sgmv", "bgmv"):
            yw = y_wide.clone()
            out = K.apply_lora(yw[:, 5:29], xs, a_view, bv, scale, seg, mode=mode)
            assert out.data_ptr() == yw[:, 5:29].data_ptr()
            assert _rel_err(yw[:, 5:29], want) <= _TOL[dtype]
            # Columns outside the view are never written.
            assert torch.equal(yw[:, :5], y_wide[:, :5]) and torch.equal(yw[:, 29:], y_wide[:, 29:])


@interp
@pytest.mark.parametrize("mode", ["sgmv", "bgmv"])
@pytest.mark.parametrize("rank", [16, 5])
def test_fused_qkv_and_gate_up(K, mode, rank):
    """One shrink and one expand over a projection as the pool lays it out (its targets in one tensor),
    per-target scales, the step's rank below the stacks' R: each target's columns get its own reference."""
    from server.lora.stacks import ProjectionStacks

    seg, x, _, _, _, _ = _case(5, [1, 0, 3, 2], [4, 2, 1, 6], 64, 8, 8, 4, torch.float32)
    g = torch.Generator().manual_seed(11)
    T, R, N = seg.num_tokens, 16, 4
    for targets, outs in ((("q", "k", "v"), (64, 16, 16)), (("gate", "up"), (96, 96))):  # GQA widths; gate/up
        st = ProjectionStacks.zeros(targets, outs, 64, N, R, torch.float32, "cpu")
        for slot in range(1, N):  # slot 0 stays the bare base
            for i, o in enumerate(outs):
                st.write(slot, i, torch.randn(rank, 64, generator=g) / 8, torch.randn(o, rank, generator=g),
                         float(torch.rand(1, generator=g)) + 0.5)
        fused = K.FusedLora.of(st)
        assert fused.out_offsets.tolist() == list(st.offsets)
        y = torch.randn(T, sum(outs), generator=g)
        got = K.apply_lora_fused(y.clone(), x, fused, seg, rank=rank, mode=mode)
        for i, lo in enumerate(st.offsets[:-1]):
            hi = st.offsets[i + 1]
            want = torch_ref.apply_lora(y[:, lo:hi].clone(), x, st.slot_a(i)[:, :rank],
                                        st.slot_bt(i).transpose(1, 2)[:, :, :rank], st.scale[i], seg)
            assert _rel_err(got[:, lo:hi], want) <= 1e-5, (targets[i], mode)
        assert torch.equal(got[seg.token_slots == 0], y[seg.token_slots == 0])


@interp
@pytest.mark.parametrize("scattered", [False, True], ids=["adjacent-rows", "scattered-rows"])
def test_the_backend_adds_each_rows_adapter_on_every_projection(K, scattered):
    """The Triton backend over a real pool (on CPU, under the interpreter): decode and prompt rows, the
    base among them, three adapters of ranks 3-16 and target subsets, their rank rows adjacent or apart;
    each row gets exactly its own delta."""
    from server.lora.triton_backend import TritonBackend
    from server.model.config import PROJECTIONS
    from tests.lora.backend_utils import TINY, check_step, pool_with, random_adapter, scattered_pool_with

    adapters = [random_adapter(TINY, 8, ("q", "k", "v", "o", "gate", "up", "down"), 1),
                random_adapter(TINY, 3, ("q", "v"), 2), random_adapter(TINY, 16, ("gate", "up", "down"), 3)]
    pool, slots = (scattered_pool_with if scattered else pool_with)(adapters)
    by_slot = dict(zip(slots, adapters))
    backend = TritonBackend(pool)
    torch.manual_seed(0)
    for rows, num_decode in (([1, 2, 3], 3), ([0, 1, 3, 1, 1, 1, 0, 2, 2], 3)):  # BGMV, then SGMV
        rows = [slots[r - 1] if r else 0 for r in rows]
        step = backend.prepare(rows, num_decode)
        for targets in PROJECTIONS:
            check_step(step, rows, by_slot, 1, TINY.projection(targets), where=(rows, targets, step.mode))
        q_alone = (("q", TINY.target_shape("q")[0]),)  # not a projection of the model: per-target kernels
        check_step(step, rows, by_slot, 0, q_alone)
    pool.shutdown()


@interp
def test_bad_shapes_and_dtypes_are_refused(K):
    seg, x, a, b, scale, y = _case(0, [1], [3], 16, 8, 8, 2, torch.float32)
    with pytest.raises(ValueError, match="in_features"):
        K.shrink(x[:, :8], a, seg)
    with pytest.raises(ValueError, match="tokens"):
        K.shrink(x[:2], a, seg)
    with pytest.raises(ValueError, match="shapes disagree"):
        K.expand(y[:, :4], torch.zeros(3, 8), b, scale, seg)
    with pytest.raises(TypeError, match="float32"):
        K.shrink(x.double(), a, seg)
    with pytest.raises(ValueError, match="mode"):
        K.shrink(x, a, seg, mode="nope")
    from server.lora.stacks import ProjectionStacks

    fused = K.FusedLora.of(ProjectionStacks.zeros(("q", "k"), (8, 8), 16, 2, 8, torch.float32, "cpu"))
    with pytest.raises(ValueError, match="rank"):
        K.apply_lora_fused(torch.zeros(3, 16), x, fused, seg, rank=9)  # over the stacks' R
    with pytest.raises(ValueError, match="does not match"):
        K.apply_lora_fused(torch.zeros(3, 12), x, fused, seg)


def test_pick_mode():
    from server.lora.triton_sgmv import pick_mode  # importing compiles nothing: safe in-process

    assert pick_mode(LoraSegments.from_sequences([1, 2, 3, 0], [1, 1, 1, 1])) == "bgmv"
    assert pick_mode(LoraSegments.from_sequences([1, 2], [30, 2])) == "sgmv"
    assert pick_mode(LoraSegments.from_sequences([1, 1, 1], [1, 1, 1])) == "sgmv"  # merges into one segment


# ----------------------------------------------------------------------------- GPU, model sizes

_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


# bf16 and fp32 at ranks 8-64, bf16 (the serving dtype) at 128 too; fp16 is the same code with another element
# type, once: each case compiles its own kernels, and the GPU suite's test step has a time budget.
_GPU_SIZE_CASES = ([(torch.bfloat16, r) for r in (8, 16, 64, 128)] + [(torch.float32, r) for r in (8, 16, 64)]
                   + [(torch.float16, 16)])


@pytest.mark.gpu
@_cuda
@pytest.mark.parametrize("dtype,rank", _GPU_SIZE_CASES, ids=lambda v: str(v))
def test_gpu_model_sizes(dtype, rank):
    from server.lora import triton_sgmv as K

    assert not K._INTERPRETED
    rng = random.Random(rank)
    for in_f, out_f in ((2048, 2048), (2048, 512), (2048, 8192), (8192, 2048), (4096, 14336)):
        for lens in ([1] * 64, [rng.randint(0, 300) for _ in range(8)], [512]):
            slots = [rng.randrange(9) for _ in lens]
            seg, x, a, b, scale, y = _case(rank, slots, lens, in_f, out_f, rank, 9, dtype, "cuda")
            want = torch_ref.apply_lora(y.float().clone(), x.float(), a.float(), b.float(), scale, seg)
            for mode in ("sgmv", "bgmv"):
                got = K.apply_lora(y.clone(), x, a, b, scale, seg, mode=mode)
                assert _rel_err(got, want) <= max(_TOL[dtype], 1e-4), (in_f, out_f, lens[:3], mode)


@pytest.mark.gpu
@_cuda
def test_gpu_engine_backend_is_triton_and_matches_the_torch_backend():
    """On CUDA auto picks triton; its fused projections add what the torch backend adds on the same stacks."""
    from server.core.engine_config import EngineConfig
    from server.core.identity import AdapterVersion
    from server.lora.backend import StepRows
    from server.lora.factory import build_lora_backend
    from server.lora.torch_backend import TorchBackend
    from server.lora.weights import LoraModule, LoraWeights
    from server.model.config import PROJECTIONS, TARGETS, ModelConfig

    cfg = ModelConfig(vocab_size=300, hidden_size=2048, intermediate_size=8192, num_layers=1, num_heads=32,
                      num_kv_heads=8, head_dim=64, max_position_embeddings=512)
    backend = build_lora_backend(EngineConfig(max_adapters_on_device=3, max_rank=16), cfg, torch.device("cuda"),
                                 torch.bfloat16)
    assert backend.name == "triton"
    pool, reference = backend.pool, TorchBackend(backend.pool)
    g = torch.Generator().manual_seed(0)
    for slot in (1, 2, 3):
        mods = {(0, t): LoraModule(torch.randn(16, cfg.target_shape(t)[1], generator=g) / 45,
                                   torch.randn(cfg.target_shape(t)[0], 16, generator=g), 0.5) for t in TARGETS}
        assert pool.load(AdapterVersion("default", f"a{slot}", 1, f"a{slot}",
                                        lambda m=mods: LoraWeights(modules=m))) == slot
    for rows, num_decode in (([1, 2, 3, 0], 4), ([1] * 40 + [0] * 7 + [3] * 200, 0)):  # BGMV; SGMV
        seg = LoraSegments.from_token_slots(rows, "cuda")
        step, want_step = (b.prepare_rows(StepRows(rows, num_decode, seg, 16)) for b in (backend, reference))
        for targets in PROJECTIONS:
            projection = cfg.projection(targets)
            x = torch.randn(len(rows), cfg.target_shape(targets[0])[1], device="cuda", dtype=torch.bfloat16)
            y = torch.randn(len(rows), sum(w for _, w in projection), device="cuda", dtype=torch.bfloat16)
            got = step.apply(y.clone(), x, 0, projection)
            want = want_step.apply(y.clone(), x, 0, projection)
            assert _rel_err(got.float() - y.float(), want.float() - y.float()) <= 3e-2, targets
    pool.shutdown()
