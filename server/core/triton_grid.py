"""Launch shapes the Triton kernels share (server/lora/triton_sgmv.py, server/model/int8_triton.py): the SMs a
tensor's device has, the row tile for a number of rows, and how far to split a reduction so every SM has work."""
from __future__ import annotations

import functools
from typing import Optional

import torch

PROGRAMS_PER_SM = 2  # aim for this many programs per SM before splitting a kernel's K loop


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: Optional[int]) -> int:
    if not torch.cuda.is_available():
        return 1  # the interpreter runs programs one after another: no point splitting
    return torch.cuda.get_device_properties(device_index or 0).multi_processor_count


def sm_count(t: torch.Tensor) -> int:
    """The SMs of `t`'s GPU; 1 for a CPU tensor (Triton's interpreter)."""
    return _sm_count(t.device.index) if t.is_cuda else 1


def block_m(rows: int) -> int:
    """Rows a program takes: 16, 32 or 64 (tl.dot needs at least 16)."""
    return 16 if rows <= 16 else (32 if rows <= 32 else 64)


def k_split(programs: int, k_blocks: int, n_sms: int, max_split: int) -> int:
    """The power of two to split K by, so that `programs` x split reaches PROGRAMS_PER_SM a SM, within
    `max_split` and the K blocks there are."""
    s = 1
    while programs * s * 2 <= PROGRAMS_PER_SM * n_sms and s * 2 <= min(max_split, k_blocks):
        s *= 2
    return s
