"""Random PEFT LoRA adapters for any Llama-family model directory, for demos and load tests.

Written directly as PEFT's files (adapter_config.json + adapter_model.safetensors), without
loading the base model, so making 200 of them takes seconds. Small random A and B: each adapter
changes the output, none is meaningful.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import save_file

from server.model.config import TARGET_MODULES, ModelConfig

_BLOCK = {"q": "self_attn", "k": "self_attn", "v": "self_attn", "o": "self_attn",
          "gate": "mlp", "up": "mlp", "down": "mlp"}


def write_random_adapter(model_dir: Path, out_dir: Path, rank: int = 8, targets: Sequence[str] = ("q", "v"),
                         seed: int = 0, alpha: float = 16.0, std: float = 0.02) -> Path:
    """A PEFT LoRA adapter for the model in `model_dir` (its config.json), saved in `out_dir`."""
    cfg = ModelConfig.from_file(Path(model_dir) / "config.json")
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(cfg.num_layers):
        for t in targets:
            out_f, in_f = cfg.target_shape(t)
            prefix = f"base_model.model.model.layers.{layer}.{_BLOCK[t]}.{TARGET_MODULES[t]}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, in_f, generator=g) * std
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_f, rank, generator=g) * std
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "bias": "none", "lora_dropout": 0.0,
              "target_modules": [TARGET_MODULES[t] for t in targets], "task_type": "CAUSAL_LM"}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out
