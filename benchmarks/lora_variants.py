"""LoRA matmul variants kept only to be measured against the kernels the server runs (benchmarks/gpu_kernels.py).

torch._grouped_mm: each segment's A and B are gathered, then two grouped GEMMs run over the
segments (CUDA: bf16 on sm90+; it also runs on CPU). Same semantics as
`server.lora.torch_ref.apply_lora`, which it is tested against (tests/benchmarks/test_lora_variants.py).
"""
from __future__ import annotations

import torch

from server.lora.segments import LoraSegments


def grouped_mm_available(device: torch.device, dtype: torch.dtype) -> bool:
    """torch._grouped_mm exists and supports this device/dtype (CUDA: bf16 on sm90+)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if device.type == "cuda":
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device)[0] >= 9
    return device.type == "cpu"


def apply_lora_grouped_mm(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                          scale: torch.Tensor, seg: LoraSegments) -> torch.Tensor:
    """Same result via two torch._grouped_mm calls over the segments (for measurement).

    Each segment's A and B are gathered first (an extra copy of the adapters in
    the batch); slot-0 segments multiply the zero slot and add zero.
    """
    if not seg.has_lora:
        return y
    if not hasattr(torch, "_grouped_mm"):
        raise RuntimeError("this torch build has no torch._grouped_mm")
    dims = {"in_features": x.shape[1], "rank": a.shape[1], "out_features": y.shape[1]}
    bad = [f"{k}={n}" for k, n in dims.items() if (n * x.element_size()) % 16]
    if bad:
        raise ValueError(f"torch._grouped_mm needs 16-byte aligned rows; not met by {', '.join(bad)}")
    slots = seg.seg_slots.long()
    offs = seg.seg_starts[1:].contiguous()  # group g covers [offs[g-1], offs[g])
    a_g = a.index_select(0, slots).to(x.dtype)  # [S, R, in]
    b_g = b.index_select(0, slots).to(x.dtype)  # [S, out, R]
    v = torch._grouped_mm(x.contiguous(), a_g.transpose(1, 2), offs=offs)  # [T, R]
    d = torch._grouped_mm(v, b_g.transpose(1, 2), offs=offs)  # [T, out]
    sc = scale.index_select(0, seg.token_slots).to(torch.float32).unsqueeze(-1)
    y.add_((d.float() * sc).to(y.dtype))
    return y
