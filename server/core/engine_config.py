"""Every engine knob in one dataclass; `server/config.py` fills it from flags, env and TOML."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from server.core.errors import InvalidRequestError


@dataclass
class EngineConfig:
    model: str = "default"          # "default" or a path (HF directory or .gguf file)
    device: str = "auto"            # auto | cpu | cuda
    dtype: str = "auto"             # auto | float32 | bfloat16 | float16
    quantize: str = "int8"          # none | int8 | int4
    max_adapters_on_device: int = 8  # LoRA slots besides slot 0 (the bare base)
    max_rank: int = 32
    kv_block_size: int = 16
    kv_cache_tokens: int = 0        # 0 = sized automatically
    max_model_len: int = 0          # 0 = the model's max_position_embeddings (capped at 8192)
    max_batch_size: int = 32        # sequences per step
    max_batch_tokens: int = 2048    # prompt tokens per step (prefill budget)
    max_waiting: int = 1024         # queue bound; beyond it submit raises CapacityError
    home: str = ""                  # cache dir; default $LORASERVE_HOME or ~/.cache/loraserve
    seed: int = 0                   # seed for requests that give none (mixed with the request id)
    cpu_threads: int = 0            # intra-op threads of the engine loop on CPU; 0 = torch's default
    lora_decode_dtype: str = "auto"  # auto | float32 | bfloat16: LoRA weights the CPU kernels read (every row)
    lora_backend: str = "auto"      # auto | torch | cpu | triton: what computes LoRA deltas (server/lora/factory.py)

    def resolve_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise InvalidRequestError("device", "cuda was asked for but torch sees no CUDA device")
        if self.device not in ("cpu", "cuda"):
            raise InvalidRequestError("device", f"{self.device!r}: choose auto, cpu or cuda")
        return torch.device(self.device)

    def resolve_dtype(self, device: torch.device) -> torch.dtype:
        names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                 "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
        if self.dtype != "auto":
            if self.dtype not in names:
                raise InvalidRequestError("dtype", f"{self.dtype!r}: choose auto, float32, bfloat16 or float16")
            return names[self.dtype]
        if device.type == "cuda":
            return torch.bfloat16
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32

    def resolve_lora_decode_dtype(self, device: torch.device) -> torch.dtype:
        """bf16 copies of the slot stacks for the CPU kernels, decode and prompt rows (server/lora/cpu_kernel.py),
        where the base is quantized anyway; fp32 (no copies) with `none`, the PEFT-exact setting, and on CUDA."""
        if self.lora_decode_dtype not in ("auto", "float32", "bfloat16"):
            raise InvalidRequestError("lora_decode_dtype", f"{self.lora_decode_dtype!r}: choose auto, float32 or "
                                      "bfloat16")
        if device.type != "cpu" or self.lora_decode_dtype == "float32":
            return torch.float32
        if self.lora_decode_dtype == "bfloat16" or self.quantize != "none":
            return torch.bfloat16
        return torch.float32

    def resolve_home(self) -> Path:
        if self.home:
            return Path(self.home).expanduser()
        return Path(os.environ.get("LORASERVE_HOME", "~/.cache/loraserve")).expanduser()


def cpu_has_native_bf16() -> bool:
    """True where the CPU computes bf16 natively (AVX512-BF16 or AMX): there bf16 is 2-3x fp32."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False
