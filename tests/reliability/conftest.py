"""Fault-injection tests start the real `loraserve serve` process (tests/e2e/conftest.py's start_server)
on the tiny random Llama, so restarts and floods cost seconds, not minutes; docs/reliability.md quotes them."""
from __future__ import annotations

from pathlib import Path

import pytest

from server.model.config import ModelConfig
from tests.registry.adapters import make_adapter


# One engine thread in fp32: a 2-core machine shared with other work stays responsive (two OpenMP threads
# spinning against other processes made a 16-token tiny request take seconds instead of ~80 ms).
TINY_SERVER_ARGS = ("--quantize", "none", "--cpu-threads", "1", "--dtype", "float32")


@pytest.fixture(scope="session")
def tiny_config(tiny_dir: Path) -> ModelConfig:
    return ModelConfig.from_file(tiny_dir / "config.json")


def adapter_bytes(config: ModelConfig, seed: int, rank: int = 4, targets=("q", "v")) -> tuple[bytes, bytes]:
    """(adapter_config.json, adapter_model.safetensors) of a random LoRA for the tiny model."""
    return make_adapter(model=config, rank=rank, targets=targets, seed=seed)
