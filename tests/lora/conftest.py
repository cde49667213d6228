"""Interpreter-only kernel cases run in a TRITON_INTERPRET=1 child process, not beside it; the C kernel,
built once into a test home for the CPU kernel, backend and factory tests."""
from __future__ import annotations

import os

import pytest

from server.core.paths import resolve_kernel_cache
from server.lora import cpu_kernel


def pytest_collection_modifyitems(config, items):
    if os.environ.get("TRITON_INTERPRET") == "1":
        return
    keep = [i for i in items if i.get_closest_marker("interpreter_child") is None]
    dropped = [i for i in items if i.get_closest_marker("interpreter_child") is not None]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


@pytest.fixture(scope="session")
def kernel_home(tmp_path_factory):
    """An engine home (`--home`) for the tests (their kernels come from the run's kernel cache)."""
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="session")
def kernel():
    return cpu_kernel.load(resolve_kernel_cache())
