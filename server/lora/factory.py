"""Choose an engine's LoRA backend, once, and build it over a new slot pool.

`EngineConfig.lora_backend` (flag `--lora-backend`, env, TOML) asks for one of:
    auto    triton on CUDA when it imports; on CPU the bf16 C kernel where the LoRA weights resolve
            to bf16 (`EngineConfig.resolve_lora_decode_dtype`: a quantized base) and activations are
            fp32, when the kernel builds; the torch reference otherwise (the log says why)
    torch   the reference, any device
    cpu     the C kernel; refused unless the device is CPU, activations fp32, the kernel builds and
            `--lora-decode-dtype` is not float32
    triton  the Triton kernels; refused unless the device is CUDA and triton imports
The choice decides the pool's layout too (bf16 copies for the C kernel), so pool and backend are built
together here, and so does the cost of a rank row, which `--adapter-memory` is shared out in. The C kernel
is built into the engine's kernel cache (`EngineConfig.resolve_kernel_cache()`).
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from server.core.engine_config import DEFAULT_ADAPTERS, EngineConfig
from server.core.errors import InvalidRequestError
from server.core.sizes import check_fits, free_memory
from server.lora import cpu_kernel
from server.lora.backend import LoraBackend
from server.lora.cpu_backend import CpuKernelBackend
from server.lora.pool import AdapterPool
from server.lora.stacks import RowStacks
from server.lora.torch_backend import TorchBackend
from server.model.config import ModelConfig

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "cpu", "triton")


def build_lora_backend(config: EngineConfig, model_config: ModelConfig, device: torch.device,
                       dtype: torch.dtype) -> LoraBackend:
    """The engine's backend, its pool (`backend.pool`) sized by `config`, for activations of `dtype` on `device`."""
    name, why, kernel = _choose(config, device, dtype)
    row_bytes = RowStacks.bytes_per_row(model_config, dtype)
    copies = _kernel_copies(config, device) if name == "cpu" else None
    if copies is not None:
        row_bytes += RowStacks.bytes_per_row(model_config, copies)  # the kernel's bf16 or int8 copies
    free = free_memory(device)  # what a fractional --adapter-memory is a fraction of, and what any must fit in
    rows = config.resolve_adapter_rows(row_bytes, lambda: free)
    problem = check_fits(f"adapter memory of {rows + 1} rank rows of {row_bytes / 1e6:.2f} MB (--adapter-memory "
                         f"{config.adapter_memory})", (rows + 1) * row_bytes, free, device.type)
    if problem is not None:
        fix = ("lower --adapter-memory (a size such as 2GiB, or a fraction of free memory such as 0.25)"
               if config.adapter_memory != "auto" else
               f"auto holds {config.max_adapters_on_device or DEFAULT_ADAPTERS} adapters of --max-rank "
               f"{config.max_rank}: lower --max-rank or --max-adapters-on-device, or give --adapter-memory a size")
        raise InvalidRequestError("engine.adapter_memory", f"{problem}: {fix}")
    pool = AdapterPool(model_config, config.resolve_adapter_slots(rows), config.max_rank, device, dtype,
                       kernel_copies=copies, num_rows=rows)
    log.info("adapter memory: %d rank rows of %.2f MB (%.0f MB, %d slots at most)", rows, row_bytes / 1e6,
             (rows + 1) * row_bytes / 1e6, pool.num_slots)
    if name == "cpu":
        assert kernel is not None
        backend: LoraBackend = CpuKernelBackend(pool, kernel)
    elif name == "triton":
        from server.lora.triton_backend import TritonBackend

        backend = TritonBackend(pool)
    else:
        backend = TorchBackend(pool)
    backend.description = f"{backend.name} ({why})"
    log.info("LoRA backend: %s", backend.description)
    return backend


def _choose(config: EngineConfig, device: torch.device, dtype: torch.dtype
            ) -> tuple[str, str, Optional[cpu_kernel.CpuLoraKernel]]:
    """(backend name, why, the loaded C kernel when the name is 'cpu')."""
    asked = config.lora_backend
    if asked not in BACKENDS:
        raise InvalidRequestError("lora_backend", f"{asked!r}: choose one of {', '.join(BACKENDS)}")
    if asked == "torch":
        return "torch", "--lora-backend torch", None
    if asked == "triton" or (asked == "auto" and device.type == "cuda"):
        problem = "the device is not CUDA" if device.type != "cuda" else _triton_problem()
        if problem is None:
            return "triton", f"--lora-backend {asked}, CUDA", None
        if asked == "triton":
            raise InvalidRequestError("lora_backend", f"triton cannot run: {problem}")
        return "torch", f"triton cannot run: {problem}", None
    problem = _cpu_kernel_problem(config, device, dtype, asked)
    kernel = cpu_kernel.load(config.resolve_kernel_cache()) if problem is None else None
    if problem is None and kernel is None:
        problem = "the C kernel could not be built or loaded (see the warning above)"
    if problem is None:
        weights = str(_kernel_copies(config, device)).replace("torch.", "")
        return "cpu", f"--lora-backend {asked}, {weights} C kernel, prompt rows on {kernel.prompt_path}", kernel
    if asked == "cpu":
        raise InvalidRequestError("lora_backend", f"the cpu backend cannot run: {problem}")
    return "torch", problem, None


def _kernel_copies(config: EngineConfig, device: torch.device) -> torch.dtype:
    """The dtype of the rows the C kernel reads: --lora-decode-dtype's bf16 or int8; bf16 where an explicit
    `--lora-backend cpu` meets fp32 from `auto` (--quantize none)."""
    weights = config.resolve_lora_decode_dtype(device)
    return weights if weights in cpu_kernel.WEIGHT_DTYPES else torch.bfloat16


def _cpu_kernel_problem(config: EngineConfig, device: torch.device, dtype: torch.dtype, asked: str) -> Optional[str]:
    if device.type != "cpu":
        return f"the C kernel runs on CPU, the device is {device.type}"
    if dtype != torch.float32:
        return f"the C kernel reads float32 activations, the dtype is {str(dtype).replace('torch.', '')}"
    weights = config.resolve_lora_decode_dtype(device)
    if asked == "cpu" and config.lora_decode_dtype == "float32":
        return "--lora-decode-dtype float32 asks for fp32 LoRA weights; the C kernel reads bf16 or int8"
    if asked == "auto" and weights not in cpu_kernel.WEIGHT_DTYPES:
        return "fp32 LoRA weights (--lora-decode-dtype auto with --quantize none, or float32)"
    return None


def _triton_problem() -> Optional[str]:
    """None when the Triton kernels import; else why not (triton is an optional dependency)."""
    try:
        from server.lora import triton_sgmv  # noqa: F401
    except Exception as e:  # noqa: BLE001 (missing or broken: the reference still serves)
        return f"{type(e).__name__}: {e}"
    return None
