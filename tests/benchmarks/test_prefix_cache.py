"""`python -m benchmarks.prefix_cache` end to end on a tiny random Llama: both engines run every round on the
same fresh prompts, the cache-on engine hits where prompts share a prefix and never across rounds, and the
results file holds the per-round ratios and the goals judged on their medians.

Timings are not asserted (they depend on the machine); the cache's counts are.
"""
from __future__ import annotations

import json

import pytest

from benchmarks import prefix_cache


@pytest.mark.slow  # two tiny engines and PEFT-written adapters: about 15 s
def test_rounds_pair_both_engines_on_fresh_prompts(tiny_dir, tmp_path):
    out = tmp_path / "prefix_cache.json"
    code = prefix_cache.main(["--model", str(tiny_dir), "--requests", "6", "--adapters", "2", "--system-len", "32",
                              "--question-len", "8", "--new-tokens", "3", "--rank", "4", "--rounds", "2",
                              "--out", str(out)])
    assert code == 0
    data = json.loads(out.read_text())
    assert [r["order"] for r in data["rounds"]] == ["off, on", "on, off"]
    for r in data["rounds"]:
        assert r["off"]["shared"]["tokens"] == r["on"]["shared"]["tokens"] == 6 * 3
        assert r["off"]["shared"]["cache_hits"] == 0
        # all but each adapter's first request hit, every round: earlier rounds' prompts never match
        assert r["on"]["shared"]["cache_hits"] == 6 - 2 and r["on"]["shared"]["cache_misses"] == 2
        assert set(r["ratios"]) >= {"ttft_hit_p50_speedup", "shared_throughput_ratio", "distinct_throughput_change"}
    summary = data["summary"]
    assert set(summary["goals"]) == set(prefix_cache.GOALS)
    assert all(g["rounds"] == 2 for g in summary["goals"].values())
    assert summary["shared_throughput_ratio"]["min"] <= summary["shared_throughput_ratio"]["median"]
    assert data["load_average"]["before"] and data["load_average"]["after"]
