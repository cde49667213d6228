"""The C RoPE, RMSNorm and SiLU x up of the dynamic int8 path are torch's ops bit for bit and never used by
`--quantize none`; the one-op RMSNorm is the Hugging Face formula bit for bit."""
from __future__ import annotations

import pytest
import torch

from server.model import cpu_glue
from server.model.llama import LlamaForCausalLM, rms_norm, rotate_half
from tests.helpers import make_tiny_model_dir

GLUE = cpu_glue.load()


@pytest.fixture(autouse=True)
def _built():
    assert GLUE is not None, "the CPU glue kernels did not build here (no gcc?); the log says why"


@pytest.mark.parametrize("rows,k", [(1, 576), (8, 576), (631, 576), (5, 100), (3, 2048)])
def test_rms_norm_is_the_hugging_face_formula_bit_for_bit(rows, k):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, k, generator=g) * torch.rand(rows, 1, generator=g) * 10
    w = torch.randn(k, generator=g)
    x32 = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)  # transformers' LlamaRMSNorm in fp32
    assert torch.equal(rms_norm(x, w, 1e-5), w * x32)


@pytest.mark.parametrize("rows,k", [(1, 576), (8, 576), (631, 576), (5, 100), (3, 2048), (2, 4096), (4, 8192),
                                    (7, 17), (1, 5120)])
def test_c_rms_norm_with_its_residual_add_is_torch_bit_for_bit(rows, k):
    g = torch.Generator().manual_seed(rows * k)
    h = torch.randn(rows, k, generator=g) * torch.rand(rows, 1, generator=g) * 10
    d = torch.randn(rows, k, generator=g)
    w = torch.randn(k, generator=g)
    assert GLUE.norm_lanes is not None, "no lane width reproduced torch's sum on this machine"
    same, y = GLUE.add_rms_norm(h, None, w, 1e-5)
    assert same is h and torch.equal(y, rms_norm(h, w, 1e-5))
    summed, y = GLUE.add_rms_norm(h, d, w, 1e-6)
    assert torch.equal(summed, h + d) and torch.equal(y, rms_norm(h + d, w, 1e-6))


def test_int8_model_gives_the_same_bits_with_and_without_the_c_glue(tmp_path):
    d = make_tiny_model_dir(tmp_path / "m")
    model = LlamaForCausalLM.from_pretrained(d, quantize="int8")
    ids = torch.randint(0, model.config.vocab_size, (23,), generator=torch.Generator().manual_seed(3))
    with_glue = model.score(ids)
    for layer in model.layers:
        layer.glue = None
    assert torch.equal(with_glue, model.score(ids))


def test_rope_is_torch_bit_for_bit_and_leaves_v_alone():
    g = torch.Generator().manual_seed(1)
    nh, nkv, hd, T = 9, 3, 64, 5
    qkv = torch.randn(T, (nh + 2 * nkv) * hd, generator=g)
    cos, sin = torch.randn(T, hd, generator=g), torch.randn(T, hd, generator=g)
    qk = qkv[:, :(nh + nkv) * hd].view(T, nh + nkv, hd)
    want = (qk * cos[:, None] + rotate_half(qk) * sin[:, None]).reshape(T, -1)
    v = qkv[:, (nh + nkv) * hd:].clone()
    GLUE.rope_(qkv, nh + nkv, hd, cos, sin)
    assert torch.equal(qkv[:, :(nh + nkv) * hd], want)
    assert torch.equal(qkv[:, (nh + nkv) * hd:], v)


def test_only_the_dynamic_int8_model_uses_them(tmp_path):
    d = make_tiny_model_dir(tmp_path / "m")
    assert all(layer.glue is None for layer in LlamaForCausalLM.from_pretrained(d, quantize="none").layers)
    int8 = LlamaForCausalLM.from_pretrained(d, quantize="int8")
    assert all(layer.glue is GLUE for layer in int8.layers)


@pytest.mark.parametrize("rows,inter", [(8, 1536), (544, 1536), (3, 45), (2, 13)])
def test_silu_times_up_is_torch_bit_for_bit(rows, inter):
    """A decode step's rows, a prefill's (split over the threads), and widths with a tail torch takes one element
    at a time; values of every scale, infinities and NaN: `F.silu(g) * u`'s bits."""
    if not GLUE.silu_exact:
        pytest.skip("this CPU's build does not match torch's SiLU bits; torch's ops serve (the log says so)")
    g = torch.Generator().manual_seed(7)
    gu = torch.randn(rows, 2 * inter, generator=g) * torch.logspace(-3, 2.3, rows)[:, None]
    gu[0, :3] = torch.tensor([float("inf"), -float("inf"), float("nan")])
    want = torch.nn.functional.silu(gu[:, :inter]) * gu[:, inter:]
    assert torch.equal(GLUE.silu_mul(gu, inter).view(torch.int32), want.view(torch.int32))
