"""The LoRA backend is chosen once per engine, from `lora_backend` with the device, dtype and quantization:
auto takes the C kernel where the base is quantized on CPU, the torch reference where PEFT-exact fp32
is wanted, and an explicit choice that cannot run is refused by name instead of quietly replaced."""
from __future__ import annotations

import shutil

import pytest
import torch

from server.core.engine_config import EngineConfig
from server.core.errors import InvalidRequestError
from server.lora.factory import build_lora_backend
from tests.lora.backend_utils import TINY

CPU = torch.device("cpu")
needs_cc = pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None,
                              reason="no C compiler: the torch reference serves (tested elsewhere)")


def _backend(home, dtype=torch.float32, **fields):
    backend = build_lora_backend(EngineConfig(home=str(home), max_adapters_on_device=2, max_rank=8, **fields),
                                 TINY, CPU, dtype)
    backend.pool.shutdown()
    return backend


@needs_cc
def test_auto_takes_the_kernel_where_the_base_is_quantized(kernel_home, caplog):
    caplog.set_level("INFO", logger="server.lora.factory")
    quantized = _backend(kernel_home, quantize="int8")
    assert quantized.name == "cpu" and quantized.pool.kernel_stacks is not None
    assert "LoRA backend: cpu" in caplog.text
    # the log and the benchmarks' files say which prompt path runs
    prompts = quantized.kernel.prompt_path
    assert prompts == quantized.kernel.prompt_paths[-1]  # the best this CPU has
    assert quantized.description.startswith("cpu (") and f"prompt rows on {prompts}" in quantized.description
    assert quantized.description in caplog.text
    kernels = EngineConfig(home=str(kernel_home)).resolve_kernel_cache()
    assert list(kernels.glob("lora_cpu_*.so")), "built into the engine's kernel cache, not elsewhere"
    exact = _backend(kernel_home, quantize="none")
    assert exact.name == "torch" and exact.pool.kernel_stacks is None  # the PEFT-exact setting
    assert _backend(kernel_home, quantize="none", lora_decode_dtype="bfloat16").name == "cpu"
    assert _backend(kernel_home, quantize="int8", lora_decode_dtype="float32").name == "torch"
    assert _backend(kernel_home, torch.bfloat16, quantize="int8").name == "torch"  # the kernel reads fp32 rows


@needs_cc
def test_an_explicit_choice_is_kept_or_refused(kernel_home):
    off = _backend(kernel_home, quantize="int8", lora_backend="torch")  # the switch that keeps the kernel off
    assert off.name == "torch" and off.pool.kernel_stacks is None
    assert _backend(kernel_home, quantize="none", lora_backend="cpu").name == "cpu"
    with pytest.raises(InvalidRequestError, match="lora_backend.*float32"):
        _backend(kernel_home, quantize="int8", lora_backend="cpu", lora_decode_dtype="float32")
    with pytest.raises(InvalidRequestError, match="lora_backend.*float32 activations"):
        _backend(kernel_home, torch.bfloat16, lora_backend="cpu")
    with pytest.raises(InvalidRequestError, match="lora_backend.*CUDA"):
        _backend(kernel_home, lora_backend="triton")
    with pytest.raises(InvalidRequestError, match="lora_backend"):
        _backend(kernel_home, lora_backend="fast")


def test_the_choice_is_a_config_field_like_every_other():
    from server.core import config

    assert config.load(env={"LORASERVE_LORA_BACKEND": "torch"}).engine.lora_backend == "torch"
    with pytest.raises(InvalidRequestError, match="lora_backend"):
        config.load(env={"LORASERVE_LORA_BACKEND": "fast"})


def test_lora_decode_dtype_resolution():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert EngineConfig(quantize="int8").resolve_lora_decode_dtype(cpu) == torch.int8
    assert EngineConfig(quantize="int8", lora_decode_dtype="bfloat16").resolve_lora_decode_dtype(cpu) == torch.bfloat16
    assert EngineConfig(quantize="none").resolve_lora_decode_dtype(cpu) == torch.float32  # the PEFT-exact setting
    assert EngineConfig(quantize="none", lora_decode_dtype="bfloat16").resolve_lora_decode_dtype(cpu) == torch.bfloat16
    assert EngineConfig(quantize="int8", lora_decode_dtype="float32").resolve_lora_decode_dtype(cpu) == torch.float32
    assert EngineConfig(quantize="int8").resolve_lora_decode_dtype(cuda) == torch.float32
    with pytest.raises(InvalidRequestError, match="lora_decode_dtype"):
        EngineConfig(lora_decode_dtype="fp8").resolve_lora_decode_dtype(cpu)


def test_adapter_memory_is_a_budget_of_rank_rows(kernel_home):
    """auto keeps the old footprint (--max-adapters-on-device adapters of --max-rank); a size is shared out in
    rank rows, as many adapters as fit unless capped; the C kernel's int8 (or bf16) copies count; too small is refused."""
    from server.lora.stacks import RowStacks

    row = RowStacks.bytes_per_row(TINY, torch.float32)

    def pool(**fields):
        fields = {"home": str(kernel_home), "quantize": "none", "max_rank": 8, **fields}
        p = build_lora_backend(EngineConfig(**fields), TINY, CPU, torch.float32).pool
        p.shutdown()
        return p

    auto = pool(max_adapters_on_device=2)
    assert (auto.num_rows, auto.num_slots) == (16, 2)
    assert (pool().num_rows, pool().num_slots) == (64, 64)  # 8 adapters of rank 8; up to 64 of rank 1
    sized = pool(adapter_memory=str(41 * row))
    assert (sized.num_rows, sized.num_slots) == (40, 40)  # one row is the zero row
    assert sized.nbytes == 41 * row
    assert pool(adapter_memory=str(41 * row), max_adapters_on_device=3).num_slots == 3
    if shutil.which("gcc") or shutil.which("cc"):
        both = pool(adapter_memory=str(41 * row), quantize="int8")  # fp32 rows + their int8 copies and scales
        row8 = RowStacks.bytes_per_row(TINY, torch.int8)
        assert row8 == row // 4 + 2 * 4 * 7 * TINY.num_layers
        assert both.kernel_stacks is not None and both.kernel_stacks.dtype == torch.int8
        assert both.num_rows == 41 * row // (row + row8) - 1
        bf16 = pool(adapter_memory=str(41 * row), quantize="int8", lora_decode_dtype="bfloat16")
        assert bf16.kernel_stacks.dtype == torch.bfloat16 and bf16.num_rows == 41 * row * 2 // (3 * row) - 1
    with pytest.raises(InvalidRequestError, match="adapter_memory.*holds 7 rank rows.*needs 8"):
        pool(adapter_memory=str(9 * row - 1))


def test_a_fraction_of_free_memory_is_resolved_when_the_engine_sizes_it():
    cfg = EngineConfig(adapter_memory="25%", max_rank=4)
    assert cfg.resolve_adapter_rows(100, lambda: 10_000) == 24
    assert EngineConfig(adapter_memory="0.5", max_rank=4).resolve_adapter_rows(100, lambda: 10_000) == 49
    assert EngineConfig(adapter_memory="1KiB", max_rank=4).resolve_adapter_rows(100, lambda: 1 / 0) == 9
    with pytest.raises(InvalidRequestError, match="adapter_memory"):
        EngineConfig(adapter_memory="1%", max_rank=4).resolve_adapter_rows(100, lambda: 10_000)
