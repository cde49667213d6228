"""The admin client refuses a local adapter path it cannot upload before it opens a call, saying why."""
from __future__ import annotations

from pathlib import Path

import pytest

from server.client.admin import register


class NoCalls:
    """A stub that fails the test if any call is made: the path must be refused first."""

    def __getattr__(self, name):
        raise AssertionError(f"{name} was called")


@pytest.mark.parametrize("make, words", [
    (lambda d: d / "typo", "does not exist"),
    (lambda d: (d / "file").write_text("x") and d / "file", "is not a directory"),
    (lambda d: (d / "empty").mkdir() or d / "empty", "has no adapter_config.json"),
])
def test_a_path_that_is_no_adapter_is_named(tmp_path: Path, make, words: str) -> None:
    path = make(tmp_path)
    with pytest.raises(SystemExit) as e:
        register(NoCalls(), "support", path, {}, server_path=False)
    assert str(e.value).startswith(f"error: {path} {words}")
