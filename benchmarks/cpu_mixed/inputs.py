"""The inputs every system gets: seeded random prompts and seeded random PEFT LoRA adapters."""
from __future__ import annotations

import gc
from pathlib import Path
from typing import Sequence

import torch

from benchmarks.cpu_mixed.config import PEFT_TARGETS, BenchConfig


def make_prompts(cfg: BenchConfig, vocab_size: int, special_ids: Sequence[int]) -> list[list[int]]:
    """Reproducible random prompts of exactly prompt_len ids, avoiding special tokens."""
    g = torch.Generator().manual_seed(cfg.seed)
    banned = torch.tensor(sorted(set(special_ids)), dtype=torch.long)
    prompts = []
    for _ in range(cfg.requests):
        ids = torch.randint(0, vocab_size, (cfg.prompt_len * 2,), generator=g)
        if banned.numel():
            ids = ids[~torch.isin(ids, banned)]
        prompts.append(ids[:cfg.prompt_len].tolist())
    assert all(len(p) == cfg.prompt_len for p in prompts)
    return prompts


def make_adapters(model_dir: Path, root: Path, n: int, rank: int, seed: int) -> list[Path]:
    """n PEFT LoRA adapters (rank `rank`, all 7 targets, alpha 2r) with seeded random A and B.

    A ~ N(0, 1/in) and B ~ N(0, 0.02^2): B non-zero, so every adapter changes the
    output (PEFT's default init zeroes B, which would make LoRA a no-op).
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    dirs = [root / f"adapter{i}" for i in range(n)]
    if all((d / "adapter_model.safetensors").is_file() for d in dirs):
        return dirs
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    lcfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(PEFT_TARGETS), lora_dropout=0.0,
                      bias="none", init_lora_weights=False)
    model = get_peft_model(base, lcfg)
    params = sorted((name, p) for name, p in model.named_parameters() if "lora_" in name)
    for i, d in enumerate(dirs):
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        with torch.no_grad():
            for name, p in params:
                if "lora_A" in name:
                    p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        model.save_pretrained(d, safe_serialization=True)
    del model, base
    gc.collect()
    return dirs
