"""The int8 base's CUDA matmul (server/model/int8_triton.py) against the dequantized weight, and its routing.

The kernel runs on CPU under Triton's interpreter, which must be chosen before triton is first imported: those
cases run in one TRITON_INTERPRET=1 child pytest over this file (`test_kernel_under_interpreter`), as
tests/lora/test_triton_sgmv.py does. Cases marked gpu run the compiled kernel at Llama shapes and skip without
CUDA. Run the interpreter cases directly with:
    TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES= python -m pytest tests/model/test_int8_triton.py -m "not gpu"
"""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

from server.model import quant  # noqa: E402
from tests.helpers import interpreter_child_cases, run_under_triton_interpreter  # noqa: E402

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
interp = pytest.mark.interpreter_child


@pytest.mark.slow
@pytest.mark.skipif(_INTERPRET, reason="this is the child")
def test_kernel_under_interpreter():
    run_under_triton_interpreter(__file__, interpreter_child_cases(globals()))


def _weights(n: int, k: int, pad: int = 0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    q, scale = quant.quantize_int8(torch.nn.functional.pad(w, (0, pad)))
    return q, scale


def _reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x.float() @ quant.dequantize_int8(q, scale)[:, :x.shape[1]].t()


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want).abs().max() / want.abs().max().clamp_min(1e-6))


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_products_match_the_dequantized_weight_in_every_row_band(dtype):
    from server.model import int8_triton

    assert int8_triton._INTERPRETED, "the kernel was not decorated for the interpreter"
    q, scale = _weights(72, 200, pad=8)  # a padded weight: columns past x's K are never read
    g = torch.Generator().manual_seed(1)
    for m in (1, 5, 33, 70):  # decode bands (16, 32, 64 rows a tile) and the prefill tiles
        x = torch.randn(m, 200, generator=g).to(dtype)
        y = int8_triton.int8_matmul(x, q, scale)
        assert y.dtype == dtype and y.shape == (m, 72)
        assert _rel_err(y, _reference(x, q, scale)) < _TOL[dtype], (m, dtype)
    # strided activations (a view of a wider buffer) read through their strides
    wide = torch.randn(5, 300, generator=g).to(dtype)
    assert _rel_err(int8_triton.int8_matmul(wide[:, 50:250], q, scale), _reference(wide[:, 50:250], q, scale)) \
        < _TOL[dtype]


@interp
def test_a_rows_numbers_do_not_depend_on_the_other_rows_of_its_band():
    """A decode row alone and as the first row of larger batches of its band gets the same bits: a graph bucket
    pads a batch with rows after the real ones, which keep their places (server/engine/cuda_graphs.py).
    Under the interpreter tl.dot is numpy's matmul, whose BLAS may sum a row differently at another place in
    the tile (OpenBLAS's AVX2 kernels do), so rows keep their place here; the GPU test below moves them."""
    from server.model import int8_triton

    q, scale = _weights(40, 96)
    g = torch.Generator().manual_seed(2)
    row = torch.randn(1, 96, generator=g)
    alone = int8_triton.int8_matmul(row, q, scale)
    for m in (2, 9, 16):
        batch = torch.randn(m, 96, generator=g)
        batch[0] = row[0]
        assert torch.equal(int8_triton.int8_matmul(batch, q, scale)[0], alone[0]), m


@interp
def test_split_k_partials_add_up_to_the_unsplit_product_the_same_way_every_time():
    from server.model import int8_triton

    q, scale = _weights(48, 520)  # 5 K blocks of 128: splits of 2 and 3 leave ragged tails
    x = torch.randn(7, 520, generator=torch.Generator().manual_seed(3))
    whole = int8_triton.int8_matmul(x, q, scale, split_k=1)
    for split in (2, 3):
        got = int8_triton.int8_matmul(x, q, scale, split_k=split)
        assert _rel_err(got, _reference(x, q, scale)) < 1e-5 and _rel_err(got, whole.float()) < 1e-5
        assert torch.equal(got, int8_triton.int8_matmul(x, q, scale, split_k=split))  # no atomics: same bits


