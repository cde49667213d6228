"""Every engine knob in one dataclass; `server.core.config` fills it from flags, env and TOML.

Each field says once, in its metadata (`server.core.knobs.knob`), its help, its
allowed choices or range; construction checks them, so an `EngineConfig` that
exists is valid and the `resolve_*` methods only derive runtime values from it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from server.core import knobs
from server.core.errors import InvalidRequestError
from server.core.knobs import knob
from server.core.native import cpu_flag_set
from server.core.paths import resolve_home, resolve_kernel_cache
from server.core.sizes import parse_budget

# Adapters of --max-rank that `--adapter-memory auto` holds when --max-adapters-on-device does not say.
DEFAULT_ADAPTERS = 8

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class EngineConfig:
    model: str = knob("default", help="'default' (SmolLM2-135M-Instruct, bundled) or a path to an HF directory "
                                      "or .gguf file")
    device: str = knob("auto", help="auto | cpu | cuda", choices=("auto", "cpu", "cuda"))
    dtype: str = knob("auto", help="auto | float32 | bfloat16 | float16 (auto: bf16 on CUDA; on CPU fp32 with "
                                   "--quantize int8, else bf16 where native)", choices=("auto", *_DTYPES))
    quantize: str = knob("int8", help="base weights: none | int8 | int4", choices=("none", "int8", "int4"))
    adapter_memory: str = knob("auto", help="device memory for LoRA adapters, shared out by rank (an adapter of "
                                            "rank r takes r rank rows): auto (room for --max-adapters-on-device "
                                            "adapters of --max-rank, 8 when that is 0), a size (256MiB, 2GB) or a "
                                            "fraction of the memory free once the model and KV cache are in place "
                                            "(a decimal such as 0.25, or a percentage)")
    max_adapters_on_device: int = knob(0, help="most adapters resident at once (0 = as many as --adapter-memory "
                                               "holds)", lo=0)
    max_rank: int = knob(32, help="largest LoRA rank served", lo=1)
    kv_block_size: int = knob(16, help="tokens per paged KV block", lo=1)
    prefix_cache: bool = knob(True, help="keep full KV blocks of prompts after their requests end and reuse them "
                                         "for prompts that start the same way, on the same base and adapter "
                                         "version (keyed by the adapter's content digest)")
    kv_cache_tokens: int = knob(0, help="KV cache capacity in tokens (0 = sized automatically)", lo=0)
    max_model_len: int = knob(0, help="context length served (0 = the model's, capped at 8192)", lo=0)
    max_batch_size: int = knob(32, help="sequences decoded per step", lo=1)
    max_batch_tokens: int = knob(2048, help="prompt tokens per step (prefill budget)", lo=1)
    max_waiting: int = knob(1024, help="queued requests before RESOURCE_EXHAUSTED", lo=1)
    home: str = knob("", help="cache directory: converted models, CPU kernels, the default registry "
                              "(env LORASERVE_HOME; default ~/.cache/loraserve)")
    kernel_cache: str = knob("", help="directory of the compiled CPU kernels (default: the home's kernels/); "
                                      "servers with different homes on one machine may share one")
    seed: int = knob(0, help="seed for sampled requests that give none (mixed with the request id)")
    cpu_threads: int = knob(0, help="intra-op threads of the engine loop on CPU (0 = torch's default, the "
                                    "physical cores)", lo=0)
    lora_decode_dtype: str = knob("auto", help="auto | float32 | bfloat16 | int8: LoRA weights the CPU kernels "
                                               "read, decode and prompt rows (int8: one scale a rank row, half "
                                               "bf16's bytes; auto: int8 copies when the base is quantized, fp32 "
                                               "with --quantize none)",
                                  choices=("auto", "float32", "bfloat16", "int8"))
    attention: str = knob("auto", help="prefill attention on CUDA: auto (xformers where its start-up probe passes, "
                                       "else sdpa) | sdpa | xformers (refuse to start if xformers does not work)",
                          choices=("auto", "sdpa", "xformers"))
    lora_backend: str = knob("auto", help="auto | torch | cpu | triton: what computes the LoRA deltas (auto: triton on "
                                          "CUDA when it imports; on CPU the C kernel where --lora-decode-dtype "
                                          "resolves to bf16 or int8 and dtype is float32; the torch reference "
                                          "otherwise)",
                             choices=("auto", "torch", "cpu", "triton"))
    cuda_graphs: bool = knob(True, help="replay captured CUDA graphs for decode-only steps, one per batch and "
                                        "context bucket, with and without LoRA (CUDA with the triton LoRA "
                                        "backend; ignored on CPU; --no-cuda-graphs runs every step eagerly)")

    def __post_init__(self) -> None:
        knobs.check(self, "engine")
        try:
            self._adapter_budget = None if self.adapter_memory == "auto" else parse_budget(self.adapter_memory)
        except ValueError as e:
            raise InvalidRequestError("engine.adapter_memory", str(e)) from None

    def resolve_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise InvalidRequestError("engine.device", "cuda was asked for but torch sees no CUDA device")
        return torch.device(self.device)

    def resolve_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype != "auto":
            return _DTYPES[self.dtype]
        if device.type == "cuda":
            return torch.bfloat16
        if self.quantize == "int8":
            # The CPU int8 base multiplies in integers between fp32 activations (server/model/int8_dynamic.py),
            # and the CPU LoRA and decode-attention kernels read fp32: bf16 activations would only add casts
            # and send LoRA to the torch reference.
            return torch.float32
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32

    def resolve_lora_decode_dtype(self, device: torch.device) -> torch.dtype:
        """int8 copies of the slot stacks for the CPU kernels, decode and prompt rows (server/lora/cpu_kernel.py),
        where the base is quantized anyway (one scale a rank row: measured on SmolLM2 with three random rank-16
        adapters, perplexity within 0.02% of fp32 rows on the fp32 base, as close as bf16 rows, at half their
        bytes); fp32 (no copies) with `none`, the PEFT-exact setting, and on CUDA."""
        if device.type != "cpu" or self.lora_decode_dtype == "float32":
            return torch.float32
        if self.lora_decode_dtype == "bfloat16":
            return torch.bfloat16
        if self.lora_decode_dtype == "int8" or self.quantize != "none":
            return torch.int8
        return torch.float32

    def resolve_adapter_rows(self, row_bytes: int, free_bytes: Callable[[], int]) -> int:
        """Rank rows of adapter memory (the zero row aside) for rows of `row_bytes` bytes; `free_bytes()` is asked
        only for a fraction. Refuses a budget that cannot hold one adapter of --max-rank."""
        if self._adapter_budget is None:
            return (self.max_adapters_on_device or DEFAULT_ADAPTERS) * self.max_rank
        budget = self._adapter_budget.resolve(0 if self._adapter_budget.nbytes is not None else free_bytes())
        rows = budget // row_bytes - 1
        if rows < self.max_rank:
            raise InvalidRequestError("engine.adapter_memory", f"{self.adapter_memory} ({budget} bytes) holds "
                                      f"{max(rows, 0)} rank rows of {row_bytes} bytes for this model; an adapter "
                                      f"of --max-rank {self.max_rank} needs {self.max_rank} (+1 zero row)")
        return rows

    def resolve_adapter_slots(self, rows: int) -> int:
        """Adapters resident at most: --max-adapters-on-device, or as many as `rows` could hold (rank 1 each)."""
        return self.max_adapters_on_device or rows

    def resolve_home(self) -> Path:
        """The cache root (`server.core.paths.resolve_home`): `home`, else $LORASERVE_HOME, else ~/.cache/loraserve."""
        return resolve_home(self.home)

    def resolve_kernel_cache(self) -> Path:
        """Where the CPU kernels are built and found (`server.core.paths.resolve_kernel_cache`)."""
        return resolve_kernel_cache(self.kernel_cache, self.home)


def cpu_has_native_bf16() -> bool:
    """True where the CPU computes bf16 natively (AVX512-BF16 or AMX): there bf16 is 2-3x fp32."""
    return bool(cpu_flag_set() & {"avx512_bf16", "amx_bf16"})
