"""The C kernel, built once into a test home for the CPU kernel, backend and factory tests."""
from __future__ import annotations

import pytest

from server.core.paths import resolve_kernel_cache
from server.lora import cpu_kernel


@pytest.fixture(scope="session")
def kernel_home(tmp_path_factory):
    """An engine home (`--home`) for the tests (their kernels come from the run's kernel cache)."""
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="session")
def kernel():
    return cpu_kernel.load(resolve_kernel_cache())