@interp
def test_a_quantized_linear_on_the_triton_kernel_computes_its_own_dequantized_weight():
    g = torch.Generator().manual_seed(4)
    w, b = torch.randn(56, 88, generator=g) * 0.1, torch.randn(56, generator=g)
    lin = quant.make_linear(w, b, "int8", torch.float32, torch.device("cpu"), kernel="triton")
    assert lin.kernel == "triton" and lin.padded_in == 88  # no padding: the kernel masks K itself
    x = torch.randn(3, 4, 88, generator=g)
    want = x @ lin.dequantize().t() + b
    assert _rel_err(lin(x), want) < 1e-5


# ---- in this process: routing and input checks (no kernel launch) --------------------------------------


@pytest.mark.skipif(_INTERPRET, reason="parent-side checks")
def test_cuda_int8_is_routed_to_the_triton_kernel_and_int4_is_not():
    cuda = torch.device("cuda")
    assert quant._choose("int8", cuda, torch.bfloat16, "auto") == "triton"
    assert quant._choose("int8", cuda, torch.float32, "auto") == "triton"
    assert quant._choose("int4", cuda, torch.bfloat16, "auto") != "triton"
    with pytest.raises(ValueError, match="Triton int8 kernel runs int8"):
        quant._choose("int4", cuda, torch.bfloat16, "triton")


@pytest.mark.skipif(_INTERPRET, reason="parent-side checks")
def test_bad_inputs_get_a_clear_error_before_any_launch():
    from server.model import int8_triton

    q, scale = _weights(8, 32)
    with pytest.raises(ValueError, match="cannot take K = 40"):
        int8_triton.int8_matmul(torch.randn(2, 40), q, scale)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        int8_triton.int8_matmul(torch.randn(2, 32).double(), q, scale)
    with pytest.raises(ValueError, match="int8 weight"):
        int8_triton.int8_matmul(torch.randn(2, 32), q.float(), scale)
    assert int8_triton.int8_matmul(torch.randn(0, 32), q, scale).shape == (0, 8)


def test_tiles_take_the_same_band_for_a_decode_step_and_its_graph_bucket():
    from server.engine.cuda_graphs import batch_buckets, bucket_for
    from server.model.int8_triton import tiles

    buckets = batch_buckets(256)
    for m in range(1, 257):
        assert tiles(m, 4096, 4096, 132)[:3] == tiles(bucket_for(m, buckets), 4096, 4096, 132)[:3], m


# ---- on a GPU: Llama shapes ------------------------------------------------------------------------------

_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n, k", [(3072, 2048), (2048, 8192), (4096, 14336)])  # 1B q/k/v and down, 8B down
def test_gpu_llama_shapes_match_the_dequantized_weight(dtype, n, k):
    from server.model import int8_triton

    q, scale = _weights(n, k)
    q, scale = q.cuda(), scale.cuda()
    for m in (1, 16, 64, 512):
        x = torch.randn(m, k, device="cuda").to(dtype)
        got = int8_triton.int8_matmul(x, q, scale)
        assert _rel_err(got, _reference(x, q, scale)) < _TOL[dtype], (m, dtype)


@pytest.mark.gpu
@_cuda
def test_gpu_a_rows_numbers_depend_neither_on_its_band_nor_on_its_place_in_it():
    """On the GPU, a decode row alone and anywhere inside batches of its band gets the same bits."""
    from server.model import int8_triton

    q, scale = _weights(2048, 2048)
    q, scale = q.cuda(), scale.cuda()
    g = torch.Generator().manual_seed(2)
    for dtype in (torch.float32, torch.bfloat16):
        row = torch.randn(1, 2048, generator=g).to(dtype).cuda()
        alone = int8_triton.int8_matmul(row, q, scale)
        for m in (2, 9, 16):
            batch = torch.randn(m, 2048, generator=g).to(dtype).cuda()
            batch[m // 2] = row[0]
            assert torch.equal(int8_triton.int8_matmul(batch, q, scale)[m // 2], alone[0]), (m, dtype)
