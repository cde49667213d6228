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

Three paths, same result (`choose_path` picks one per step): one bmm over the slots' stacks
when the segments are even enough ("grouped"), a batched gather-matvec when they are short on
CUDA ("gather", BGMV), a GEMM per segment otherwise ("segments", SGMV). None loops over tokens
in Python; the segment loop runs once per distinct adapter in the batch.
"""
from __future__ import annotations

import weakref
from typing import Optional

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
GROUPED_MAX_PADDING = 1.5  # padded rows (slots x L) at most this many times the real tokens
# ... or, when every slot of the span is in the batch, at most this many tokens per slot: decode-like batches
# (a few sequences per adapter) whose padding rows cost little next to reading the weights, while a GEMM per
# segment costs a call each. Measured on the 2-core CPU, a SmolLM2 decode step of 16 sequences over 12 rank-8
# adapters (1-3 each): LoRA 168 -> 41 ms (bf16), 71 -> 34 ms (fp32).
GROUPED_MAX_ROWS_PER_SLOT = 8


def _slot_counts(seg: LoraSegments) -> dict[int, int]:
    """Tokens per adapter slot (slot 0 left out), from the host-side segment lists; once per step."""
    counts = seg.cache.get("counts")
    if counts is None:
        counts = {}
        for s, e, slot in zip(seg.starts, seg.ends, seg.slots):
            if slot != 0:
                counts[slot] = counts.get(slot, 0) + e - s
        seg.cache["counts"] = counts
    return counts


def _use_grouped(seg: LoraSegments) -> bool:
    counts = _slot_counts(seg)
    if not counts:
        return False
    if contiguous_run(seg) is not None:
        return True
    span, rows = max(counts) - min(counts) + 1, max(counts.values())
    if span * rows <= GROUPED_MAX_PADDING * seg.num_tokens:
        return True
    return rows <= GROUPED_MAX_ROWS_PER_SLOT and span == len(counts)


def _use_gather(seg: LoraSegments) -> bool:
    n_lora = sum(1 for s in seg.slots if s != 0)
    return (seg.token_slots.is_cuda and n_lora > 0
            and seg.num_tokens <= GATHER_MAX_AVG_SEGMENT * n_lora)


def contiguous_run(seg: LoraSegments) -> Optional[tuple[int, int, int, int]]:
    """(t0, lo, m, L) when the LoRA tokens are exactly [t0, T), slot lo..lo+m-1 with L tokens each,
    in slot order; then x[t0:].view(m, L, in) is the per-slot layout without any copy. The runner
    sorts each kind of row (decode, then prompt) by slot, so decode steps (one token per sequence,
    one sequence per adapter) and prefills of equal lengths arrive this way."""
    cached = seg.cache.get("run", False)
    if cached is not False:
        return cached
    run: Optional[tuple[int, int, int, int]] = None
    lora = [(s, e, sl) for s, e, sl in zip(seg.starts, seg.ends, seg.slots) if sl != 0]
    if lora and lora[-1][1] == seg.num_tokens:
        t0, lo, L = lora[0][0], lora[0][2], lora[0][1] - lora[0][0]
        if all(s == t0 + i * L and e - s == L and sl == lo + i for i, (s, e, sl) in enumerate(lora)):
            run = (t0, lo, len(lora), L)
    seg.cache["run"] = run
    return run


def _grouped_layout(seg: LoraSegments) -> tuple[int, int, torch.Tensor, torch.Tensor, int]:
    """Layout over the slots lo..hi the batch uses (the pool fills slots from 1 up, so this is
    usually exactly the busy ones and never slot 0): (lo, m = hi - lo + 1, gather [m * L] token
    index or T for padding, row [T] of each token in the [m * L] layout or m * L for none, L)."""
    cached = seg.cache.get("grouped")
    if cached is None:
        per_slot = _slot_counts(seg)
        lo, hi = min(per_slot), max(per_slot)
        m = hi - lo + 1
        L = max(per_slot.values())
        slots = seg.token_slots
        T = slots.shape[0]
        dev = slots.device
        lora = slots != 0
        local = torch.where(lora, slots - lo, torch.full_like(slots, m))  # m: the "no adapter" bin
        counts = torch.bincount(local, minlength=m + 1)
        order = torch.argsort(local, stable=True)
        first = torch.cumsum(counts, 0) - counts  # first sorted position of each bin
        k = torch.arange(T, device=dev) - first[local[order]]  # position within its slot
        row = torch.full((T,), m * L, dtype=torch.long, device=dev)
        row[order] = torch.where(lora[order], local[order] * L + k, row[order])
        gather = torch.full((m * L,), T, dtype=torch.long, device=dev)
        gather[row[lora]] = torch.arange(T, device=dev)[lora]
        cached = (lo, m, gather, row, L)
        seg.cache["grouped"] = cached
    return cached


def _grouped_x(x: torch.Tensor, seg: LoraSegments) -> torch.Tensor:
    """x laid out per slot; shared by the targets that read the same x (q/k/v, gate/up)."""
    hit = seg.cache.get("xg")
    if hit is not None and hit[0]() is x:
        return hit[1]
    _, m, gather, _, L = _grouped_layout(seg)
    xg = torch.cat([x, x.new_zeros((1, x.shape[1]))]).index_select(0, gather).view(m, L, x.shape[1])
    seg.cache["xg"] = (weakref.ref(x), xg)
    return xg


def run_views(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, lo: int, m: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A^T [m, in, R], B^T [m, R, out], scale [m, 1, 1]) of slots lo..lo+m-1: views, never copies,
    so they stay valid while adapters are (re)loaded in place and can be kept across steps."""
    return a[lo:lo + m].transpose(1, 2), b[lo:lo + m].transpose(1, 2), scale[lo:lo + m].view(m, 1, 1)


