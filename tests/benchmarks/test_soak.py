"""The soak, 30 s of it, against the real server on the tiny random Llama: every check it makes must pass
(no unexpected status, greedy answers equal to the same request served alone, a clean engine at the end,
bounded memory, no internal error). About 45-90 s in all; CI runs it in `make test`, and `make reliability`
prints its figures. docs/reliability.md quotes a 20-minute run (benchmarks/results/soak.json)."""
from __future__ import annotations

import json

import pytest

from benchmarks import soak

pytestmark = [pytest.mark.e2e, pytest.mark.slow]  # in `make test` (CI) and `make reliability`


@pytest.mark.timeout(900)
def test_thirty_second_soak(tmp_path, tiny_dir):
    out = tmp_path / "soak.json"
    rc = soak.main(["--duration", "30", "--model", str(tiny_dir), "--cpu-threads", "1", "--replay-max", "200",
                    "--workdir", str(tmp_path / "work"), "--home", str(tmp_path / "home"), "--output", str(out)])
    report = json.loads(out.read_text())
    failed = [name for name, ok in report["checks"].items() if not ok]
    assert rc == 0 and not failed, (failed, report["unexpected_examples"], report["greedy_replay"], report["rss"])
    kinds = report["statuses_by_kind"]
    assert kinds["cancelled"].get("CANCELLED", 0) > 0 and kinds["deadline"] == {
        "DEADLINE_EXCEEDED": sum(kinds["deadline"].values())}
    assert report["hot_swaps"]["versions_registered"] >= 10  # one every 2 s
    assert report["greedy_replay"]["answers_checked"] >= 10
    assert set(report["latency"]) == {"acme", "globex", "initech"}
