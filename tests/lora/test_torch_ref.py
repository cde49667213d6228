"""The torch reference against a naive per-token loop: the spec the kernels are held to."""
from __future__ import annotations

import random

import pytest
import torch

from server.lora import torch_ref
from server.lora.segments import LoraSegments


def naive(x, a, b, scale, token_slots):
    y = torch.zeros(x.shape[0], b.shape[1], dtype=x.dtype)
    for t, s in enumerate(token_slots):
        if s:
            y[t] = scale[s] * ((x[t] @ a[s].T) @ b[s].T)
    return y


def random_case(seed, T_segments, n_slots=5, R=16, d_in=48, d_out=40, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    token_slots = [s for s, n in T_segments for _ in range(n)]
    x = torch.randn(len(token_slots), d_in, generator=g, dtype=dtype)
    a = torch.randn(n_slots, R, d_in, generator=g, dtype=dtype)
    b = torch.randn(n_slots, d_out, R, generator=g, dtype=dtype)
    a[0] = 0
    b[0] = 0
    scale = torch.rand(n_slots, generator=g)
    scale[0] = 0
    return x, a, b, scale, token_slots


@pytest.mark.parametrize("seed", range(12))
def test_random_segments_match_naive(seed):
    rng = random.Random(seed)
    # long segments (SGMV path) for even seeds, one token per segment (BGMV path) for odd ones
    segs = [(rng.randrange(5), rng.randrange(1, 30) if seed % 2 == 0 else 1) for _ in range(rng.randrange(1, 9))]
    x, a, b, scale, slots = random_case(seed, segs)
    seg = LoraSegments.from_token_slots(slots)
    y0 = torch.randn(len(slots), b.shape[1])
    y = torch_ref.apply_lora(y0.clone(), x, a, b, scale, seg)
    torch.testing.assert_close(y, y0 + naive(x, a, b, scale, slots), rtol=1e-5, atol=1e-5)


def test_slot_zero_tokens_are_untouched_and_shrink_rows_zero():
    x, a, b, scale, slots = random_case(1, [(0, 4), (2, 3), (0, 2)])
    seg = LoraSegments.from_token_slots(slots)
    v = torch_ref.shrink(x, a, seg)
    assert torch.all(v[:4] == 0) and torch.all(v[7:] == 0)
    y0 = torch.randn(len(slots), b.shape[1])
    y = torch_ref.apply_lora(y0.clone(), x, a, b, scale, seg)
    assert torch.equal(y[:4], y0[:4]) and torch.equal(y[7:], y0[7:])
    assert not torch.allclose(y[4:7], y0[4:7])


def test_all_base_batch_is_a_no_op_and_empty_batch_works():
    x, a, b, scale, slots = random_case(2, [(0, 5)])
    seg = LoraSegments.from_token_slots(slots)
    y0 = torch.randn(5, b.shape[1])
    assert torch.equal(torch_ref.apply_lora(y0.clone(), x, a, b, scale, seg), y0)
    empty = LoraSegments.from_token_slots([])
    out = torch_ref.apply_lora(torch.zeros(0, 40), torch.zeros(0, 48), a, b, scale, empty)
    assert out.shape == (0, 40)


def test_rank_padding_changes_nothing():
    """An adapter of rank 4 zero-padded to 16 gives the delta of the rank-4 matmuls."""
    x, a, b, scale, slots = random_case(3, [(1, 6), (3, 1), (1, 2)])
    a[:, 4:] = 0
    b[:, :, 4:] = 0
    seg = LoraSegments.from_token_slots(slots)
    full = torch_ref.apply_lora(torch.zeros(9, 40), x, a, b, scale, seg)
    small = torch_ref.apply_lora(torch.zeros(9, 40), x, a[:, :4].contiguous(), b[:, :, :4].contiguous(), scale, seg)
    torch.testing.assert_close(full, small)


def test_bf16_within_dtype_tolerance():
    x, a, b, scale, slots = random_case(4, [(1, 7), (2, 1), (4, 5)], dtype=torch.bfloat16)
    seg = LoraSegments.from_token_slots(slots)
    y = torch_ref.apply_lora(torch.zeros(13, 40, dtype=torch.bfloat16), x, a, b, scale, seg)
    ref = naive(x.float(), a.float(), b.float(), scale, slots)
    torch.testing.assert_close(y.float(), ref, rtol=3e-2, atol=0.3)


def test_segments_merge_neighbours():
    seg = LoraSegments.from_sequences([2, 2, 0, 3], [3, 1, 2, 1])
    assert seg.slots == (2, 0, 3) and seg.starts == (0, 4, 6) and seg.ends == (4, 6, 7)
    assert seg.seg_starts.tolist() == [0, 4, 6, 7] and seg.token_slots.tolist() == [2, 2, 2, 2, 0, 0, 3]


@pytest.mark.parametrize("seed", range(8))
def test_grouped_path_on_the_pools_rank_major_views_matches_naive(seed):
    """Decode-like batches (short segments, a slot may recur) on strided stacks equal the per-token loop."""
    rng = random.Random(100 + seed)
    n, R, d_in, d_out = 6, 8, 40, 24
    segs = [(rng.randrange(n), rng.randrange(1, 4)) for _ in range(rng.randrange(3, 10))]
    x, a, b, scale, slots = random_case(seed, segs, n_slots=n, R=R, d_in=d_in, d_out=d_out)
    a_rm = a.transpose(0, 1).contiguous().transpose(0, 1)  # [n, R, in] view of [R, n, in]
    b_rm = b.permute(2, 0, 1).contiguous().permute(1, 2, 0)  # [n, out, R] view of [R, n, out]
    seg = LoraSegments.from_token_slots(slots)
    for r in (R, 5):  # the batch's rank slice
        a_r, b_r = a_rm[:, :r], b_rm[:, :, :r]
        y0 = torch.randn(len(slots), d_out)
        y = torch_ref._apply_grouped(y0.clone(), x, a_r, b_r, scale, seg)
        torch.testing.assert_close(y, y0 + naive(x, a_r, b_r, scale, slots), rtol=1e-5, atol=1e-5)
        # a second target reading the same x reuses the grouped layout of x
        y2 = torch_ref._apply_grouped(torch.zeros(len(slots), d_out), x, a_r, b_r, scale, seg)
        torch.testing.assert_close(y2, naive(x, a_r, b_r, scale, slots), rtol=1e-5, atol=1e-5)


def test_path_choice_follows_padding():
    """Even segments (decode, equal prefills) and decode-like ones take the grouped bmm; ragged ones one GEMM per
    segment."""
    assert torch_ref._use_grouped(LoraSegments.from_token_slots(list(range(1, 9))))
    assert torch_ref._use_grouped(LoraSegments.from_sequences([1, 2, 3, 4], [64, 64, 60, 64]))
    assert not torch_ref._use_grouped(LoraSegments.from_sequences([1, 2], [500, 3]))
    assert not torch_ref._use_grouped(LoraSegments.from_token_slots([1, 30]))
    assert torch_ref._use_grouped(LoraSegments.from_token_slots([3, 4, 0, 5]))
    # Decode-like: a few rows per slot, every slot of the span in the batch: one bmm despite the padding.
    assert torch_ref._use_grouped(LoraSegments.from_token_slots([1, 1, 1, 1, 2, 3]))
    assert not torch_ref._use_grouped(LoraSegments.from_token_slots([1] * 9 + [2, 3]))  # 9 rows of one slot
    assert not torch_ref._use_grouped(LoraSegments.from_token_slots([1, 1, 1, 1, 3]))  # slot 2 would be read for nothing
