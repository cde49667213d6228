"""`loraserve bench` against a server it cannot reach: the errors counted, no figure invented, valid JSON."""
from __future__ import annotations

import json
import socket

from server.client import loadgen


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once this is closed


def test_no_sample_means_no_figure_and_json_stays_json(tmp_path, capsys) -> None:
    out = tmp_path / "bench.json"
    rc = loadgen.main(["--target", f"127.0.0.1:{_closed_port()}", "--requests", "2", "--concurrency", "2",
                       "--output", str(out)])
    assert rc == 1
    table = capsys.readouterr().out
    assert "requests ok / sent         0 / 2" in table and "UNAVAILABLE" in table
    assert "TTFT p50 / p99 (s)         - / -" in table and "nan" not in table
    summary = json.loads(out.read_text(), parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
    assert summary["ttft_p50_s"] is None and summary["latency_p99_s"] is None and summary["ok"] == 0
