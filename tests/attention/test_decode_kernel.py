"""The CPU decode attention kernel: torch SDPA's result, and a sequence's bits whatever its batch."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from server.attention import decode_kernel

KERN = decode_kernel.load()


@pytest.fixture(autouse=True)
def _kernel_built():
    assert KERN is not None, "the decode attention kernel did not build here (no gcc?); the log says why"


def _cache(rows=512, nkv=3, hd=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, nkv, hd, generator=g), torch.randn(rows, nkv, hd, generator=g)


def _sdpa(q, k, v, rows, lengths):
    D, L = rows.shape
    kc = k.index_select(0, rows.reshape(-1)).view(D, L, *k.shape[1:]).permute(0, 2, 1, 3)
    vc = v.index_select(0, rows.reshape(-1)).view(D, L, *v.shape[1:]).permute(0, 2, 1, 3)
    mask = (torch.arange(L)[None, :] < lengths[:, None])[:, None, None, :]
    return F.scaled_dot_product_attention(q[:, :, None, :], kc, vc, attn_mask=mask, enable_gqa=True)[:, :, 0]


@pytest.mark.parametrize("nh,nkv,hd", [(9, 3, 64), (32, 8, 64), (64, 8, 64), (4, 4, 32), (8, 2, 128), (16, 1, 16)])
def test_matches_sdpa(nh, nkv, hd):
    k, v = _cache(nkv=nkv, hd=hd)
    lengths = torch.tensor([1, 15, 16, 17, 100, 64], dtype=torch.int32)
    g = torch.Generator().manual_seed(1)
    rows = torch.stack([torch.randperm(512, generator=g)[:100] for _ in lengths])  # scattered, as pages are
    q = torch.randn(len(lengths), nh, hd, generator=g) * 3
    out = KERN(q, k, v, rows, lengths)
    assert torch.allclose(out, _sdpa(q, k, v, rows, lengths), atol=2e-6, rtol=1e-5)


def test_a_sequences_bits_do_not_depend_on_the_others():
    k, v = _cache()
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 9, 64, generator=g)
    mine = torch.arange(40, 113)  # 73 tokens of context
    alone = KERN(q, k, v, mine[None], torch.tensor([73], dtype=torch.int32))
    for others in ([5], [300, 1], [200, 17, 90, 2, 150]):
        L = max([73, *others])
        rows = torch.zeros(len(others) + 1, L, dtype=torch.int64)
        rows[0, :73] = mine
        for i, n in enumerate(others):
            rows[i + 1, :n] = torch.randperm(512, generator=g)[:n] if n <= 512 else torch.arange(n) % 512
        qs = torch.cat([q, torch.randn(len(others), 9, 64, generator=g)])
        out = KERN(qs, k, v, rows, torch.tensor([73, *others], dtype=torch.int32))
        assert torch.equal(out[0], alone[0])


def test_accepts_only_what_it_computes():
    k, _ = _cache()
    assert KERN.accepts(torch.randn(2, 9, 64), k)
    assert not KERN.accepts(torch.randn(2, 9, 64, dtype=torch.float64), k)
    assert not KERN.accepts(torch.randn(2, 9, 60), torch.randn(4, 3, 60))
    assert not KERN.accepts(torch.randn(2, 8, 64), k)  # 8 query heads over 3 KV heads


def test_q_as_a_view_of_the_fused_qkv_rows_gives_the_contiguous_result():
    k, v = _cache()
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(4, (9 + 2 * 3) * 64, generator=g)  # q's rows are one fused projection's, wider than q
    q = qkv[:, :9 * 64].view(4, 9, 64)
    rows = torch.stack([torch.randperm(512, generator=g)[:50] for _ in range(4)])
    lengths = torch.tensor([50, 7, 33, 1], dtype=torch.int32)
    assert torch.equal(KERN(q, k, v, rows, lengths), KERN(q.contiguous(), k, v, rows, lengths))



@pytest.mark.parametrize("nh,nkv", [(9, 3), (32, 8), (4, 4)])
def test_the_cuda_form_of_decode_attention_is_the_gqa_result(nh, nkv):
    """sdpa.grouped_decode_sdpa (what CUDA runs: a KV head's query heads as its query rows, so the
    memory-efficient kernel takes the mask) gives what SDPA's GQA form gives, here on CPU."""
    from server.attention.sdpa import grouped_decode_sdpa

    k, v = _cache(nkv=nkv, hd=32)
    lengths = torch.tensor([1, 30, 64], dtype=torch.int32)
    g = torch.Generator().manual_seed(2)
    rows = torch.stack([torch.randperm(512, generator=g)[:64] for _ in lengths])
    q = torch.randn(len(lengths), nh, 32, generator=g)
    D, L = rows.shape
    kc = k.index_select(0, rows.reshape(-1)).view(D, L, nkv, 32).permute(0, 2, 1, 3)
    vc = v.index_select(0, rows.reshape(-1)).view(D, L, nkv, 32).permute(0, 2, 1, 3)
    mask = (torch.arange(L)[None, :] < lengths[:, None])[:, None, None, :]
    torch.testing.assert_close(grouped_decode_sdpa(q, kc, vc, mask), _sdpa(q, k, v, rows, lengths),
                               atol=2e-6, rtol=1e-5)
