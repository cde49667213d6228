"""The int8 base's matmul on CUDA: int8 weights (one scale per output channel) times bf16/fp16/fp32 activations.

Why our own: torch 2.13's CUDA `_weight_int8pack_mm` (what `QuantLinear` called on CUDA before) runs one thread
per output element with fp32 FMAs and no tensor cores, each thread reading its own weight row (uncoalesced across
a warp) once per activation row: on a decode step of 64 rows it reads the weights 64 times. Here a program
multiplies a tile of activation rows by a tile of output channels: each int8 weight tile is loaded once for the
tile's rows (coalesced along K, the contiguous axis), converted in registers to the activations' dtype (int8
values are exact in bf16 and fp16) and fed to `tl.dot` with fp32 sums; the channel scale multiplies once at the
end. fp32 activations use IEEE fp32 dot products (no TF32), so `--dtype float32` keeps fp32 arithmetic.

Tiles by row count (never by timing, so two processes compute the same numbers):
  rows <= 64   decode: BLOCK_M 16/32/64, 32 output channels a program, K in steps of 128, and K split over
               programs when there are too few for the SMs (memory-bound: every SM must be streaming);
               the splits' fp32 partial sums are added in a fixed order afterwards (deterministic, no atomics).
  rows > 64    prefill: 64 x 128 tiles, K in steps of 64, no split.
A row's numbers depend only on which of these bands its step's row count falls in; the thresholds are multiples
of 8, so a decode step and its CUDA-graph bucket (server/engine/cuda_graphs.py) take the same band.

Under TRITON_INTERPRET=1 (CI on CPU) the kernel runs on CPU tensors, with bf16/fp16 dot operands upcast to fp32
(the interpreter's half-precision tl.dot is unreliable), so tests check it against the dequantized reference.
"""
from __future__ import annotations

from typing import Optional

import torch

from server.core import triton_grid

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU installs without triton never route int8 here
    triton = None
    tl = None

_MAX_SPLIT_K = 8  # the most a decode-sized product's K loop is split (server.core.triton_grid.k_split)
DECODE_MAX_ROWS = 64


def available() -> bool:
    """Triton imports (the kernel then runs on CUDA tensors, or on CPU ones under TRITON_INTERPRET=1)."""
    return triton is not None


if triton is not None:
    @triton.jit
    def _int8_mm_kernel(x_ptr, w_ptr, s_ptr, out_ptr, M, N, K,
                        sx_m, sx_k, sw_n, sw_k, so_s, so_m, so_n,
                        SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, DOT_F32: tl.constexpr, SCALE: tl.constexpr):
        """out[split, m, n] = sum over this split's K blocks of x[m, k] * w[n, k] (times scale[n] when SCALE)."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        mask_m = offs_m < M
        mask_n = offs_n < N
        x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * sx_m + offs_k[None, :] * sx_k
        w_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * sw_n + offs_k[:, None] * sw_k  # [K, N] view of w^T
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kk in range(0, tl.cdiv(K, BLOCK_K * SPLIT_K)):
            k0 = (kk * SPLIT_K + pid_k) * BLOCK_K
            mask_k = (k0 + offs_k) < K
            xt = tl.load(x_ptrs + k0 * sx_k, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            wt = tl.load(w_ptrs + k0 * sw_k, mask=mask_k[:, None] & mask_n[None, :], other=0)
            if DOT_F32:
                acc += tl.dot(xt.to(tl.float32), wt.to(tl.float32), input_precision="ieee")
            else:  # bf16/fp16 operands on tensor cores, fp32 sums
                acc += tl.dot(xt, wt.to(xt.dtype))
        if SCALE:
            acc = acc * tl.load(s_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        out_ptrs = out_ptr + pid_k * so_s + offs_m[:, None].to(tl.int64) * so_m + offs_n[None, :] * so_n
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])

    # Decided when the kernel was decorated (TRITON_INTERPRET=1 at import), not at each call.
    _INTERPRETED = not isinstance(_int8_mm_kernel, triton.runtime.JITFunction)
else:  # pragma: no cover
    _INTERPRETED = False


def tiles(m: int, n: int, k: int, n_sms: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K) for an [m, k] x [k, n] product; a function of the row band only."""
    if m > DECODE_MAX_ROWS:
        return 64, 128, 64, 1
    bm, bn, bk = triton_grid.block_m(m), 32, 128
    return bm, bn, bk, triton_grid.k_split(-(-m // bm) * -(-n // bn), -(-k // bk), n_sms, _MAX_SPLIT_K)


def int8_matmul(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                split_k: Optional[int] = None) -> torch.Tensor:
    """x [M, K] (fp32, bf16 or fp16) @ (qweight [N, K'] int8 * scale[N, None])^T -> [M, N] in x's dtype.

    K' >= K: weight columns past x's K are never read (a padded weight serves an unpadded x). `split_k`
    overrides the K split of the table (tests: the interpreter has one "SM", so the table never splits there)."""
    if triton is None:
        raise RuntimeError("the int8 Triton kernel needs triton")
    if x.dim() != 2 or qweight.dim() != 2 or qweight.dtype != torch.int8:
        raise ValueError(f"int8_matmul expects x [M, K] and an int8 weight [N, K]; got {tuple(x.shape)}, "
                         f"{tuple(qweight.shape)} {qweight.dtype}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"activations must be float32, bfloat16 or float16, not {x.dtype}")
    M, K = x.shape
    N = qweight.shape[0]
    if qweight.shape[1] < K or scale.numel() != N:
        raise ValueError(f"weight [{N}, {qweight.shape[1]}] with {scale.numel()} scales cannot take K = {K}")
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return out
    if K == 0:
        return out.zero_()
    bm, bn, bk, split = tiles(M, N, K, triton_grid.sm_count(x))
    if split_k is not None:
        split = max(1, min(int(split_k), triton.cdiv(K, bk)))
    # With a split, fp32 partials [split, M, N] are added in a fixed order afterwards, then scaled.
    part = out if split == 1 else torch.empty((split, M, N), dtype=torch.float32, device=x.device)
    so_s = 0 if split == 1 else part.stride(0)
    so_m, so_n = (out.stride(0), out.stride(1)) if split == 1 else (part.stride(1), part.stride(2))
    dot_f32 = x.dtype == torch.float32 or _INTERPRETED
    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn), split)
    _int8_mm_kernel[grid](x, qweight, scale, part, M, N, K,
                          x.stride(0), x.stride(1), qweight.stride(0), qweight.stride(1), so_s, so_m, so_n,
                          SPLIT_K=split, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, DOT_F32=dot_f32, SCALE=split == 1,
                          num_warps=4, num_stages=3)
    if split == 1:
        return out
    total = part[0]
    for i in range(1, split):
        total = total + part[i]
    return out.copy_(total * scale.float()[None, :])
