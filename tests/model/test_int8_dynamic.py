"""The dynamic int8 kernel: bit-exact against torch references, the same bits on every instruction set
and whatever else shares a row's batch, and close to the dense product."""
from __future__ import annotations

import pytest
import torch

from server.model import int8_dynamic as D
from server.core.native import NATIVE_FLAGS

KERN = D.load()
# The same source built for other machines: AVX2 without AVX-512 (the VNNI-less CPUs), and plain C.
OTHER_BUILDS = {"avx2": NATIVE_FLAGS + ("-mno-avx512f",), "scalar": ("-O3", "-fopenmp", "-shared", "-fPIC")}


@pytest.fixture(autouse=True)
def _kernel_built():
    assert KERN is not None, "the dynamic int8 kernel did not build here (no gcc?); the log says why"


def _rows(m: int, k: int, seed: int = 0) -> torch.Tensor:
    """Rows of different magnitudes, one outlier channel (as real activations have) and a zero row."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g) * 4
    x[:, k // 3] *= 30
    if m > 2:
        x[1] = 0
    return x


def _reference(x: torch.Tensor, pw: D.PackedWeight) -> torch.Tensor:
    """The kernel's formula in torch: exact integer sums, then ((float)acc * w_scale) * x_scale."""
    q, s = D.quantize_reference(x, pw.kp)
    acc = (q.to(torch.int64) - 128) @ KERN.unpack(pw).to(torch.int64).t()
    return (acc.float() * pw.scale[:pw.out_features]) * s[:, None]


@pytest.mark.parametrize("k", [576, 1536, 1000, 64, 33])
def test_quantizer_is_the_torch_reference_bit_for_bit(k):
    kp = D.padded_k(k)
    for m in (1, 8, 40):
        x = _rows(m, k, seed=m)
        q, s = KERN.quantize(x, kp)
        qr, sr = D.quantize_reference(x, kp)
        assert torch.equal(q, qr) and torch.equal(s, sr)
    assert torch.equal(q[1], torch.full((kp,), 128, dtype=torch.uint8)) and s[1] == 0  # a zero row stays zero


@pytest.mark.parametrize("kp", [64, 576, 1536, 1024])
def test_rotation_is_the_reference_and_orthogonal_up_to_its_width(kp):
    b = D.rotation_block(kp)
    assert b == {64: 64, 576: 64, 1536: 512, 1024: 512}[kp]
    rows = torch.randn(5, kp)
    assert torch.equal(KERN.rotate(rows), D.hadamard_reference(rows, b))
    eye = D.hadamard_reference(torch.eye(b), b)
    assert torch.equal(eye @ eye.t(), b * torch.eye(b))


@pytest.mark.parametrize("n,k", [(192, 576), (200, 1000), (16, 64), (37, 100), (576, 1536)])
def test_product_is_the_exact_integer_formula(n, k):
    pw = KERN.pack(torch.randn(n, k) * 0.05)
    for m in (1, 5, 8, 16, 17, 33, 48, 70):  # the VNNI/AVX2 rows, whole AMX tiles and their remainders
        x = _rows(m, k, seed=m)
        assert torch.equal(KERN.linear(x, pw), _reference(x, pw)), m


def test_a_rows_numbers_do_not_depend_on_its_batch():
    pw = KERN.pack(torch.randn(300, 576) * 0.05)
    row = _rows(1, 576, seed=99)
    alone = KERN.linear(row, pw)
    for m in (2, 7, 16, 17, 40, 100):
        for at in (0, m // 2, m - 1):
            batch = _rows(m, 576, seed=m)
            batch[at] = row[0]
            assert torch.equal(KERN.linear(batch, pw)[at], alone[0]), (m, at)


@pytest.mark.parametrize("build", sorted(OTHER_BUILDS))
def test_every_instruction_set_gives_the_same_bits(build):
    other = D.load(OTHER_BUILDS[build])
    if other is None:
        pytest.fail(f"the {build} build failed; see the log")
    assert other.isa == build and not other.amx
    w = torch.randn(200, 1000) * 0.05
    pw, pw_other = KERN.pack(w), other.pack(w)
    assert all(torch.equal(a, b) for a, b in zip(pw.tensors(), pw_other.tensors()))
    for m in (3, 8, 40):
        x = _rows(m, 1000, seed=m)
        assert torch.equal(other.linear(x, pw_other), KERN.linear(x, pw))


def test_close_to_the_dense_product_despite_an_outlier_channel():
    w = torch.randn(256, 576) * 0.05
    x = _rows(24, 576)
    pw = KERN.pack(w)
    dense = x @ w.t()
    y = KERN.linear(x, pw)
    assert ((y - dense).norm() / dense.norm()).item() < 0.02
    deq = x @ KERN.dequantize(pw).t()  # what the weight stands for, activations unrounded
    assert ((y - deq).norm() / deq.norm()).item() < 0.015


def test_description_names_the_kernel():
    assert KERN.isa in ("avx512_vnni", "avx2", "scalar")
    assert ("amx" if KERN.amx else KERN.isa) in KERN.description


def test_amx_tiles_and_the_vector_kernel_give_the_same_bits():
    """Where the CPU has AMX, batches from 2 rows take it; forcing the vector kernel changes no bit."""
    pw = KERN.pack(torch.randn(200, 1000) * 0.05)
    for m in (2, 8, 16, 40):
        x = _rows(m, 1000, seed=m)
        with_amx = KERN.linear(x, pw)
        KERN.set_amx_min_rows(1 << 30)
        try:
            vector = KERN.linear(x, pw)
        finally:
            KERN.set_amx_min_rows(2)
        assert torch.equal(with_amx, vector) and torch.equal(vector, _reference(x, pw)), m
