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

/* out = silu(g) * u over t rows of n floats: torch's bits. torch computes silu as x / (1 + exp(-x)) with
   SLEEF's expf (the u10 variant, fused multiply-adds), element by element, so the same steps in the same
   order give the same floats; needs AVX2 and FMA (lsq_silu_ready says whether this build has them), and
   loading checks the bits against torch's op before using it. */
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
static inline __m256 sleef_expf(__m256 d) {
  const __m256i q = _mm256_cvtps_epi32(_mm256_mul_ps(d, _mm256_set1_ps(1.442695040888963407359924681f)));
  const __m256 qf = _mm256_cvtepi32_ps(q);
  __m256 s = _mm256_fmadd_ps(qf, _mm256_set1_ps(-0.693145751953125f), d);
  s = _mm256_fmadd_ps(qf, _mm256_set1_ps(-1.428606765330187045e-06f), s);
  __m256 u = _mm256_set1_ps(0.000198527617612853646278381f);
  u = _mm256_fmadd_ps(u, s, _mm256_set1_ps(0.00139304355252534151077271f));
  u = _mm256_fmadd_ps(u, s, _mm256_set1_ps(0.00833336077630519866943359f));
  u = _mm256_fmadd_ps(u, s, _mm256_set1_ps(0.0416664853692054748535156f));
  u = _mm256_fmadd_ps(u, s, _mm256_set1_ps(0.166666671633720397949219f));
  u = _mm256_fmadd_ps(u, s, _mm256_set1_ps(0.5f));
  u = _mm256_add_ps(_mm256_set1_ps(1.0f), _mm256_fmadd_ps(_mm256_mul_ps(s, s), u, s));
  const __m256i q1 = _mm256_srai_epi32(q, 1), q2 = _mm256_sub_epi32(q, q1);  /* u * 2^q in two steps */
  const __m256 p1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(q1, _mm256_set1_epi32(127)), 23));
  const __m256 p2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(q2, _mm256_set1_epi32(127)), 23));
  u = _mm256_mul_ps(_mm256_mul_ps(u, p1), p2);
  u = _mm256_andnot_ps(_mm256_cmp_ps(d, _mm256_set1_ps(-104.f), _CMP_LT_OQ), u);
  return _mm256_blendv_ps(u, _mm256_set1_ps(__builtin_inff()), _mm256_cmp_ps(_mm256_set1_ps(100.f), d, _CMP_LT_OQ));
}

static inline __m256 silu_mul8(__m256 x, __m256 u) {
  const __m256 e = sleef_expf(_mm256_sub_ps(_mm256_setzero_ps(), x));
  return _mm256_mul_ps(_mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.f), e)), u);
}

int lsq_silu_ready(void) { return 1; }

/* torch's loop takes a row in vectors of V floats (twice its vector width) and the last n % V elements
   one at a time through std::exp (glibc's expf); V is found at load like the norm's lanes. */
void lsq_silu_mul(int t, long n, const float* g, long gs, const float* u, long us, float* y, long ys, int V) {
  const long nv = n / V * V;
  #pragma omp parallel for schedule(static) if((long)t * n >= 65536)  /* a prefill's rows over the threads */
  for (int i = 0; i < t; i++) {
    const float *gi = g + (long)i * gs, *ui = u + (long)i * us;
    float* yi = y + (long)i * ys;
    for (long c = 0; c < nv; c += 8)
      _mm256_storeu_ps(yi + c, silu_mul8(_mm256_loadu_ps(gi + c), _mm256_loadu_ps(ui + c)));
    for (long c = nv; c < n; c++) yi[c] = (gi[c] / (1.f + expf(-gi[c]))) * ui[c];
  }
}
#else
int lsq_silu_ready(void) { return 0; }
void lsq_silu_mul(int t, long n, const float* g, long gs, const float* u, long us, float* y, long ys, int V) {}
#endif
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
