import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from adapter_registry import Registry  # noqa: E402

from .adapters import FINGERPRINT, TINY  # noqa: E402


@pytest.fixture
def registry(tmp_path):
    imports = tmp_path / "imports"
    imports.mkdir()
    reg = Registry(tmp_path / "reg", TINY, FINGERPRINT, max_rank=16, import_dirs=[imports],
                   host_cache_bytes=1 << 20)
    yield reg
    reg.close()
