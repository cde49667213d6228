"""Quantized linears: every kernel path against its dequantized reference, error bounds, memory."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from server.model.int8_dynamic import hadamard_reference
from server.model.quant import (
    DenseLinear, lm_head_mode, QuantConfig, QuantLinear, dequantize_int4, dequantize_int8, make_linear, make_lm_head,
    module_nbytes, pack_int4, quantize_int4, quantize_int8, unpack_int4,
)

# (out, in): SmolLM2's shapes at a smaller scale, plus shapes the fused kernels cannot take
# directly (K not a multiple of 8 or of the group, N not a multiple of the int4 tile).
SHAPES = [(192, 576), (64, 96), (37, 100), (5, 33), (1, 64), (48, 130)]
DTYPES = [torch.float32, torch.bfloat16]
PATHS = ["auto", "dynamic", "fused", "fused_bf16", "dequant"]
# Relative error of the kernel against x @ dequantize().T: fp32 paths are exact up to
# summation order; bf16 activations round each input to 8 bits of mantissa; the dynamic
# kernel rounds each (rotated) token to int8 on its own scale (about 0.75% measured).
TOL = {torch.float32: 1e-5, torch.bfloat16: 1.2e-2}
INT8_ACTIVATIONS_TOL = 1.5e-2


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12)).item()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_int8_quantizer_roundtrip_bound():
    w = torch.randn(64, 96)
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127 and s.shape == (64,)
    err = (dequantize_int8(q, s) - w).abs()
    # Round to nearest: never more than half a step of the row's scale.
    assert (err <= s[:, None] / 2 + 1e-7).all()


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_quantizer_roundtrip_bound_and_packing(group):
    w = torch.randn(24, 256)
    q, s, z = quantize_int4(w, group)
    assert q.min() >= 0 and q.max() <= 15 and s.shape == (24, 256 // group)
    deq = dequantize_int4(q, s, z, group)
    step = s.repeat_interleave(group, dim=1)
    assert ((deq - w).abs() <= step / 2 + 1e-6).all()
    assert torch.equal(unpack_int4(pack_int4(q)), q)
    with pytest.raises(ValueError, match="multiple of the int4 group"):
        quantize_int4(torch.randn(4, 100), 64)


def test_int4_reproduces_an_existing_4bit_grid_exactly():
    """Weights already on a 4-bit min/scale grid (as a Q4_1 GGUF is) survive int4 at that group size."""
    g = 32
    scale = torch.rand(16, 4) * 0.01 + 1e-3
    lo = torch.randn(16, 4) * 0.05
    q = torch.randint(0, 16, (16, 4, g))
    q[..., 0], q[..., 1] = 0, 15  # each group spans its full range, as a fresh quantization does
    w = (q * scale[..., None] + lo[..., None]).reshape(16, 4 * g)
    q2, s2, z2 = quantize_int4(w, g)
    assert torch.allclose(dequantize_int4(q2, s2, z2, g), w, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("path", PATHS)
def test_kernel_matches_dequantized_reference(shape, mode, dtype, path):
    n, k = shape
    w, b = torch.randn(n, k) * 0.05, torch.randn(n) * 0.1
    if path == "dynamic" and mode != "int8":
        with pytest.raises(ValueError, match="dynamic int8 kernel runs int8"):
            make_linear(w, b, mode, dtype, torch.device("cpu"), kernel=path)
        return
    mod = make_linear(w, b, mode, dtype, torch.device("cpu"), kernel=path)
    assert isinstance(mod, QuantLinear)
    x = torch.randn(2, 3, k).to(dtype)
    y = mod(x)
    assert y.dtype == dtype and y.shape == (2, 3, n)
    ref = x.float() @ mod.dequantize().t() + mod.bias.float()
    tol = TOL[torch.bfloat16] if mod.kernel_dtype == torch.bfloat16 or dtype == torch.bfloat16 else TOL[dtype]
    if mod.kernel == "dynamic":  # int8 activations, plus the bf16 output's rounding where it has one
        tol = INT8_ACTIVATIONS_TOL + (TOL[torch.bfloat16] if dtype == torch.bfloat16 else 0.0)
    assert _rel(y, ref) < tol, (mod.kernel, _rel(y, ref))
    # Independent reference from the pure quantizer (for the same scale dtype): the module
    # stores exactly what the quantizer produced, whatever the kernel's layout.
    wp = torch.nn.functional.pad(w, (0, mod.padded_in - k))
    if mod.kernel == "dynamic":  # quantized after the rotation, which the reference undoes
        q, s = quantize_int8(hadamard_reference(wp, mod.rotation))
        want = hadamard_reference(dequantize_int8(q, s) / mod.rotation, mod.rotation)[:, :k]
    elif mode == "int8":
        q, s = quantize_int8(wp, mod.kernel_dtype)
        want = dequantize_int8(q, s)[:, :k]
    else:
        q, s, z = quantize_int4(wp, mod.group_size, mod.kernel_dtype)
        want = dequantize_int4(q, s, z, mod.group_size)[:, :k]
    assert torch.allclose(mod.dequantize(), want, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_output_dtype_follows_input_whatever_the_build_dtype(dtype):
    w = torch.randn(64, 128) * 0.05
    for mode in ("none", "int8", "int4"):
        mod = make_linear(w, None, mode, torch.float32, "cpu")
        x = torch.randn(5, 128, dtype=dtype)
        assert mod(x).dtype == dtype


@pytest.mark.parametrize("mode,bound", [("int8", 0.02), ("int4", 0.15)])
def test_error_against_dense_is_bounded(mode, bound):
    w = torch.randn(256, 512) * 0.05
    x = torch.randn(16, 512)
    dense = x @ w.t()
    y = make_linear(w, None, mode, torch.float32, "cpu")(x)
    assert _rel(y, dense) < bound


def test_row_results_do_not_depend_on_batch_size():
    """A sequence must get the same numbers alone and in a batch (greedy outputs compared across both)."""
    w = torch.randn(192, 576) * 0.05
    x = torch.randn(9, 576)
    for mode in ("int8", "int4"):
        mod = make_linear(w, None, mode, torch.float32, "cpu")
        batched = mod(x)
        alone = torch.cat([mod(x[i:i + 1]) for i in range(9)])
        assert _rel(batched, alone) < 1e-6


def test_nbytes_shrink():
    w = torch.randn(1536, 576)
    dense = make_linear(w, None, "none", torch.float32, "cpu")
    i8 = make_linear(w, None, "int8", torch.float32, "cpu")
    i4 = make_linear(w, None, "int4", torch.float32, "cpu")
    assert dense.nbytes == 1536 * 576 * 4
    assert 3.8 < dense.nbytes / i8.nbytes <= 4.0
    # 4 bits + a bf16 scale and zero per group of 32: 0.625 bytes a weight, 6.4x under fp32.
    assert 6.0 < dense.nbytes / i4.nbytes < 8.0
    assert dense.nbytes / make_linear(w, None, "int4", torch.float32, "cpu", group_size=128).nbytes > 6.5  # K padded 576 -> 640
    assert i8.nbytes == sum(t.numel() * t.element_size() for t in i8.buffers())


def test_module_nbytes_counts_tied_storage_once():
    emb = torch.randn(1000, 64)
    model = nn.Module()
    model.embed = nn.Parameter(emb, requires_grad=False)
    model.lm_head = make_lm_head(model.embed.data, "none", torch.float32, "cpu")
    assert model.lm_head.weight.data_ptr() == model.embed.data_ptr()
    assert module_nbytes(model) == emb.numel() * 4
    model.lm_head = make_lm_head(model.embed.data, "int8", torch.float32, "cpu")
    assert module_nbytes(model) == emb.numel() * 4 + model.lm_head.nbytes
    x = torch.randn(3, 64)
    assert _rel(model.lm_head(x), x @ emb.t()) < 0.02


def test_int4_base_keeps_an_int8_head():
    emb = torch.randn(512, 64)
    head = make_lm_head(emb, "int4", torch.float32, "cpu")
    assert isinstance(head, QuantLinear) and head.mode == "int8" == lm_head_mode("int4")


def test_dense_is_exact():
    w, b = torch.randn(8, 16), torch.randn(8)
    mod = make_linear(w, b, "none", torch.float32, "cpu")
    assert isinstance(mod, DenseLinear)
    x = torch.randn(4, 16)
    assert torch.equal(mod(x), torch.nn.functional.linear(x, w, b))


def test_bad_config():
    with pytest.raises(ValueError, match="choose one of"):
        make_linear(torch.randn(4, 8), None, "int3", torch.float32, "cpu")
    with pytest.raises(ValueError, match="group size"):
        QuantConfig(mode="int4", int4_group_size=48)
    with pytest.raises(ValueError, match="kernel"):
        QuantConfig(kernel="magic")


def test_prompt_rows_are_exact_fp32_and_decode_rows_take_the_kernel():
    """int8 on CPU with torch's weight kernel: prompt rows multiply the dequantized weight in fp32, decode rows the weight
    kernel; a row's result depends on its kind only, never on the rows beside it."""
    w = torch.randn(192, 576) * 0.05
    x = torch.randn(70, 576)
    mod = make_linear(w, None, "int8", torch.float32, "cpu", kernel="fused_bf16")
    ref = x @ mod.dequantize().t()
    mixed = mod(x, prompt_from=6)
    assert _rel(mixed[6:], ref[6:]) < TOL[torch.float32]
    assert torch.equal(mixed[:6], mod(x[:6]))  # decode rows: exactly what the kernel gives alone
    assert _rel(mixed[:6], ref[:6]) < TOL[torch.bfloat16]
    assert _rel(mod(x, prompt_from=0)[6:], mixed[6:]) < 1e-6  # a prompt row alone or in a batch
    assert _rel(mod(x[6:7], prompt_from=0), mixed[6:7]) < 1e-6
