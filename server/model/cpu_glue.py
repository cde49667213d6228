"""RoPE, RMSNorm and SiLU in C for the dynamic int8 path on CPU: the small ops between a layer's big kernels.

Why: a decode step of 8 tokens spends a large part of its time between its kernels. RoPE on q
and k is eight torch ops a layer, RMSNorm (with the residual add before it) seven, each a few
microseconds of dispatch on a few KB; one C call each does the same arithmetic. Both give torch's
bits, not just its values: built without contraction, so each product and sum rounds as torch's
ops round, and the RMSNorm sum adds the squares in the order of torch's CPU sum kernel (lanes of
8 or 16 floats, four interleaved accumulators cascaded in levels, then the tail, then the lanes).
Keeping torch's bits keeps the engine's int8 numbers those of the model it loads: int8 activations
amplify any last-bit change (docs/operations.md, Quantization).
Which lane width torch uses is not visible from Python (on AVX-512 machines torch 2.13 sums with
8-float lanes), so loading checks the kernel against `F.rms_norm` on random rows and keeps the
width that matches bit for bit; if none does, torch's op serves. Used where the base runs the
dynamic int8 kernel (fp32 activations, CPU); `--quantize none` keeps torch's ops.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import os
from typing import Optional

import torch
import torch.nn.functional as F

from server.core.native import NATIVE_FLAGS, NativeBuildError, build_and_load, c_source

log = logging.getLogger(__name__)

_SOURCE = c_source(__file__, "cpu_glue.c")

MAX_HEAD_DIM = 1024  # lsq_rope keeps half a head on the stack twice
MAX_NORM_DIM = 16384  # lsq_rms_norm keeps a row's squares on the stack
# Rows of the load-time check: sizes around and past each cascade level, several rows each.
_CHECK_SIZES = (17, 100, 576, 960, 2048, 4096, 5120, 8192)


class CpuGlue:
    """fp32 RoPE (in place) and RMSNorm (with its residual add) on CPU tensors, one C call each."""

    def __init__(self, lib: ctypes.CDLL):
        i, lg, p, f = ctypes.c_int, ctypes.c_long, ctypes.c_void_p, ctypes.c_float
        lib.lsq_rope.argtypes = [i, i, i, p, lg, p, p]
        lib.lsq_rms_norm.argtypes = [i, lg, p, lg, p, lg, p, lg, p, f, p, lg, i]
        lib.lsq_silu_mul.argtypes = [i, lg, p, lg, p, lg, p, lg, i]
        self._rope, self._norm, self._silu_mul = lib.lsq_rope, lib.lsq_rms_norm, lib.lsq_silu_mul
        self.norm_lanes = self._matching_lanes()
        if self.norm_lanes is None:
            log.warning("CPU RMSNorm kernel: no lane width gives torch's bits here; torch's op serves")
        self.silu_vector = self._matching_silu_vector() if lib.lsq_silu_ready() else None
        if not self.silu_exact:
            log.warning("CPU SiLU kernel: not torch's bits here (or no AVX2/FMA); torch's ops serve")

    def rope_(self, x: torch.Tensor, heads: int, head_dim: int, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Rotate the first `heads` heads of each row of x [t, >= heads * head_dim] (fp32, unit
        stride) in place; cos/sin [t, head_dim] contiguous, the rows' positions."""
        t = x.shape[0]
        if t:
            self._rope(t, heads, head_dim, x.data_ptr(), x.stride(0), cos.data_ptr(), sin.data_ptr())

    @staticmethod
    def accepts(x: torch.Tensor) -> bool:
        return x.dtype is torch.float32 and x.is_cpu and x.dim() == 2 and x.stride(1) == 1

    def norm_accepts(self, x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor) -> bool:
        return (self.norm_lanes is not None and self.accepts(x) and x.shape[1] <= MAX_NORM_DIM
                and (residual is None or (self.accepts(residual) and residual.shape == x.shape))
                and weight.dtype is torch.float32 and weight.is_contiguous() and weight.shape == x.shape[1:])

    def add_rms_norm(self, x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor,
                     eps: float, lanes: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(h, RMSNorm(h) * weight) with h = x + residual, or x itself without one: the bits of
        `h = x + residual; F.rms_norm(h, ..., weight, eps)`. Only where `norm_accepts`."""
        t, n = x.shape
        y = torch.empty_like(x)
        h = x if residual is None else torch.empty_like(x)
        if t:
            r = residual
            self._norm(t, n, x.data_ptr(), x.stride(0), None if r is None else r.data_ptr(),
                       0 if r is None else r.stride(0), None if r is None else h.data_ptr(), h.stride(0),
                       weight.data_ptr(), eps, y.data_ptr(), y.stride(0), lanes or self.norm_lanes)
        return h, y

    @property
    def silu_exact(self) -> bool:
        """The C SiLU gives torch's bits here (a row chunk matched at load)."""
        return self.silu_vector is not None

    def silu_mul(self, gu: torch.Tensor, inter: int, vector: Optional[int] = None) -> torch.Tensor:
        """silu(gu[:, :inter]) * gu[:, inter:] as a new contiguous tensor, torch's bits; only where
        `silu_exact` and `accepts(gu)`."""
        t = gu.shape[0]
        y = torch.empty(t, inter)
        if t:
            self._silu_mul(t, inter, gu.data_ptr(), gu.stride(0), gu.data_ptr() + 4 * inter, gu.stride(0),
                           y.data_ptr(), inter, vector or self.silu_vector)
        return y

    def _matching_silu_vector(self) -> Optional[int]:
        """The row chunk (32 or 16 floats) with which the kernel gives `F.silu(g) * u`'s bits on random
        rows of every scale, with tails, infinities and NaN."""
        g = torch.Generator().manual_seed(0)
        rows = []
        for n in (8, 13, 45, 1000, 1536):
            gu = torch.randn(7, 2 * n, generator=g) * torch.logspace(-3, 2.3, 7)[:, None]
            gu[0, :4] = torch.tensor([float("inf"), -float("inf"), float("nan"), -0.0])
            rows.append((gu, n, (F.silu(gu[:, :n]) * gu[:, n:]).view(torch.int32)))
        for vector in (32, 16):
            if all(torch.equal(self.silu_mul(gu, n, vector).view(torch.int32), want) for gu, n, want in rows):
                return vector
        return None

    def _matching_lanes(self) -> Optional[int]:
        """The lane width (8 or 16) with which the kernel gives `F.rms_norm`'s bits on random rows."""
        g = torch.Generator().manual_seed(0)
        rows = [(torch.randn(9, n, generator=g) * torch.rand(9, 1, generator=g) * 10, torch.randn(n, generator=g))
                for n in _CHECK_SIZES]
        for lanes in (8, 16):
            if all(torch.equal(self.add_rms_norm(x, None, w, 1e-5, lanes)[1], F.rms_norm(x, (x.shape[1],), w, 1e-5))
                   for x, w in rows):
                return lanes
        return None


@functools.lru_cache(maxsize=None)
def load() -> Optional[CpuGlue]:
    """The kernel, built on first use; None (logged once) where they cannot be had or
    LORASERVE_CPU_GLUE=0 turns it off (torch's ops then serve, as with `--quantize none`)."""
    if os.environ.get("LORASERVE_CPU_GLUE", "1") == "0":
        log.info("CPU RoPE/RMSNorm kernels: off (LORASERVE_CPU_GLUE=0)")
        return None
    try:
        # No fused multiply-adds: each product and sum then rounds as torch's ops do (the same bits).
        glue = CpuGlue(build_and_load("cpu_glue", _SOURCE, (*NATIVE_FLAGS, "-ffp-contract=off")))
    except NativeBuildError as e:
        log.warning("CPU RoPE/RMSNorm kernels unavailable (%s); torch's ops serve", e)
        return None
    return glue
