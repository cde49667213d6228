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

import torch

from server.lora.segments import LoraSegments

# Below this many tokens per adapter segment, gathering each token's adapter and
# doing one bmm beats launching a GEMM per segment.
GATHER_MAX_AVG_SEGMENT = 4


def _use_gather(seg: LoraSegments) -> bool:
    n_lora = sum(1 for s in seg.slots if s != 0)
    return n_lora > 0 and seg.num_tokens <= GATHER_MAX_AVG_SEGMENT * n_lora


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
    return expand(y, shrink(x, a, seg), b, scale, seg)
