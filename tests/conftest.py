"""Shared fixtures: a tiny random Llama with adapters (fast), and the real default model (slow, cached)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from server.core.paths import KERNEL_CACHE_ENV, resolve_kernel_cache  # noqa: E402

# One kernel cache for the run, whatever home a test's engine or server has: kernels depend on the CPU only,
# and a fresh home would otherwise compile all of them again (about 6 s each time).
os.environ.setdefault(KERNEL_CACHE_ENV, str(resolve_kernel_cache()))

from tests.helpers import make_peft_adapter, make_tiny_model_dir  # noqa: E402

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def pytest_collection_modifyitems(config, items):
    """Interpreter-only Triton cases run in a TRITON_INTERPRET=1 child process (their file's
    `test_*_under_interpreter`), never beside it: deselected here, not skipped."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return
    keep = [i for i in items if i.get_closest_marker("interpreter_child") is None]
    dropped = [i for i in items if i.get_closest_marker("interpreter_child") is not None]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_adapters(tiny_dir, tmp_path_factory) -> dict[str, Path]:
    """Adapters that differ in every way PEFT lets them: rank, targets, alpha, rsLoRA, patterns."""
    root = tmp_path_factory.mktemp("adapters")
    return {
        "all_r8": make_peft_adapter(tiny_dir, root / "all_r8", r=8, alpha=16, targets=ALL_TARGETS, seed=1),
        "qv_r4": make_peft_adapter(tiny_dir, root / "qv_r4", r=4, alpha=4, targets=("q_proj", "v_proj"), seed=2),
        "mlp_rs": make_peft_adapter(tiny_dir, root / "mlp_rs", r=16, alpha=8, use_rslora=True,
                                    targets=("gate_proj", "up_proj", "down_proj"), seed=3),
        "pattern": make_peft_adapter(tiny_dir, root / "pattern", r=2, alpha=3,
                                     targets=("k_proj", "o_proj", "down_proj"),
                                     rank_pattern={"down_proj": 6}, alpha_pattern={"o_proj": 11}, seed=4),
    }


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The real SmolLM2-135M-Instruct, converted once into the cache."""
    from server.core.paths import resolve_home
    from server.model.loader import resolve_model

    return resolve_model("default", resolve_home())
