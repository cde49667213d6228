"""A benchmark's results file is replaced whole: a run that dies while writing leaves the previous file."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.common import write_json


def test_a_write_that_dies_midway_leaves_the_previous_results(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "results" / "bench.json"
    write_json(out, {"run": 1, "tok_s": 493.0})
    real_write = Path.write_text

    def dies_midway(self: Path, text: str, *args, **kwargs) -> int:
        real_write(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", dies_midway)
    with pytest.raises(OSError, match="No space left on device"):
        write_json(out, {"run": 2, "tok_s": 512.0, "rows": list(range(100))})
    monkeypatch.undo()
    assert json.loads(out.read_text()) == {"run": 1, "tok_s": 493.0}
    assert [p.name for p in out.parent.iterdir()] == ["bench.json"]  # no half-written file left beside it
    write_json(out, {"run": 3})
    assert json.loads(out.read_text()) == {"run": 3}
