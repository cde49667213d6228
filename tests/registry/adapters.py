"""Small PEFT adapters as bytes, for registry tests (tiny random Llama shapes)."""
from __future__ import annotations

import json
from typing import Iterable, Optional

import torch
from safetensors.torch import save

from server.model.config import TARGET_MODULES, ModelConfig

TINY = ModelConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=8, max_position_embeddings=256)
FINGERPRINT = "tiny-llama-test-fingerprint"


def make_adapter(model: ModelConfig = TINY, rank: int = 4, targets: Iterable[str] = ("q", "v"),
                 seed: int = 0, alpha: float = 8.0, dtype: torch.dtype = torch.float32,
                 extra_config: Optional[dict] = None) -> tuple[bytes, bytes]:
    """(adapter_config.json bytes, adapter_model.safetensors bytes) of a random PEFT LoRA."""
    g = torch.Generator().manual_seed(seed)
    targets = tuple(targets)
    tensors = {}
    for layer in range(model.num_layers):
        for t in targets:
            out_f, in_f = model.target_shape(t)
            block = "self_attn" if t in ("q", "k", "v", "o") else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{block}.{TARGET_MODULES[t]}"
            tensors[f"{prefix}.lora_A.weight"] = (torch.randn(rank, in_f, generator=g) * 0.1).to(dtype)
            tensors[f"{prefix}.lora_B.weight"] = (torch.randn(out_f, rank, generator=g) * 0.1).to(dtype)
    cfg = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "bias": "none",
           "target_modules": [TARGET_MODULES[t] for t in targets], "task_type": "CAUSAL_LM"}
    cfg.update(extra_config or {})
    return json.dumps(cfg).encode(), save(tensors, metadata={"seed": str(seed)})
