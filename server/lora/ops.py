"""The one dispatch point for segmented LoRA matmuls.

Triton kernels on CUDA when they import, the torch reference otherwise; both
share one signature (see `server/lora/torch_ref.py` for shapes and semantics).
"""
from __future__ import annotations

import functools
import logging
import os

import torch

from server.lora import torch_ref
from server.lora.segments import LoraSegments

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def _triton_module():
    if os.environ.get("LORASERVE_LORA_BACKEND", "auto") == "torch":
        return None
    try:
        from server.lora import triton_sgmv  # noqa: WPS433 (optional dependency)
    except Exception as e:  # triton missing or broken: the reference still serves
        log.info("LoRA kernels: torch reference (triton unavailable: %s)", e)
        return None
    log.info("LoRA kernels: triton")
    return triton_sgmv


def backend_for(device: torch.device) -> str:
    return "triton" if device.type == "cuda" and _triton_module() is not None else "torch"


def apply_lora(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
               scale: torch.Tensor, seg: LoraSegments) -> torch.Tensor:
    """y += scale[s] * (x a[s]^T) b[s]^T for each token's slot s."""
    if not seg.has_lora:
        return y
    if x.is_cuda:
        mod = _triton_module()
        if mod is not None:
            return mod.apply_lora(y, x, a, b, scale, seg)
    return torch_ref.apply_lora(y, x, a, b, scale, seg)
