"""Decode attention on CPU straight from the paged KV cache, one sequence at a time.

torch's path gathers every decoding sequence's context into a padded copy (index_select of K
and V, about 1.5 MB a layer for 8 sequences) and runs masked SDPA over the longest context
in the batch: measured single threaded on SmolLM2's shapes (8 sequences, 80 tokens of
context), 131 us of gathering plus 194 us of SDPA a layer, a third of a decode step. This
kernel reads each sequence's own cache rows in place and computes softmax(q K^T / sqrt(d)) V
for the query heads that share a KV head together (each K and V row read once), so a token's
numbers depend only on its own context, never on the other sequences' lengths. Compiled for
SmolLM2's shape (3 query heads a KV head, head width 64) as constants, it runs the 30 layers of
such a step in 2.8-3.6 ms single threaded, where runtime-sized arrays took 8.3-9.6 ms; it prefetches
the scattered cache rows it will read (2.4 ms a step in the engine, 2 threads, from 3.1-3.3).

fp32 throughout; exp is a fixed polynomial (Cephes' expf, relative error below 2e-7), so a
build computes the same bits for the same inputs on every call. Built like the int8 kernels
(server/core/native.py); without a compiler torch's SDPA path serves.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import os
from typing import Callable, Optional, TypeVar

import torch

from server.core.native import NativeBuildError, build_and_load

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_GROUP = 16    # query heads per KV head
MAX_CONTEXT = 1 << 14  # scores of one KV head's query heads live on the stack (up to 1 MB)

# The C helpers both CPU attention kernels use (server/attention/context_kernel.py includes them too).
COMMON_SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>

typedef float v16 __attribute__((vector_size(64)));
typedef int32_t i16 __attribute__((vector_size(64)));

#define MAXG 16

/* Cephes expf on 16 lanes; inputs below -87.3 give exactly 0 (masked and far-below-max scores). */
static inline v16 vexp(v16 x) {
  const v16 lo = (v16){0} - 87.3f;
  const i16 under = x < lo;
  x = (v16)((~under & (i16)x) | (under & (i16)lo));
  v16 n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;  /* round to nearest */
  v16 r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  v16 p = 1.9875691500E-4f * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  p = p * (r * r) + r + 1.f;
  i16 e = (__builtin_convertvector(n, i16) + 127) << 23;
  return (v16)(~under & (i16)(p * (v16)e));
}

typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));

static inline float hsum(v16 v) {  /* halves added in a fixed order */
  v8 a, b;
  memcpy(&a, &v, 32); memcpy(&b, (const char*)&v + 32, 32);
  a += b;
  v4 c, d;
  memcpy(&c, &a, 16); memcpy(&d, (const char*)&a + 16, 16);
  c += d;
  return (c[0] + c[2]) + (c[1] + c[3]);
}

static inline v16 load16(const float* p) { v16 v; memcpy(&v, p, sizeof v); return v; }

#define PF 8  /* cache rows prefetched ahead */
static inline void prefetch_row(const float* row, int hd) {
  for (int l = 0; l < hd; l += 16) __builtin_prefetch(row + l);
}
static inline void store16(float* p, v16 v) { memcpy(p, &v, sizeof v); }
"""

