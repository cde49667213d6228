"""Proposed tests/attention/test_xformers_probe.py (the probe's owner has no test file there)."""
import math

import pytest
import torch

from server.attention import xformers_probe as xp


def _naive(q, k, v, lens):
    out, start = [], 0
    rep = q.shape[1] // k.shape[1]
    for n in lens:
        qs = q[start:start + n]
        ks, vs = k[start:start + n].repeat_interleave(rep, 1), v[start:start + n].repeat_interleave(rep, 1)
        s = torch.einsum("qhd,khd->hqk", qs, ks) / math.sqrt(q.shape[-1])
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        out.append(torch.einsum("hqk,khd->qhd", s.softmax(-1), vs))
        start += n
    return torch.cat(out)


def test_cpu_uses_sdpa_and_varlen_is_block_causal():
    assert xp.attention_backend("cpu") == "sdpa"
    lens = [3, 0, 7, 1]
    q, k, v = torch.randn(11, 4, 16), torch.randn(11, 2, 16), torch.randn(11, 2, 16)
    got = xp.varlen_prefill_attention(q, k, v, lens)
    assert torch.allclose(got, _naive(q, k, v, [3, 7, 1]), atol=1e-5)
    one = xp.prefill_fn("cpu")(q[:3], k[:3], v[:3])
    assert torch.allclose(one, got[:3], atol=1e-6)
    with pytest.raises(ValueError, match="sum to"):
        xp.varlen_prefill_attention(q, k, v, [3])


def test_cuda_fallback_form_is_causal_gqa_attention():
    """The 4-D form CUDA's SDPA fallback takes (so fused kernels serve it), checked here on CPU."""
    q, k, v = torch.randn(9, 8, 16), torch.randn(9, 2, 16), torch.randn(9, 2, 16)
    assert torch.allclose(xp._sdpa_4d(q, k, v, None), _naive(q, k, v, [9]), atol=1e-5)
    assert torch.allclose(xp._sdpa_4d(q, k[:, :1].expand(9, 8, 16), v[:, :1].expand(9, 8, 16), None),
                          xp._sdpa_4d(q, k[:, :1], v[:, :1], None), atol=1e-6)  # MHA and GQA agree
    assert torch.allclose(xp._sdpa_4d(q, k, v, 0.5), xp._sdpa_4d(q * (0.5 * 4), k, v, None), atol=1e-5)


def test_probe_without_cuda_says_why():
    if torch.cuda.is_available():
        pytest.skip("has CUDA")
    res = xp.probe(0)
    assert not res.usable and "CUDA" in res.reason


def test_mode_comes_from_the_caller_not_the_environment(monkeypatch):
    """The engine passes `EngineConfig.attention`; LORASERVE_ATTENTION reaches the probe only through the config."""
    monkeypatch.setenv("LORASERVE_ATTENTION", "bogus")
    for mode in ("auto", "sdpa", "xformers"):
        assert xp.attention_backend("cpu", mode) == "sdpa"  # CPU prefill is always SDPA
    q, k, v = torch.randn(4, 4, 16), torch.randn(4, 2, 16), torch.randn(4, 2, 16)
    assert torch.allclose(xp.prefill_fn("cpu", "sdpa")(q, k, v), _naive(q, k, v, [4]), atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_backend_matches_sdpa():
    lens = [17, 1, 64]
    T = sum(lens)
    q = torch.randn(T, 32, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(T, 8, 64, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(T, 8, 64, device="cuda", dtype=torch.bfloat16)
    got = xp.varlen_prefill_attention(q, k, v, lens)
    want = xp._sdpa_varlen(q, k, v, lens, None)
    assert (got.float() - want.float()).abs().max() < 3e-2
    assert xp.attention_backend("cuda") in ("xformers", "sdpa")
    assert xp.attention_backend("cuda", "sdpa") == "sdpa"
    sd = xp.varlen_prefill_attention(q, k, v, lens, mode="sdpa")
    assert torch.equal(sd, want)
