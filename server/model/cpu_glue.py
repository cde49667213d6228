"""RoPE in one C call for the dynamic int8 path on CPU: the small ops between a layer's big kernels.

Why: a decode step of 8 tokens spends a large part of its time between its kernels. RoPE on q
and k is eight torch ops a layer, each a few microseconds of dispatch on a few KB; one C call
does the same arithmetic, built without contraction so that it rounds each product and sum as
torch does: the same bits. Used where the base runs the dynamic int8 kernel (fp32 activations,
CPU); `--quantize none` keeps torch's ops.

RMSNorm stays torch's (`F.rms_norm`, one op, the same bits as the Hugging Face formula): a C
version with its own summation order changed the int8 model's perplexity from +0.53% to +1.39%
over `none`. Not because it is less accurate (it agrees to 2e-7) but because int8 activations
amplify any last-bit change: scaling torch's norm output by 1 + 1.2e-7, 1 - 1.2e-7 or 1 + 2.4e-7
moved the same perplexity to +0.91%, +1.12% and +0.99% (benchmarks/perplexity.py, 631 tokens). Keeping torch's bits keeps the
measured figure comparable.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import os
from typing import Optional

import torch

from server.core.native import NATIVE_FLAGS, NativeBuildError, build_and_load

log = logging.getLogger(__name__)

_SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>

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
"""

MAX_HEAD_DIM = 1024  # lsq_rope keeps half a head on the stack twice


class CpuGlue:
    """In-place fp32 RoPE on CPU tensors, one C call."""

    def __init__(self, lib: ctypes.CDLL):
        i, lg, p = ctypes.c_int, ctypes.c_long, ctypes.c_void_p
        lib.lsq_rope.argtypes = [i, i, i, p, lg, p, p]
        self._rope = lib.lsq_rope

    def rope_(self, x: torch.Tensor, heads: int, head_dim: int, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Rotate the first `heads` heads of each row of x [t, >= heads * head_dim] (fp32, unit
        stride) in place; cos/sin [t, head_dim] contiguous, the rows' positions."""
        t = x.shape[0]
        if t:
            self._rope(t, heads, head_dim, x.data_ptr(), x.stride(0), cos.data_ptr(), sin.data_ptr())

    @staticmethod
    def accepts(x: torch.Tensor) -> bool:
        return x.dtype is torch.float32 and x.is_cpu and x.dim() == 2 and x.stride(1) == 1


@functools.lru_cache(maxsize=None)
def load() -> Optional[CpuGlue]:
    """The kernel, built on first use; None (logged once) where they cannot be had or
    LORASERVE_CPU_GLUE=0 turns it off (torch's ops then serve, as with `--quantize none`)."""
    if os.environ.get("LORASERVE_CPU_GLUE", "1") == "0":
        log.info("CPU RoPE kernel: off (LORASERVE_CPU_GLUE=0)")
        return None
    try:
        # No fused multiply-adds: RoPE then rounds each product and sum as torch's ops do (the same bits).
        glue = CpuGlue(build_and_load("cpu_glue", _SOURCE, (*NATIVE_FLAGS, "-ffp-contract=off")))
    except NativeBuildError as e:
        log.warning("CPU RoPE kernel unavailable (%s); torch's ops serve", e)
        return None
    return glue
