"""Plain-torch segmented gather matmuls: the specification every kernel is tested against.

Shapes, for one targeted linear with N_slots slots (slot 0 = no adapter, all zeros):
    x      [T, in]              activations, any float dtype
    a      [N_slots, R, in]     stacked lora_A, rank zero-padded to R
    b      [N_slots, out, R]    stacked lora_B, rank zero-padded to R
    scale  [N_slots] float32    alpha / r (or alpha / sqrt(r) for rsLoRA), 0 for slot 0
    v      [T, R]               shrink output
    y      [T, out]             base output, accumulated into in place

shrink:  v[t] = x[t] @ a[s_t]^T
expand:  y[t] += scale[s_t] * (v[t] @ b[s_t]^T)

Two strategies, same result: a GEMM per segment when segments are long (prefill,
SGMV), a batched gather-matvec when they are short (decode, BGMV). Neither loops
over tokens in Python; the segment loop runs once per distinct adapter in the batch.
"""
from __future__ import annotations

import weakref

import torch

from server.lora.segments import LoraSegments

# Below this many tokens per adapter segment, gathering each token's adapter and
# doing one bmm beats launching a GEMM per segment (on CUDA without Triton; on CPU
# the per-segment GEMM wins even at one token per segment, measured).
GATHER_MAX_AVG_SEGMENT = 4
# The grouped path lays the tokens out per slot ([slots, L, in], L = most tokens any slot
# has) and does one bmm against all slots' A and one against their B: no weight is copied,
# and only real tokens (plus padding) are multiplied. It serves batches whose segments are
# even enough that padding stays small (decode; prefills of similar lengths); otherwise
# each segment takes one GEMM.
GROUPED_MAX_PADDING = 2  # padded rows (slots x L) at most this many times the real tokens


def _use_grouped(seg: LoraSegments, n_slots: int) -> bool:
    counts: dict[int, int] = {}
    for s, e, slot in zip(seg.starts, seg.ends, seg.slots):
        if slot != 0:
            counts[slot] = counts.get(slot, 0) + e - s
    if not counts:
        return False
    return n_slots * max(counts.values()) <= GROUPED_MAX_PADDING * seg.num_tokens


def _use_gather(seg: LoraSegments) -> bool:
    n_lora = sum(1 for s in seg.slots if s != 0)
    return (seg.token_slots.is_cuda and n_lora > 0
            and seg.num_tokens <= GATHER_MAX_AVG_SEGMENT * n_lora)


def _grouped_layout(seg: LoraSegments, n_slots: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(gather [n_slots * L] token index or T for padding, row [T] of each token or n_slots * L, L)."""
    key = ("grouped", n_slots)
    cached = seg.cache.get(key)
    if cached is None:
        slots = seg.token_slots
        T = slots.shape[0]
        lora = slots != 0
        order = torch.argsort(slots, stable=True)
        counts = torch.bincount(slots, minlength=n_slots)
        counts[0] = 0
        L = max(int(counts.max().item()), 1)
        starts = torch.cumsum(torch.bincount(slots, minlength=n_slots), 0) - torch.bincount(slots, minlength=n_slots)
        sorted_slots = slots[order]
        k = torch.arange(T, device=slots.device) - starts[sorted_slots]  # position within its slot
        row = torch.full((T,), n_slots * L, dtype=torch.long, device=slots.device)
        row[order] = torch.where(lora[order], sorted_slots * L + k, row[order])
        gather = torch.full((n_slots * L,), T, dtype=torch.long, device=slots.device)
        tok = torch.arange(T, device=slots.device)
        gather[row[lora]] = tok[lora]
        cached = (gather, row, L)
        seg.cache[key] = cached
    return cached


def _grouped_x(x: torch.Tensor, seg: LoraSegments, n_slots: int) -> torch.Tensor:
    """x laid out per slot; shared by the targets that read the same x (q/k/v, gate/up)."""
    hit = seg.cache.get(("xg", n_slots))
    if hit is not None and hit[0]() is x:
        return hit[1]
    gather, _, L = _grouped_layout(seg, n_slots)
    xg = torch.cat([x, x.new_zeros((1, x.shape[1]))]).index_select(0, gather).view(n_slots, L, x.shape[1])
    seg.cache[("xg", n_slots)] = (weakref.ref(x), xg)
    return xg


def _apply_grouped(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                   scale: torch.Tensor, seg: LoraSegments) -> torch.Tensor:
    n = a.shape[0]
    _, row, L = _grouped_layout(seg, n)
    v = torch.bmm(_grouped_x(x, seg, n), a.transpose(1, 2))  # [n, L, R]
    d = torch.bmm(v, b.transpose(1, 2)).view(n * L, -1)       # [n * L, out]
    d = torch.cat([d, d.new_zeros((1, d.shape[1]))]).index_select(0, row)
    sc = scale.index_select(0, seg.token_slots).to(d.dtype).unsqueeze(-1)
    return y.add_(d.mul_(sc))


def shrink(x: torch.Tensor, a: torch.Tensor, seg: LoraSegments) -> torch.Tensor:
    """v = x @ a[slot]^T per token; rows of slot-0 tokens are zero."""
    T = x.shape[0]
    R = a.shape[1]
    if _use_gather(seg):
        ag = a.index_select(0, seg.token_slots)  # [T, R, in]
        return torch.bmm(ag, x.unsqueeze(-1)).squeeze(-1)
    v = x.new_zeros((T, R))
    for s, e, slot in zip(seg.starts, seg.ends, seg.slots):
        if slot != 0 and e > s:
            torch.mm(x[s:e], a[slot].t(), out=v[s:e])
    return v


def expand(y: torch.Tensor, v: torch.Tensor, b: torch.Tensor, scale: torch.Tensor,
           seg: LoraSegments) -> torch.Tensor:
    """y += scale[slot] * (v @ b[slot]^T) per token, in place; slot-0 tokens untouched."""
    if _use_gather(seg):
        bg = b.index_select(0, seg.token_slots)  # [T, out, R]
        delta = torch.bmm(bg, v.unsqueeze(-1)).squeeze(-1)
        sc = scale.index_select(0, seg.token_slots).to(delta.dtype).unsqueeze(-1)
        y.add_(delta * sc)
        return y
    for s, e, slot in zip(seg.starts, seg.ends, seg.slots):
        if slot != 0 and e > s:
            delta = torch.mm(v[s:e], b[slot].t())
            y[s:e].add_(delta * scale[slot].to(delta.dtype))
    return y


def apply_lora(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
               scale: torch.Tensor, seg: LoraSegments) -> torch.Tensor:
    """y += LoRA delta of each token's adapter; returns y."""
    if not seg.has_lora:
        return y
    if _use_grouped(seg, a.shape[0]):
        return _apply_grouped(y, x, a, b, scale, seg)
    return expand(y, shrink(x, a, seg), b, scale, seg)
