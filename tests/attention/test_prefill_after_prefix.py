"""Prefill after a cached prefix: attention over cached rows plus the new tokens equals causal attention
over the whole sequence, for the new tokens' rows."""
from __future__ import annotations

import torch

from server.attention.sdpa import AttentionMetadata, paged_attention, sdpa_causal


def test_suffix_over_cached_rows_equals_full_causal_attention():
    g = torch.Generator().manual_seed(0)
    L, c, nh, nkv, hd = 23, 16, 4, 2, 8
    q, k, v = (torch.randn(L, h, hd, generator=g) for h in (nh, nkv, nkv))
    full = sdpa_causal(q, k, v)
    cache = (torch.zeros(64, nkv, hd), torch.zeros(64, nkv, hd))
    rows = torch.randperm(64, generator=g)[:L]  # a scattered block table
    cache[0][rows[:c]] = k[:c]
    cache[1][rows[:c]] = v[:c]
    attn = AttentionMetadata(slot_mapping=rows[c:], prefill=((0, L - c),), prefill_context=(rows,), prompt_from=0)
    out = paged_attention(q[c:], k[c:], v[c:], attn, cache)
    torch.testing.assert_close(out, full[c:], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cache[0][rows], k)  # the new tokens' K/V were written where the table says
