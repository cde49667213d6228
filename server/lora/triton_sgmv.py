"""Triton kernels for segmented (SGMV) and per-token gathered (BGMV) LoRA matmuls.

Same signature and semantics as `server/lora/torch_ref.py`, which is the
specification (shapes are documented there); the Triton backend
(`server/lora/triton_backend.py`) runs them on CUDA, one `apply_lora_fused` per base
projection. Every kernel accumulates in fp32 and rounds once when it writes.

Kernels
    shrink  v[T, R] = x[T, in] @ a[slot]^T       SGMV: a program per (segment, M tile,
                                                   R tile, K split); BGMV: per (token, R tile, K split)
    expand  y[T, out] += scale * v @ b[slot]^T    SGMV: per (segment, M tile, target x N tile);
                                                   BGMV: per (token, target x N tile)
Slot-0 (no adapter) segments and tokens, and empty segments, launch programs that
return at once. Ranks of any size work (R is tiled, padded to a power of two only
inside a tile and masked); the pool's ranks 8..128 are the measured range.
Inputs may be non-contiguous: every tensor is addressed through its strides.
fp32 inputs use IEEE fp32 dot products (no TF32) so they match the reference.
Under TRITON_INTERPRET=1 (CI on CPU) bf16 dot operands are upcast to fp32,
because the interpreter's bf16 tl.dot returns garbage; on a GPU they stay bf16.

SGMV vs BGMV. SGMV reads each adapter's weights once per M tile and feeds tensor
cores; it wastes most of a 16-row tile when segments hold one token. BGMV is a
gather-matvec per token. `auto` takes BGMV when the adapter segments average
fewer than `BGMV_MAX_AVG_SEGMENT` tokens (decode with distinct adapters), SGMV
otherwise. BGMV's grid depends only on T, so it is the one to capture in a CUDA
graph (pass `mode="bgmv"`); SGMV's grid depends on the segment count.

Fused targets, paged rows. Targets that read the same x (q/k/v, gate/up) share one
shrink and one expand: the pool keeps a projection's targets in one tensor each, as rank
rows (`server/lora/stacks.py`: A as [G, P, in], B^T as per-target [P, out] blocks, scales
[G, N_slots]) that a page table [N_slots, R] maps each slot's ranks to, and
`apply_lora_fused(y_cat, x, FusedLora.of(stacks), seg, rank=r)` adds every target's delta,
over its first r ranks, into the fused base output y_cat ([T, sum(out)], the output of one
qkv matmul) in one shrink launch (x read once) and one expand launch; each program reads
its slot's row numbers from the page table (the PAGED variants of the kernels) and gathers
those rows. o and down are projections of one. The per-target `shrink`/`expand`/`apply_lora`
take plain per-slot stacks ([N, R, in], [N, out, R]), the reference's layout.

Measurements: NOT YET MEASURED. No GPU was lent while this was written, so which
of Triton SGMV/BGMV (per target or fused per projection), the torch reference and
torch._grouped_mm (`benchmarks/lora_variants.py`) is fastest is still open; the
Triton backend runs the fused kernels until it is. Measure with
    python -m benchmarks.gpu_kernels --shape 1b --out results/gpu_kernels_1b.json
    python -m benchmarks.gpu_kernels --shape 8b --out results/gpu_kernels_8b.json
and put the table (us per call for B = 1..64, Distinct/Uniform/Identical) here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from server.core import triton_grid
from server.lora.segments import LoraSegments
from server.lora.stacks import ProjectionStacks

# Below this average adapter-segment length, `auto` uses the per-token gather kernels.
BGMV_MAX_AVG_SEGMENT = 2.0
_MAX_SPLIT_K = 16  # the most shrink's K (in_features) loop is split (server.core.triton_grid.k_split)

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _a_rows(pages_ptr, sp_n, slot, offs_r, mask_r, R_PER, sa_n, sa_g, sa_r, PAGED: tl.constexpr):
    """Offsets of the A rows output columns offs_r read: rank offs_r % R_PER of group offs_r // R_PER (groups
    sa_g apart), at row pages[slot, rank] of the pool's rows (PAGED) or of slot `slot`'s own block."""
    rank = offs_r % R_PER
    if PAGED:
        row = tl.load(pages_ptr + slot * sp_n + rank, mask=mask_r, other=0).to(tl.int64)
        return (offs_r // R_PER) * sa_g + row * sa_r
    return slot * sa_n + (offs_r // R_PER) * sa_g + rank * sa_r


@triton.jit
def _sgmv_shrink_kernel(
    x_ptr, a_ptr, out_ptr, seg_starts_ptr, seg_slots_ptr, pages_ptr,
    K, R, R_PER,
    sx_t, sx_k, sa_n, sa_g, sa_r, sa_k, so_s, so_t, so_r, sp_n,
    SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr, IEEE: tl.constexpr, DOT_F32: tl.constexpr, PAGED: tl.constexpr,
):
    """out[k_split, t, r] = sum over this split's K of x[t, k] * (A row of column r of slot)[k]; output column r
    reads rank r % R_PER of group r // R_PER (groups sa_g apart: the targets of a fused projection; one group
    when R_PER == R), found through the page table when PAGED (`_a_rows`)."""
    pid_s = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_rk = tl.program_id(2)
    pid_r = pid_rk // SPLIT_K
    pid_k = pid_rk % SPLIT_K
    slot = tl.load(seg_slots_ptr + pid_s).to(tl.int64)
    start = tl.load(seg_starts_ptr + pid_s)
    end = tl.load(seg_starts_ptr + pid_s + 1)
    m0 = start + pid_m * BLOCK_M
    if slot == 0 or m0 >= end:
        return
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < end
    mask_r = offs_r < R
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * sx_t + offs_k[None, :] * sx_k
    a_rows = _a_rows(pages_ptr, sp_n, slot, offs_r, mask_r, R_PER, sa_n, sa_g, sa_r, PAGED)
    a_ptrs = a_ptr + a_rows[None, :] + offs_k[:, None] * sa_k  # [K, R] view of a^T
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for kk in range(0, tl.cdiv(K, BLOCK_K * SPLIT_K)):
        k0 = (kk * SPLIT_K + pid_k) * BLOCK_K
        mask_k = (k0 + offs_k) < K
        xt = tl.load(x_ptrs + k0 * sx_k, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        at = tl.load(a_ptrs + k0 * sa_k, mask=mask_k[:, None] & mask_r[None, :], other=0.0).to(xt.dtype)
        if DOT_F32:
            acc += tl.dot(xt.to(tl.float32), at.to(tl.float32), input_precision="ieee")
        elif IEEE:
            acc += tl.dot(xt, at, input_precision="ieee")
        else:
            acc += tl.dot(xt, at)
    out_ptrs = out_ptr + pid_k * so_s + offs_m[:, None].to(tl.int64) * so_t + offs_r[None, :] * so_r
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def _bgmv_shrink_kernel(
    x_ptr, a_ptr, out_ptr, token_slots_ptr, pages_ptr,
    K, R, R_PER,
    sx_t, sx_k, sa_n, sa_g, sa_r, sa_k, so_s, so_t, so_r, sp_n,
    SPLIT_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, PAGED: tl.constexpr,
):
    """Per-token gather-matvec: out[k_split, t, r] = sum_k x[t, k] * a[slot_t, row r, k], rows as in
    `_sgmv_shrink_kernel`."""
    t = tl.program_id(0)
    pid_rk = tl.program_id(1)
    pid_r = pid_rk // SPLIT_K
    pid_k = pid_rk % SPLIT_K
    slot = tl.load(token_slots_ptr + t).to(tl.int64)
    if slot == 0:
        return
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    mask_r = offs_r < R
    x_row = x_ptr + t.to(tl.int64) * sx_t
    a_rows = _a_rows(pages_ptr, sp_n, slot, offs_r, mask_r, R_PER, sa_n, sa_g, sa_r, PAGED)
    a_ptrs = a_ptr + a_rows[:, None] + offs_k[None, :] * sa_k  # [R, K]
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for kk in range(0, tl.cdiv(K, BLOCK_K * SPLIT_K)):
        k0 = (kk * SPLIT_K + pid_k) * BLOCK_K
        mask_k = (k0 + offs_k) < K
        xv = tl.load(x_row + (k0 + offs_k) * sx_k, mask=mask_k, other=0.0).to(tl.float32)
        at = tl.load(a_ptrs + k0 * sa_k, mask=mask_r[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(at * xv[None, :], axis=1)
    out_ptrs = out_ptr + pid_k * so_s + t.to(tl.int64) * so_t + offs_r * so_r
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_r)


@triton.jit
def _sgmv_expand_kernel(
    v_ptr, b_ptr, y_ptr, scale_ptr, seg_starts_ptr, seg_slots_ptr, out_offsets_ptr, pages_ptr,
    R, N_TILES,
    sv_t, sv_r, sb_n, sb_lo, sb_o, sb_r, sb_rw, sy_t, sy_o, ss_g, sp_n,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, IEEE: tl.constexpr,
    DOT_F32: tl.constexpr, PAGED: tl.constexpr,
):
    """y[t, o] += scale[g, slot] * sum_r v[t, g*R + r] * B_g[slot, o, r] for target g owning column o.

    B_g[slot, o, r] is at slot*sb_n + o_lo*sb_lo + (o - o_lo)*sb_o + q*(sb_r + (o_hi - o_lo)*sb_rw) with
    q = r, or q = pages[slot, r] when PAGED (then sb_n = 0): one [N, out, R] tensor (sb_lo = sb_o, sb_rw = 0),
    or a projection's per-target blocks of B^T rows (`apply_lora_fused`)."""
    pid_s = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_gn = tl.program_id(2)
    g = pid_gn // N_TILES
    pid_n = pid_gn % N_TILES
    slot = tl.load(seg_slots_ptr + pid_s).to(tl.int64)
    start = tl.load(seg_starts_ptr + pid_s)
    end = tl.load(seg_starts_ptr + pid_s + 1)
    o_lo = tl.load(out_offsets_ptr + g)
    o_hi = tl.load(out_offsets_ptr + g + 1)
    m0 = start + pid_m * BLOCK_M
    n0 = o_lo + pid_n * BLOCK_N
    if slot == 0 or m0 >= end or n0 >= o_hi:
        return
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < end
    mask_n = offs_n < o_hi
    v_ptrs = v_ptr + offs_m[:, None].to(tl.int64) * sv_t + (g * R + offs_r[None, :]) * sv_r
    sbr = sb_r + (o_hi - o_lo) * sb_rw  # this target's rank stride
    b_base = b_ptr + slot * sb_n + o_lo.to(tl.int64) * sb_lo
    b_cols = b_base + (offs_n - o_lo)[None, :].to(tl.int64) * sb_o  # [1, N]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        mask_r = (r0 + offs_r) < R
        if PAGED:
            q = tl.load(pages_ptr + slot * sp_n + r0 + offs_r, mask=mask_r, other=0).to(tl.int64)
        else:
            q = (r0 + offs_r).to(tl.int64)
        vt = tl.load(v_ptrs + r0 * sv_r, mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        bt = tl.load(b_cols + q[:, None] * sbr, mask=mask_r[:, None] & mask_n[None, :], other=0.0)
        vt = vt.to(bt.dtype)
        if DOT_F32:
            acc += tl.dot(vt.to(tl.float32), bt.to(tl.float32), input_precision="ieee")
        elif IEEE:
            acc += tl.dot(vt, bt, input_precision="ieee")
        else:
            acc += tl.dot(vt, bt)
    scale = tl.load(scale_ptr + g * ss_g + slot).to(tl.float32)
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * sy_t + offs_n[None, :] * sy_o
    mask = mask_m[:, None] & mask_n[None, :]
    y = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + acc * scale).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bgmv_expand_kernel(
    v_ptr, b_ptr, y_ptr, scale_ptr, token_slots_ptr, out_offsets_ptr, pages_ptr,
    R, N_TILES,
    sv_t, sv_r, sb_n, sb_lo, sb_o, sb_r, sb_rw, sy_t, sy_o, ss_g, sp_n,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, PAGED: tl.constexpr,
):
    """Per-token gather-matvec expand, same sum as `_sgmv_expand_kernel`."""
    t = tl.program_id(0)
    pid_gn = tl.program_id(1)
    g = pid_gn // N_TILES
    pid_n = pid_gn % N_TILES
    slot = tl.load(token_slots_ptr + t).to(tl.int64)
    o_lo = tl.load(out_offsets_ptr + g)
    o_hi = tl.load(out_offsets_ptr + g + 1)
    n0 = o_lo + pid_n * BLOCK_N
    if slot == 0 or n0 >= o_hi:
        return
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    mask_n = offs_n < o_hi
    v_row = v_ptr + t.to(tl.int64) * sv_t + g * R * sv_r
    sbr = sb_r + (o_hi - o_lo) * sb_rw  # this target's rank stride
    b_base = b_ptr + slot * sb_n + o_lo.to(tl.int64) * sb_lo
    b_cols = b_base + (offs_n - o_lo)[:, None].to(tl.int64) * sb_o  # [N, 1]
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        mask_r = (r0 + offs_r) < R
        if PAGED:
            q = tl.load(pages_ptr + slot * sp_n + r0 + offs_r, mask=mask_r, other=0).to(tl.int64)
        else:
            q = (r0 + offs_r).to(tl.int64)
        vv = tl.load(v_row + (r0 + offs_r) * sv_r, mask=mask_r, other=0.0).to(tl.float32)
        bt = tl.load(b_cols + q[None, :] * sbr, mask=mask_n[:, None] & mask_r[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(bt * vv[None, :], axis=1)
    scale = tl.load(scale_ptr + g * ss_g + slot).to(tl.float32)
    y_ptrs = y_ptr + t.to(tl.int64) * sy_t + offs_n * sy_o
    y = tl.load(y_ptrs, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + acc * scale).to(y_ptr.dtype.element_ty), mask=mask_n)


# ----------------------------------------------------------------------------- launch helpers

# Decided when the kernels were decorated (TRITON_INTERPRET=1 at import), not at each call.
_INTERPRETED = not isinstance(_sgmv_shrink_kernel, triton.runtime.JITFunction)


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _dot_in_f32(dtype: torch.dtype) -> bool:
    """Triton's CPU interpreter (3.x) computes bf16 tl.dot wrongly, so it gets fp32 operands there."""
    return dtype == torch.bfloat16 and _INTERPRETED


def _check_dtype(t: torch.Tensor, what: str) -> None:
    if t.dtype not in _TL_DTYPES:
        raise TypeError(f"{what} must be float32, bfloat16 or float16, not {t.dtype}")


def _lora_segments(seg: LoraSegments) -> tuple[int, int]:
    """(number of adapter segments, tokens in them), from the host-side lists."""
    n = tot = 0
    for s, e, slot in zip(seg.starts, seg.ends, seg.slots):
        if slot != 0 and e > s:
            n += 1
            tot += e - s
    return n, tot


def pick_mode(seg: LoraSegments) -> str:
    """'bgmv' when adapter segments are short on average (decode with distinct adapters), else 'sgmv'."""
    n, tot = _lora_segments(seg)
    return "bgmv" if n and tot < BGMV_MAX_AVG_SEGMENT * n else "sgmv"


def _split_k(programs: int, k_blocks: int, n_sms: int, split_k: Optional[int]) -> int:
    if split_k is not None:
        return max(1, min(int(split_k), k_blocks))
    return triton_grid.k_split(programs, k_blocks, n_sms, _MAX_SPLIT_K)


def _check_shrink(x: torch.Tensor, a: torch.Tensor, seg: LoraSegments) -> None:
    if x.dim() != 2 or a.dim() != 3:
        raise ValueError(f"shrink expects x [T, in] and a [N, R, in]; got {tuple(x.shape)} and {tuple(a.shape)}")
    if x.shape[1] != a.shape[2]:
        raise ValueError(f"in_features differ: x has {x.shape[1]}, a has {a.shape[2]}")
    if x.shape[0] != seg.num_tokens:
        raise ValueError(f"x has {x.shape[0]} tokens, segments cover {seg.num_tokens}")
    _check_dtype(x, "x")
    _check_dtype(a, "a")


# ----------------------------------------------------------------------------- public API


def shrink(x: torch.Tensor, a: torch.Tensor, seg: LoraSegments, *, mode: str = "auto",
           split_k: Optional[int] = None, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """v = x @ a[slot]^T per token ([T, R], x's dtype unless out_dtype); slot-0 rows are zero.

    mode: auto | sgmv | bgmv. split_k: how many programs share one row's K loop
    (default: enough to fill the GPU); partial sums go to an fp32 buffer that is
    summed in a fixed order, so results are deterministic.
    """
    _check_shrink(x, a, seg)
    sa_n, sa_r, sa_k = a.stride()
    return _shrink(x, a, (sa_n, 0, sa_r, sa_k), seg, groups=1, rank=a.shape[1], pages=None, mode=mode,
                   split_k=split_k, out_dtype=out_dtype)


def _shrink(x: torch.Tensor, a: torch.Tensor, a_strides: tuple[int, int, int, int], seg: LoraSegments, *,
            groups: int, rank: int, pages: Optional[torch.Tensor], mode: str, split_k: Optional[int],
            out_dtype: Optional[torch.dtype]) -> torch.Tensor:
    """v [T, groups * rank]: column g*rank + j is x . (rank j of group g's A for the token's slot), with
    a_strides = (slot, group, rank row, k) strides of a; with `pages` [N, R] the rank row is pages[slot, j]
    and the slot stride is not used (groups: fused targets)."""
    T, K = x.shape
    R = groups * rank
    out_dtype = out_dtype or x.dtype
    n_lora, _ = _lora_segments(seg)
    if T == 0 or n_lora == 0:
        return x.new_zeros((T, R), dtype=out_dtype)
    mode = pick_mode(seg) if mode == "auto" else mode
    ieee = x.dtype == torch.float32
    if mode == "sgmv":
        block_m = triton_grid.block_m(seg.max_segment_len)
        block_r = min(max(16, _pow2(R)), 64)
        block_k = 32 if ieee else 64
        m_tiles = triton.cdiv(seg.max_segment_len, block_m)
        r_tiles = triton.cdiv(R, block_r)
        sk = _split_k(n_lora * m_tiles * r_tiles, triton.cdiv(K, block_k), triton_grid.sm_count(x), split_k)
    elif mode == "bgmv":
        block_r = min(_pow2(R), 64)
        block_k = max(32, min(256, 8192 // block_r))
        r_tiles = triton.cdiv(R, block_r)
        sk = _split_k(T * r_tiles, triton.cdiv(K, block_k), triton_grid.sm_count(x), split_k)
    else:
        raise ValueError(f"mode must be auto, sgmv or bgmv, not {mode!r}")
    # One partial per K split, fp32, zero where no program writes (slot 0, padding).
    part_dtype = out_dtype if sk == 1 else torch.float32
    part = torch.zeros((sk, T, R), dtype=part_dtype, device=x.device)
    paged = pages is not None
    page_table = pages if paged else seg.seg_slots  # an unread stand-in when not paged
    strides = (*x.stride(), *a_strides, *part.stride(), page_table.stride(0) if paged else 0)
    if mode == "sgmv":
        grid = (len(seg.slots), m_tiles, r_tiles * sk)
        _sgmv_shrink_kernel[grid](
            x, a, part, seg.seg_starts, seg.seg_slots, page_table, K, R, rank, *strides,
            SPLIT_K=sk, BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=block_k, IEEE=ieee,
            DOT_F32=_dot_in_f32(x.dtype), PAGED=paged)
    else:
        grid = (T, r_tiles * sk)
        _bgmv_shrink_kernel[grid](
            x, a, part, seg.token_slots, page_table, K, R, rank, *strides,
            SPLIT_K=sk, BLOCK_R=block_r, BLOCK_K=block_k, PAGED=paged)
    if sk == 1:
        return part[0]
    return part.sum(0).to(out_dtype)


def _expand_launch(y: torch.Tensor, v: torch.Tensor, b: torch.Tensor, b_strides: tuple[int, int, int, int, int],
                   scales: torch.Tensor, out_offsets: torch.Tensor, out_sizes: Sequence[int], seg: LoraSegments,
                   mode: str, pages: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Shared by expand and apply_lora_fused: b addressed by b_strides = (sb_n, sb_lo, sb_o, sb_r, sb_rw)
    (see `_sgmv_expand_kernel`), scales [G, N_slots], out_offsets [G + 1] int32; ranks through `pages`."""
    T = y.shape[0]
    n_lora, _ = _lora_segments(seg)
    if T == 0 or n_lora == 0:
        return y
    G = len(out_sizes)
    R = v.shape[1] // G
    mode = pick_mode(seg) if mode == "auto" else mode
    max_out = max(out_sizes)
    paged = pages is not None
    page_table = pages if paged else seg.seg_slots  # an unread stand-in when not paged
    strides = (*v.stride(), *b_strides, *y.stride(), scales.stride(0), page_table.stride(0) if paged else 0)
    if mode == "sgmv":
        block_m = triton_grid.block_m(seg.max_segment_len)
        block_n = 64 if max_out <= 2048 else 128
        block_r = min(max(16, _pow2(R)), 64)
        n_tiles = triton.cdiv(max_out, block_n)
        grid = (len(seg.slots), triton.cdiv(seg.max_segment_len, block_m), G * n_tiles)
        _sgmv_expand_kernel[grid](
            v, b, y, scales, seg.seg_starts, seg.seg_slots, out_offsets, page_table, R, n_tiles, *strides,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r, IEEE=b.dtype == torch.float32,
            DOT_F32=_dot_in_f32(b.dtype), PAGED=paged)
    elif mode == "bgmv":
        block_r = min(_pow2(R), 64)
        block_n = max(32, min(256, 8192 // block_r))
        n_tiles = triton.cdiv(max_out, block_n)
        grid = (T, G * n_tiles)
        _bgmv_expand_kernel[grid](
            v, b, y, scales, seg.token_slots, out_offsets, page_table, R, n_tiles, *strides,
            BLOCK_N=block_n, BLOCK_R=block_r, PAGED=paged)
    else:
        raise ValueError(f"mode must be auto, sgmv or bgmv, not {mode!r}")
    return y


def _out_offsets(out_sizes: Sequence[int], device: torch.device) -> torch.Tensor:
    offs = [0]
    for n in out_sizes:
        offs.append(offs[-1] + int(n))
    return torch.tensor(offs, dtype=torch.int32, device=device)


def expand(y: torch.Tensor, v: torch.Tensor, b: torch.Tensor, scale: torch.Tensor,
           seg: LoraSegments, *, mode: str = "auto") -> torch.Tensor:
    """y += scale[slot] * (v @ b[slot]^T) per token, in place; slot-0 tokens untouched; returns y."""
    if y.dim() != 2 or v.dim() != 2 or b.dim() != 3:
        raise ValueError(f"expand expects y [T, out], v [T, R], b [N, out, R]; got "
                         f"{tuple(y.shape)}, {tuple(v.shape)}, {tuple(b.shape)}")
    if b.shape[1] != y.shape[1] or b.shape[2] != v.shape[1] or v.shape[0] != y.shape[0]:
        raise ValueError(f"shapes disagree: y {tuple(y.shape)}, v {tuple(v.shape)}, b {tuple(b.shape)}")
    if y.shape[0] != seg.num_tokens:
        raise ValueError(f"y has {y.shape[0]} tokens, segments cover {seg.num_tokens}")
    for t, what in ((y, "y"), (v, "v"), (b, "b")):
        _check_dtype(t, what)
    scales = scale.reshape(1, -1)
    out_offsets = _out_offsets([y.shape[1]], y.device)
    b_strides = (b.stride(0), b.stride(1), b.stride(1), b.stride(2), 0)
    return _expand_launch(y, v, b, b_strides, scales, out_offsets, [y.shape[1]], seg, mode)


def apply_lora(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
               scale: torch.Tensor, seg: LoraSegments, *, mode: str = "auto") -> torch.Tensor:
    """y += LoRA delta of each token's adapter, one target; returns y."""
    if not seg.has_lora:
        return y
    mode = pick_mode(seg) if mode == "auto" else mode
    return expand(y, shrink(x, a, seg, mode=mode), b, scale, seg, mode=mode)


# ----------------------------------------------------------------------------- fused targets


@dataclass(frozen=True)
class FusedLora:
    """A base projection's rank rows (the pool's `ProjectionStacks`: A [G, P, in], B^T per-target [P, w_g]
    blocks, scales [G, N], the page table [N, R]) as `apply_lora_fused` reads them: the tensors themselves, no
    copy, so adapters loaded later show through, plus the targets' output column offsets on the device. Built
    once per projection and layer by the Triton backend."""

    stacks: ProjectionStacks
    out_offsets: torch.Tensor  # [G + 1] int32

    @classmethod
    def of(cls, stacks: ProjectionStacks) -> "FusedLora":
        if stacks.a.stride(2) != 1 or stacks.scale.stride(1) != 1 or not stacks.bt.is_contiguous():
            raise ValueError("the fused kernels read the pool's row-major rank rows")
        if stacks.pages.dtype != torch.int32 or not stacks.pages.is_contiguous():
            raise ValueError("the page table must be contiguous int32")
        return cls(stacks, _out_offsets(stacks.widths, stacks.a.device))


def apply_lora_fused(y_cat: torch.Tensor, x: torch.Tensor, fused: FusedLora, seg: LoraSegments,
                     *, rank: Optional[int] = None, mode: str = "auto") -> torch.Tensor:
    """y_cat[:, target g's columns] += scale_g[slot] * (x A_g[slot]^T) B_g[slot]^T for every target g of
    the projection, over the first `rank` ranks (default: all R), each slot's ranks found through the page
    table; returns y_cat.

    One shrink (x read once for all targets) and one expand launch.
    """
    st = fused.stacks
    if y_cat.dim() != 2 or y_cat.shape[1] != sum(st.widths) or y_cat.shape[0] != x.shape[0]:
        raise ValueError(f"y_cat {tuple(y_cat.shape)} does not match x rows {x.shape[0]} "
                         f"and fused outputs {st.widths}")
    r = st.max_rank if rank is None else int(rank)
    if not 1 <= r <= st.max_rank:
        raise ValueError(f"rank {r} outside 1..{st.max_rank}")
    _check_shrink(x, st.a, seg)
    for t, what in ((y_cat, "y_cat"), (st.bt, "b")):
        _check_dtype(t, what)
    if not seg.has_lora:
        return y_cat
    mode = pick_mode(seg) if mode == "auto" else mode
    a_strides = (0, st.a.stride(0), st.a.stride(1), st.a.stride(2))
    v = _shrink(x, st.a, a_strides, seg, groups=len(st.widths), rank=r, pages=st.pages, mode=mode, split_k=None,
                out_dtype=None)
    # Target g's B^T rows are a [P, w_g] block at P * o_g: row q of target g at P * o_g + q * w_g.
    b_strides = (0, st.num_rows, 1, 0, 1)
    return _expand_launch(y_cat, v, st.bt, b_strides, st.scale, fused.out_offsets, st.widths, seg, mode,
                          pages=st.pages)
