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

from server.core.native import NativeBuildError, build_and_load, c_source

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_GROUP = 16    # query heads per KV head
MAX_CONTEXT = 1 << 14  # scores of one KV head's query heads live on the stack (up to 1 MB)

# The C helpers both CPU attention kernels use (server/attention/context_kernel.py includes them too).
COMMON_SOURCE = c_source(__file__, "attention_common.h")

_SOURCE = COMMON_SOURCE + c_source(__file__, "decode_kernel.c")


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