_SOURCE = COMMON_SOURCE + r"""

/* One sequence d and one KV head g: out[d, h] = softmax(scale * q[d, h] . K[rows[j]]) . V[rows[j]] over
   j < n for the G query heads h of g together (each K and V row read once). Inlined with G and C
   (= hd / 16) as constants for the common shapes, so q and the accumulators stay in registers (3x
   faster than runtime-sized arrays on SmolLM2's shapes). The instance is chosen by the model's shape
   alone, so a token's bits still depend only on its own context. */
static inline __attribute__((always_inline)) void head_group(const int G, const int C, int d, int g, int nh,
    int nkv, int hd, const float* q, long qs, const float* kc, const float* vc, const int64_t* rw, int n,
    float scale, float* out) {
  const int nv = (n + 15) / 16;
  float s[G][nv * 16];
  v16 qv[G][C];
  for (int h = 0; h < G; h++)
    for (int c = 0; c < C; c++) qv[h][c] = load16(q + (long)d * qs + (long)(g * G + h) * hd + 16 * c);
  for (int j = 0; j < n; j++) {
    /* Rows are scattered over the paged cache, so the hardware prefetcher cannot follow them: ask for the
       row PF ahead (K, then V's first rows as K's end nears). Measured on SmolLM2 decode steps (8 x ~80
       tokens, 30 layers): this kernel's time a step 3.1-3.3 -> 2.4 ms. */
    if (j + PF < n) prefetch_row(kc + (rw[j + PF] * nkv + g) * hd, hd);
    else if (j + PF - n < n) prefetch_row(vc + (rw[j + PF - n] * nkv + g) * hd, hd);
    const float* kr = kc + (rw[j] * nkv + g) * hd;
    v16 kv[C];
    for (int c = 0; c < C; c++) kv[c] = load16(kr + 16 * c);
    for (int h = 0; h < G; h++) {
      v16 a = qv[h][0] * kv[0];
      for (int c = 1; c < C; c++) a += qv[h][c] * kv[c];
      s[h][j] = hsum(a) * scale;
    }
  }
  float inv[MAXG];
  for (int h = 0; h < G; h++) {
    float m = s[h][0];
    for (int j = 1; j < n; j++) m = s[h][j] > m ? s[h][j] : m;
    for (int j = n; j < nv * 16; j++) s[h][j] = -INFINITY;
    v16 sum = {0};
    for (int b = 0; b < nv; b++) {
      const v16 e = vexp(load16(s[h] + 16 * b) - m);
      store16(s[h] + 16 * b, e);
      sum += e;
    }
    inv[h] = hsum(sum);
  }
  v16 acc[G][C];
  for (int h = 0; h < G; h++)
    for (int c = 0; c < C; c++) acc[h][c] = (v16){0};
  for (int j = 0; j < n; j++) {
    if (j + PF < n) prefetch_row(vc + (rw[j + PF] * nkv + g) * hd, hd);
    const float* vr = vc + (rw[j] * nkv + g) * hd;
    v16 vv[C];
    for (int c = 0; c < C; c++) vv[c] = load16(vr + 16 * c);
    for (int h = 0; h < G; h++) {
      const float p = s[h][j];
      for (int c = 0; c < C; c++) acc[h][c] += p * vv[c];
    }
  }
  for (int h = 0; h < G; h++)
    for (int c = 0; c < C; c++) store16(out + ((long)d * nh + g * G + h) * hd + 16 * c, acc[h][c] / inv[h]);
}

/* out[d, h] for every decoding sequence d and query head h. q: [D, nh, hd], rows qs floats apart (a view
   of the fused qkv output needs no copy); out: [D, nh, hd]; caches: [rows, nkv, hd]; hd a multiple of 16
   and at most 256. */
void lsq_decode_attention(int D, int nh, int nkv, int hd, const float* q, long qs, const float* kc, const float* vc,
                          const int64_t* rows, long row_stride, const int32_t* len, float scale, float* out) {
  const int G = nh / nkv, C = hd / 16;
  #pragma omp parallel for schedule(static) collapse(2) if(D * nkv > 1)
  for (int d = 0; d < D; d++)
    for (int g = 0; g < nkv; g++) {
      const int64_t* rw = rows + (long)d * row_stride;
      if (G == 3 && C == 4) head_group(3, 4, d, g, nh, nkv, hd, q, qs, kc, vc, rw, len[d], scale, out);
      else if (G == 4 && C == 4) head_group(4, 4, d, g, nh, nkv, hd, q, qs, kc, vc, rw, len[d], scale, out);
      else if (G == 8 && C == 4) head_group(8, 4, d, g, nh, nkv, hd, q, qs, kc, vc, rw, len[d], scale, out);
      else if (G == 4 && C == 8) head_group(4, 8, d, g, nh, nkv, hd, q, qs, kc, vc, rw, len[d], scale, out);
      else head_group(G, C, d, g, nh, nkv, hd, q, qs, kc, vc, rw, len[d], scale, out);
    }
}
"""


