"""The C RoPE of the dynamic int8 path is torch's RoPE bit for bit and never used by `--quantize none`;
the one-op RMSNorm is the Hugging Face formula bit for bit."""
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
