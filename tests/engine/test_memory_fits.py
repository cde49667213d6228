"""A KV cache or adapter memory larger than the free memory is refused at start-up by name: on CPU Linux grants
the allocation and the OOM killer ends the process later, with no message at all (seen: exit 137)."""
from __future__ import annotations

import pytest
import torch

from server.core.engine_config import EngineConfig
from server.core.errors import InvalidRequestError
from server.core.sizes import available_host_memory, check_fits, human_bytes
from server.lora.factory import build_lora_backend
from tests.engine.engine_utils import make_engine
from tests.lora.backend_utils import TINY

TOO_MUCH = 4 * max(available_host_memory(), 1 << 30)


def test_check_fits_names_both_sizes():
    assert check_fits("x", 10, 100, "cpu") is None
    assert check_fits("x", 10, 0, "cpu") is None  # unknown free memory: nothing to say
    assert check_fits("a KV cache", 3 << 30, 1 << 30, "cpu") == \
        "a KV cache needs 3.0 GiB, more than the 1.0 GiB free on cpu"
    assert [human_bytes(n) for n in (512, 1536, 5 << 20, 1 << 40)] == ["512 B", "1.5 KiB", "5.0 MiB", "1.0 TiB"]


@pytest.mark.skipif(available_host_memory() == 0, reason="MemAvailable cannot be read here")
def test_a_kv_cache_larger_than_memory_is_refused(tiny_dir):
    with pytest.raises(InvalidRequestError) as e:
        make_engine(tiny_dir, kv_cache_tokens=TOO_MUCH // 64)  # the tiny model's K+V are more than 64 bytes a token
    assert e.value.field == "engine.kv_cache_tokens"
    assert "free on cpu: lower --kv-cache-tokens" in str(e.value)


@pytest.mark.skipif(available_host_memory() == 0, reason="MemAvailable cannot be read here")
def test_adapter_memory_larger_than_memory_is_refused():
    config = EngineConfig(adapter_memory=str(TOO_MUCH), max_rank=8)
    with pytest.raises(InvalidRequestError) as e:
        build_lora_backend(config, TINY, torch.device("cpu"), torch.float32)
    assert e.value.field == "engine.adapter_memory"
    assert "free on cpu: lower --adapter-memory" in str(e.value) and f"--adapter-memory {TOO_MUCH}" in str(e.value)


@pytest.mark.skipif(available_host_memory() == 0, reason="MemAvailable cannot be read here")
def test_auto_adapter_memory_past_memory_names_the_rank():
    """`auto` is 8 adapters of --max-rank: the flag to change is the rank, not a budget nobody gave."""
    rank = TOO_MUCH // (8 * 1000)  # rank rows of the tiny model take more than 1000 bytes
    with pytest.raises(InvalidRequestError) as e:
        build_lora_backend(EngineConfig(max_rank=rank), TINY, torch.device("cpu"), torch.float32)
    assert "lower --max-rank or --max-adapters-on-device" in str(e.value)
