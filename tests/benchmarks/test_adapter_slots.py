"""`python -m benchmarks.adapter_slots` end to end on a tiny random Llama: every arm runs the same workload and
the results file holds what the table and the goals are made of.

Timings are not asserted (they depend on the machine); the counts are: each arm generates every token, the
by-rank arm loads nothing in the timed run once its adapters are resident, and the capped arm, with fewer slots
than adapters, has to load and evict.
"""
from __future__ import annotations

import json

import pytest

from benchmarks import adapter_slots


@pytest.mark.slow  # three tiny engines and PEFT-written adapters: about 20 s
def test_arms_run_the_same_workload_and_the_file_says_so(tiny_dir, tmp_path):
    out = tmp_path / "adapter_slots.json"
    code = adapter_slots.main(["--model", str(tiny_dir), "--adapters", "5", "--rank", "4", "--max-rank", "8",
                               "--requests", "12", "--concurrency", "3", "--new-tokens", "3", "--fixed-slots", "2",
                               "--rounds", "1", "--out", str(out)])
    assert code == 0
    data = json.loads(out.read_text())
    runs = {r["arm"]: r for r in data["runs"]}
    assert set(runs) == {"by-rank", "fixed-2", "one-adapter"}
    assert all(r["tokens"] == 12 * 3 for r in runs.values())
    assert runs["by-rank"]["loads"] == 0 and runs["by-rank"]["warmup_loads"] == runs["by-rank"]["adapters_used"]
    assert runs["fixed-2"]["slots"] == 2 and runs["fixed-2"]["evictions"] > 0
    assert runs["fixed-2"]["misses"] == runs["fixed-2"]["loads"]  # one miss per load waited for
    assert runs["one-adapter"]["adapters_used"] == 1
    assert set(data["summary"]["goals_met"]) == {"ttft_p99_within_1.5x", "throughput_within_5pct"}
    assert len(data["summary"]["throughput_change_rounds"]) == 1  # one round: one paired ratio
    assert [row["arm"] for row in data["table"]] == ["by-rank", "fixed-2", "one-adapter"]
    assert data["load_average"]["before"] and data["load_average"]["after"]
