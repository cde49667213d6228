"""RoPE and RMSNorm in C for the dynamic int8 path on CPU: the small ops between a layer's big kernels.

Why: a decode step of 8 tokens spends a large part of its time between its kernels. RoPE on q
and k is eight torch ops a layer, RMSNorm (with the residual add before it) seven, each a few
microseconds of dispatch on a few KB; one C call each does the same arithmetic. Both give torch's
bits, not just its values: built without contraction, so each product and sum rounds as torch's
ops round, and the RMSNorm sum adds the squares in the order of torch's CPU sum kernel (lanes of
8 or 16 floats, four interleaved accumulators cascaded in levels, then the tail, then the lanes).
That order matters: a C RMSNorm with its own order (agreeing to 2e-7) moved the int8 model's
perplexity from +0.53% to +1.39% over `none`, because int8 activations amplify any last-bit change.
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

from server.core.native import NATIVE_FLAGS, NativeBuildError, build_and_load

log = logging.getLogger(__name__)

_SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>

#define MAX_NORM_DIM 16384

typedef float v16 __attribute__((vector_size(64)));

static inline v16 load16(const float* p) { v16 v; memcpy(&v, p, sizeof v); return v; }
static inline void store16(float* p, v16 v) { memcpy(p, &v, sizeof v); }

/* In place on the first nr heads of hd floats of each of t rows (row stride rs): HF's rotate-half
   RoPE, x * cos + rotate_half(x) * sin, with the row's cos and sin (tables of hd floats each);
   built without contraction, so bit for bit torch's three ops. */
void lsq_rope(int t, int nr, int hd, float* x, long rs, const float* cos, const float* sin) {
  const int half = hd / 2;
  for (int i = 0; i < t; i++) {
    const float* c = cos + (long)i * hd;
    const float* s = sin + (long)i * hd;
    for (int h = 0; h < nr; h++) {
      float* v = x + (long)i * rs + (long)h * hd;
      float lo[512], hi[512];
      memcpy(lo, v, sizeof(float) * half);
      memcpy(hi, v + half, sizeof(float) * half);
      for (int j = 0; j < half; j++) {
        v[j] = lo[j] * c[j] + (-hi[j]) * s[j];
        v[j + half] = hi[j] * c[j + half] + lo[j] * s[j + half];
      }
    }
  }
}

static inline int ceil_log2(long x) {
  if (x <= 2) return 1;
  int bits = 0;
  for (unsigned long v = (unsigned long)(x - 1); v; v >>= 1) bits++;
  return bits;
}

/* The float sum of sq[0..n) in the order of torch's CPU sum kernel with lanes of W floats: the
   W-wide vectors of the row, read as rows of 4, summed into 4 accumulators cascaded in levels of
   2^p vector rows; the leftover vectors into the first accumulator; the 4 accumulators; then the
   scalar tail and the W lanes in order. W is a constant where it is inlined, so the lane loops vectorize. */
static inline __attribute__((always_inline)) float torch_sum(const float* sq, long n, const int W) {
  const long nv = n / W, rows = nv / 4;
  int p = ceil_log2(rows) / 4;
  if (p < 4) p = 4;
  const long step = 1L << p, mask = step - 1;
  float acc[4][4][16];
  memset(acc, 0, sizeof acc);
  long i = 0;
  for (; i + step <= rows;) {
    for (long j = 0; j < step; ++j, ++i)
      for (int k = 0; k < 4; k++)
        for (int l = 0; l < W; l++) acc[0][k][l] += sq[(i * 4 + k) * W + l];
    for (int j = 1; j < 4; ++j) {
      for (int k = 0; k < 4; k++)
        for (int l = 0; l < W; l++) { acc[j][k][l] += acc[j - 1][k][l]; acc[j - 1][k][l] = 0.f; }
      if ((i & (mask << (j * p))) != 0) break;
    }
  }
  for (; i < rows; ++i)
    for (int k = 0; k < 4; k++)
      for (int l = 0; l < W; l++) acc[0][k][l] += sq[(i * 4 + k) * W + l];
  for (int j = 1; j < 4; ++j)
    for (int k = 0; k < 4; k++)
      for (int l = 0; l < W; l++) acc[0][k][l] += acc[j][k][l];
  for (long v = rows * 4; v < nv; ++v)
    for (int l = 0; l < W; l++) acc[0][0][l] += sq[v * W + l];
  for (int k = 1; k < 4; k++)
    for (int l = 0; l < W; l++) acc[0][0][l] += acc[0][k][l];
  float s = 0.f;
  for (long c = nv * W; c < n; ++c) s += sq[c];
  for (int l = 0; l < W; l++) s += acc[0][0][l];
  return s;
}

static inline __attribute__((always_inline)) void norm_row(
    long n, const float* x, const float* r, float* h, const float* w, float eps, float* y, const int W) {
  float sq[MAX_NORM_DIM];
  const float* src = x;
  if (r) {  /* the residual add first: h = x + r, normalized */
    for (long c = 0; c < n; c++) h[c] = x[c] + r[c];
    src = h;
  }
  for (long c = 0; c < n; c++) sq[c] = src[c] * src[c];
  const float mean = torch_sum(sq, n, W) / (float)n;
  const float rs = 1.f / sqrtf(mean + eps);
  for (long c = 0; c < n; c++) y[c] = (src[c] * rs) * w[c];
}

/* y = RMSNorm(x (+ r)) * w over t rows of n floats (row strides xs, rs, hs, ys); with r, the sum
   x + r is also written to h. Torch's bits with torch's sum lane width W (8 or 16). */
void lsq_rms_norm(int t, long n, const float* x, long xs, const float* r, long rs, float* h, long hs,
                  const float* w, float eps, float* y, long ys, int W) {
  #pragma omp parallel for schedule(static) if(t >= 64)
  for (int i = 0; i < t; i++) {
    const float* ri = r ? r + (long)i * rs : 0;
    float* hi = r ? h + (long)i * hs : 0;
    if (W == 16) norm_row(n, x + (long)i * xs, ri, hi, w, eps, y + (long)i * ys, 16);
    else norm_row(n, x + (long)i * xs, ri, hi, w, eps, y + (long)i * ys, 8);
  }
}
"""

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
        self._rope, self._norm = lib.lsq_rope, lib.lsq_rms_norm
        self.norm_lanes = self._matching_lanes()
        if self.norm_lanes is None:
            log.warning("CPU RMSNorm kernel: no lane width gives torch's bits here; torch's op serves")

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
