"""The loraserve home: one resolution for every process (server, trainer, benchmarks, tests)."""
from __future__ import annotations

from pathlib import Path

from server.core.engine_config import EngineConfig
from server.core.paths import resolve_home


def test_home_resolution(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LORASERVE_HOME", str(tmp_path / "env"))
    assert resolve_home() == tmp_path / "env"
    assert resolve_home(tmp_path / "arg") == tmp_path / "arg"
    assert EngineConfig().resolve_home() == tmp_path / "env"
    assert EngineConfig(home=str(tmp_path / "arg")).resolve_home() == tmp_path / "arg"
    monkeypatch.delenv("LORASERVE_HOME")
    assert resolve_home() == Path.home() / ".cache" / "loraserve"
    assert EngineConfig().resolve_home() == Path.home() / ".cache" / "loraserve"
    assert resolve_home("", env={"LORASERVE_HOME": "~/h"}) == Path.home() / "h"
