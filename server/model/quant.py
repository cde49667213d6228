"""Weight-only quantized linears for the shared base model (placeholder: full precision only).

Interface kept stable for the model: `make_linear(weight, bias, mode, dtype, device)`.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

QUANT_MODES = ("none", "int8", "int4")


class DenseLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor]):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)


def make_linear(weight: torch.Tensor, bias: Optional[torch.Tensor], mode: str,
                dtype: torch.dtype, device: torch.device) -> nn.Module:
    if mode not in QUANT_MODES:
        raise ValueError(f"quantization {mode!r}: choose one of {', '.join(QUANT_MODES)}")
    w = weight.to(device=device, dtype=dtype).contiguous()
    b = None if bias is None else bias.to(device=device, dtype=dtype)
    return DenseLinear(w, b)
