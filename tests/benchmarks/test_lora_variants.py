"""The measurement-only torch._grouped_mm variant (benchmarks/lora_variants.py) against the torch reference."""
from __future__ import annotations

import pytest
import torch

from benchmarks import lora_variants
from server.lora import torch_ref
from server.lora.segments import LoraSegments

# (slots per sequence, tokens per sequence, in, out, rank), as the Triton kernel cases.
CASES = [
    ([1, 2, 3], [1, 1, 1], 64, 48, 8),
    ([1, 0, 2, 3, 1], [5, 3, 0, 20, 1], 48, 40, 16),
    ([0, 0], [4, 2], 32, 32, 8),
    ([2, 2, 2, 0, 1], [1, 1, 1, 1, 1], 100, 72, 24),
    ([3], [37], 80, 33, 64),
    ([1, 2], [17, 0], 130, 20, 128),
]


def _case(seed, slots, lens, in_f, out_f, rank, n_slots, dtype, device="cpu"):
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


def test_grouped_mm_variant_matches_reference():
    if not lora_variants.grouped_mm_available(torch.device("cpu"), torch.float32):
        pytest.skip("torch._grouped_mm not available on this build")
    aligned = 0
    for i, (slots, lens, in_f, out_f, rank) in enumerate(CASES):
        seg, x, a, b, scale, y = _case(i, slots, lens, in_f, out_f, rank, 4, torch.float32)
        if any(n % 4 for n in (in_f, out_f, rank)):  # fp32 rows must be 16-byte multiples
            with pytest.raises(ValueError, match="16-byte"):
                lora_variants.apply_lora_grouped_mm(y.clone(), x, a, b, scale, seg)
            continue
        aligned += 1
        want = torch_ref.apply_lora(y.clone(), x, a, b, scale, seg)
        got = lora_variants.apply_lora_grouped_mm(y.clone(), x, a, b, scale, seg)
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), i
    assert aligned >= 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_grouped_mm_variant():
    if not lora_variants.grouped_mm_available(torch.device("cuda"), torch.bfloat16):
        pytest.skip("torch._grouped_mm needs bf16 on sm90+")
    seg, x, a, b, scale, y = _case(0, [1, 0, 2, 3], [64, 8, 1, 200], 2048, 8192, 16, 4, torch.bfloat16, "cuda")
    want = torch_ref.apply_lora(y.clone(), x, a, b, scale, seg)
    got = lora_variants.apply_lora_grouped_mm(y.clone(), x, a, b, scale, seg)
    err = float((got.float() - want.float()).abs().max() / want.float().abs().max())
    assert err <= 2e-2