class DecodeAttention:
    def __init__(self, lib: ctypes.CDLL):
        i, lg, p, f = ctypes.c_int, ctypes.c_long, ctypes.c_void_p, ctypes.c_float
        lib.lsq_decode_attention.argtypes = [i, i, i, i, p, lg, p, p, p, lg, p, f, p]
        self._fn = lib.lsq_decode_attention

    @staticmethod
    def accepts(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
        return accepts_shapes(q, k_cache)

    @staticmethod
    def accepts_context(length: int) -> bool:
        """Contexts (cache rows a sequence reads) the kernel takes: its scores live on the stack."""
        return length <= MAX_CONTEXT

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, rows: torch.Tensor,
                 lengths: torch.Tensor) -> torch.Tensor:
        """q [D, nh, hd]; caches [R, nkv, hd] (contiguous); rows [D, L] int64 cache rows of each
        sequence's context; lengths [D] int32 (each at most L, at least 1) -> [D, nh, hd]."""
        D, nh, hd = q.shape
        if not (q.stride(2) == 1 and q.stride(1) == hd):
            q = q.contiguous()
        if not (k_cache.is_contiguous() and v_cache.is_contiguous() and rows.dtype == torch.int64
                and rows.stride(1) == 1 and lengths.dtype == torch.int32 and lengths.is_contiguous()):
            raise ValueError("decode attention takes contiguous caches, int64 rows and int32 lengths")
        if not self.accepts_context(rows.shape[1]):
            raise ValueError(f"context {rows.shape[1]} over the kernel's {MAX_CONTEXT}")
        out = torch.empty(D, nh, hd, dtype=q.dtype)  # contiguous, whatever q's row stride
        self._fn(D, nh, k_cache.shape[1], hd, q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(),
                 rows.data_ptr(), rows.stride(0), lengths.data_ptr(), hd ** -0.5, out.data_ptr())
        return out


def accepts_shapes(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """fp32 CPU tensors of head widths and groupings the CPU attention kernels take (q [T, nh, hd],
    cache [R, nkv, hd])."""
    nh, hd = q.shape[1], q.shape[2]
    nkv = k_cache.shape[1]
    return (q.dtype == k_cache.dtype == torch.float32 and q.device.type == k_cache.device.type == "cpu"
            and hd % 16 == 0 and hd <= 256 and nh % nkv == 0 and nh // nkv <= MAX_GROUP)


def load_kernel(name: str, source: str, wrap: Callable[[ctypes.CDLL], T], env: str, what: str,
                logger: logging.Logger = log) -> Optional[T]:
    """A CPU attention kernel built on first use, or None (logged to `logger`) where it cannot be had or
    `env`=sdpa asks for torch's path; `what` names it in the log."""
    if os.environ.get(env, "") == "sdpa":
        logger.info("%s: torch SDPA (%s=sdpa)", what, env)
        return None
    try:
        kern = wrap(build_and_load(name, source))
    except NativeBuildError as e:
        logger.warning("%s kernel unavailable (%s); torch SDPA serves", what, e)
        return None
    logger.info("%s: loraserve CPU kernel over the paged cache", what)
    return kern


@functools.lru_cache(maxsize=None)
def load() -> Optional[DecodeAttention]:
    """The kernel, built on first use; None where it cannot be had or LORASERVE_DECODE_ATTENTION=sdpa."""
    return load_kernel("decode_attention", _SOURCE, DecodeAttention, "LORASERVE_DECODE_ATTENTION",
                       "decode attention")
