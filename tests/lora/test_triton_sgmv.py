"""Triton SGMV/BGMV kernels against the torch reference.

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
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from server.lora import torch_ref  # noqa: E402
from server.lora.segments import LoraSegments  # noqa: E402

_ROOT = Path(__file__).resolve().parents[2]
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Relative error bound against the largest reference value, per dtype.
_TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}

# Deselected (not skipped) outside the interpreter by tests/lora/conftest.py: the parent runs them
# all in one TRITON_INTERPRET=1 child (test_kernels_under_interpreter) and asserts it passed.
interp = pytest.mark.interpreter_child


@pytest.mark.slow
@pytest.mark.skipif(_INTERPRET, reason="this is the child")
def test_kernels_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_ROOT), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not gpu",
         str(Path(__file__).resolve())],
        cwd=_ROOT, env=env, capture_output=True, text=True, timeout=300)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, tail
    assert " failed" not in proc.stdout, tail
    passed = re.search(r"(\d+) passed", proc.stdout)
    n_child = sum(1 for _ in _child_cases())
    assert passed is not None and int(passed.group(1)) >= n_child, tail


def _child_cases():
    """The parametrized interpreter cases this file defines (what the child must have run)."""
    import inspect

    for name, fn in list(globals().items()):
        if name.startswith("test_") and any(m.name == "interpreter_child" for m in getattr(fn, "pytestmark", [])):
            marks = [m for m in fn.pytestmark if m.name == "parametrize"]
            n = 1
            for m in marks:
                n *= len(m.args[1])
            for _ in range(n):
                yield inspect.getsourcefile(fn)


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


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", range(len(CASES)))
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
def test_fused_qkv_and_gate_up(K, mode):
    """One shrink over concatenated A, one expand into the fused output, per-target scales."""
    seg, x, _, _, _, _ = _case(5, [1, 0, 3, 2], [4, 2, 1, 6], 64, 8, 8, 4, torch.float32)
    g = torch.Generator().manual_seed(11)
    T, R, N = seg.num_tokens, 16, 4
    for outs in ((64, 16, 16), (96, 96)):  # q/k/v with GQA widths; gate/up
        a_l = [torch.randn(N, R, 64, generator=g) / 8 for _ in outs]
        b_l = [torch.randn(N, o, R, generator=g) for o in outs]
        s_l = [torch.rand(N, generator=g) + 0.5 for _ in outs]
        for t in (*a_l, *b_l):
            t[0] = 0
        for s in s_l:
            s[0] = 0
        fused = K.concat_targets(a_l, b_l, s_l)
        assert fused.rank == R and fused.out_offsets.tolist()[-1] == sum(outs)
        y = torch.randn(T, sum(outs), generator=g)
        want = K.apply_lora_fused_reference(y.clone(), x, fused, seg)
        # The reference of the fused layout equals the per-target reference.
        lo = 0
        for a_t, b_t, s_t, o in zip(a_l, b_l, s_l, outs):
            per = torch_ref.apply_lora(y[:, lo:lo + o].clone(), x, a_t, b_t, s_t, seg)
            assert torch.allclose(want[:, lo:lo + o], per, atol=1e-5)
            lo += o
        got = K.apply_lora_fused(y.clone(), x, fused, seg, mode=mode)
        assert _rel_err(got, want) <= 1e-5


@interp
def test_grouped_mm_variant_matches_reference(K):
    if not K.grouped_mm_available(torch.device("cpu"), torch.float32):
        pytest.skip("torch._grouped_mm not available on this build")
    aligned = 0
    for i, (slots, lens, in_f, out_f, rank) in enumerate(CASES):
        seg, x, a, b, scale, y = _case(i, slots, lens, in_f, out_f, rank, 4, torch.float32)
        if any(n % 4 for n in (in_f, out_f, rank)):  # fp32 rows must be 16-byte multiples
            with pytest.raises(ValueError, match="16-byte"):
                K.apply_lora_grouped_mm(y.clone(), x, a, b, scale, seg)
            continue
        aligned += 1
        want = torch_ref.apply_lora(y.clone(), x, a, b, scale, seg)
        got = K.apply_lora_grouped_mm(y.clone(), x, a, b, scale, seg)
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), i
    assert aligned >= 3


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
    with pytest.raises(ValueError, match="same padded rank"):
        K.concat_targets([a, a[:, :4]], [b, b[:, :, :4]], [scale, scale])


def test_pick_mode():
    from server.lora.triton_sgmv import pick_mode  # importing compiles nothing: safe in-process

    assert pick_mode(LoraSegments.from_sequences([1, 2, 3, 0], [1, 1, 1, 1])) == "bgmv"
    assert pick_mode(LoraSegments.from_sequences([1, 2], [30, 2])) == "sgmv"
    assert pick_mode(LoraSegments.from_sequences([1, 1, 1], [1, 1, 1])) == "sgmv"  # merges into one segment


# ----------------------------------------------------------------------------- GPU, model sizes

_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("rank", [8, 16, 64, 128])
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
def test_gpu_dispatch_uses_triton():
    from server.lora import ops

    assert ops.backend_for(torch.device("cuda")) == "triton"
    seg, x, a, b, scale, y = _case(0, [1, 0, 2], [5, 2, 1], 256, 128, 16, 3, torch.bfloat16, "cuda")
    got = ops.apply_lora(y.clone(), x, a, b, scale, seg)
    want = torch_ref.apply_lora(y.clone(), x, a, b, scale, seg)
    assert _rel_err(got, want) <= _TOL[torch.bfloat16]


@pytest.mark.gpu
@_cuda
def test_gpu_grouped_mm_variant():
    from server.lora import triton_sgmv as K

    if not K.grouped_mm_available(torch.device("cuda"), torch.bfloat16):
        pytest.skip("torch._grouped_mm needs bf16 on sm90+")
    seg, x, a, b, scale, y = _case(0, [1, 0, 2, 3], [64, 8, 1, 200], 2048, 8192, 16, 4, torch.bfloat16, "cuda")
    want = torch_ref.apply_lora(y.clone(), x, a, b, scale, seg)
    got = K.apply_lora_grouped_mm(y.clone(), x, a, b, scale, seg)
    assert _rel_err(got, want) <= _TOL[torch.bfloat16]