def apply_run(y: torch.Tensor, x: torch.Tensor, at: torch.Tensor, bt: torch.Tensor, sc: torch.Tensor,
              run: tuple[int, int, int, int]) -> torch.Tensor:
    """The grouped path for a contiguous run (see `contiguous_run`), on prepared `run_views`:
    four ops, no copies. (`baddbmm_` into y would save the add, but y is a column slice of the
    fused projection and torch then falls back to one addmm per slot: 2.5x slower, measured.)"""
    t0, _, m, L = run
    y[t0:].add_(_grouped_delta(x[t0:].view(m, L, x.shape[1]), at, bt, sc).view(m * L, -1))
    return y


def _grouped_delta(xg: torch.Tensor, at: torch.Tensor, bt: torch.Tensor, sc: torch.Tensor) -> torch.Tensor:
    """[m, L, out] = per-slot (x @ A^T) * scale @ B^T on `run_views` (the scale on v: cheaper than on the output)."""
    v = torch.bmm(xg, at)
    v.mul_(sc if sc.dtype == v.dtype else sc.to(v.dtype))
    return torch.bmm(v, bt)


def _apply_grouped(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                   scale: torch.Tensor, seg: LoraSegments) -> torch.Tensor:
    run = contiguous_run(seg)
    if run is not None:
        return apply_run(y, x, *run_views(a, b, scale, run[1], run[2]), run)
    lo, m, _, row, L = _grouped_layout(seg)
    d = _grouped_delta(_grouped_x(x, seg), *run_views(a, b, scale, lo, m)).view(m * L, -1)  # [m * L, out]
    d = torch.cat([d, d.new_zeros((1, d.shape[1]))]).index_select(0, row)
    return y.add_(d)


def choose_path(seg: LoraSegments) -> str:
    """'grouped', 'gather' or 'segments': how `apply_lora` multiplies this step (decided once per step)."""
    if _use_grouped(seg):
        return "grouped"
    return "gather" if _use_gather(seg) else "segments"


def shrink(x: torch.Tensor, a: torch.Tensor, seg: LoraSegments, gather: Optional[bool] = None) -> torch.Tensor:
    """v = x @ a[slot]^T per token; rows of slot-0 tokens are zero."""
    T = x.shape[0]
    R = a.shape[1]
    if _use_gather(seg) if gather is None else gather:
        ag = a.index_select(0, seg.token_slots)  # [T, R, in]
        return torch.bmm(ag, x.unsqueeze(-1)).squeeze(-1)
    v = x.new_zeros((T, R))
    for s, e, slot in zip(seg.starts, seg.ends, seg.slots):
        if slot != 0 and e > s:
            torch.mm(x[s:e], a[slot].t(), out=v[s:e])
    return v


def expand(y: torch.Tensor, v: torch.Tensor, b: torch.Tensor, scale: torch.Tensor,
           seg: LoraSegments, gather: Optional[bool] = None) -> torch.Tensor:
    """y += scale[slot] * (v @ b[slot]^T) per token, in place; slot-0 tokens untouched."""
    if _use_gather(seg) if gather is None else gather:
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
               scale: torch.Tensor, seg: LoraSegments, path: Optional[str] = None) -> torch.Tensor:
    """y += LoRA delta of each token's adapter; returns y. `path`: `choose_path(seg)` unless given."""
    if not seg.has_lora:
        return y
    path = path or choose_path(seg)
    if path == "grouped":
        return _apply_grouped(y, x, a, b, scale, seg)
    gather = path == "gather"
    return expand(y, shrink(x, a, seg, gather), b, scale, seg, gather)
