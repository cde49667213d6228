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
# doing one bmm beats launching a GEMM per segment (on CUDA without Triton; on CPU
# the per-segment GEMM wins even at one token per segment, measured).
GATHER_MAX_AVG_SEGMENT = 4
# The dense path multiplies every token by every slot's A (one GEMM) and masks: it
# wins for small batches where most slots are in use (decode with many adapters).
DENSE_MAX_TOKENS = 128


def _use_gather(seg: LoraSegments) -> bool:
    n_lora = sum(1 for s in seg.slots if s != 0)
    return (seg.token_slots.is_cuda and n_lora > 0
            and seg.num_tokens <= GATHER_MAX_AVG_SEGMENT * n_lora)


def _dense_views(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """[R*S, in] and [R*S, out] views of rank-major stacks, or None if the layout does not allow it."""
    at, bt = a.transpose(0, 1), b.permute(2, 0, 1)  # [R, S, in], [R, S, out]
    if not (at.is_contiguous() and bt.is_contiguous()):
        return None
    R, S = at.shape[0], at.shape[1]
    return at.reshape(R * S, at.shape[2]), bt.reshape(R * S, bt.shape[2])


def _use_dense(seg: LoraSegments, n_slots: int) -> bool:
    n_lora = len({s for s in seg.slots if s != 0})
    return seg.num_tokens <= DENSE_MAX_TOKENS and 2 * n_lora >= n_slots - 1


def _dense_mask(seg: LoraSegments, rank: int, n_slots: int, dtype: torch.dtype) -> torch.Tensor:
    """[T, R*S] with 1 where column (r, s) belongs to the token's own slot (never slot 0)."""
    key = (rank, n_slots, dtype)
    cached = seg.cache.get(key)
    if cached is None:
        onehot = torch.nn.functional.one_hot(seg.token_slots, n_slots).to(dtype)
        onehot[:, 0] = 0
        cached = onehot[:, None, :].expand(-1, rank, -1).reshape(seg.num_tokens, rank * n_slots).contiguous()
        seg.cache[key] = cached
    return cached


def _apply_dense(y: torch.Tensor, x: torch.Tensor, a_all: torch.Tensor, b_all: torch.Tensor,
                 scale: torch.Tensor, seg: LoraSegments, rank: int, n_slots: int) -> torch.Tensor:
    v = torch.mm(x, a_all.t()).mul_(_dense_mask(seg, rank, n_slots, x.dtype))
    delta = torch.mm(v, b_all)
    y.add_(delta.mul_(scale.index_select(0, seg.token_slots).to(delta.dtype).unsqueeze(-1)))
    return y


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
    if _use_dense(seg, a.shape[0]):
        views = _dense_views(a, b)
        if views is not None:
            return _apply_dense(y, x, views[0], views[1], scale, seg, a.shape[1], a.shape[0])
    return expand(y, shrink(x, a, seg), b, scale, seg)
