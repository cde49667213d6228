"""`make bench`'s code path end to end on a tiny random Llama: every system runs, the numbers add up.

Timing values themselves are not asserted (they depend on the machine); what is
checked is that each system did the same work (token counts, finish on length),
that the derived columns follow from the raw timings, and that our fp32 engine
produces PEFT's tokens, so the benchmark compares like with like. Each group of
systems runs in a child process of its own (libgomp: see server/engine/threads.py).
"""
from __future__ import annotations

import json
import sys

import pytest

from benchmarks import cpu_mixed
from benchmarks.cpu_mixed import ALL_SYSTEMS, BenchConfig

slow = pytest.mark.slow  # three child processes (each imports torch): two engines, transformers and PEFT, all tiny


@pytest.fixture(scope="module")
def payload(tiny_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    cfg = BenchConfig(model=str(tiny_dir), requests=3, adapters=3, rank=16, prompt_len=8, new_tokens=4,
                      repeats=2, out=str(tmp / "results" / "cpu_mixed.json"), workdir=str(tmp / "adapters"),
                      home=str(tmp / "home"))
    return cpu_mixed.run(cfg), cfg


@slow
def test_every_system_did_the_same_work(payload):
    data, cfg = payload
    rows = {r["system"]: r for r in data["results"]}
    assert list(rows) == list(ALL_SYSTEMS)
    for r in rows.values():
        assert r["tokens_per_run"] == cfg.requests * cfg.new_tokens
        assert len(r["runs_wall_s"]) == cfg.repeats and all(t > 0 for t in r["runs_wall_s"])
        assert r["tok_s"] == pytest.approx(r["tokens_per_run"] / r["wall_s"])
        assert min(r["runs_wall_s"]) <= r["wall_s"] <= max(r["runs_wall_s"])
        assert 0 < r["request_latency_s"] <= max(r["runs_wall_s"]) * 1.001


@slow
def test_ratios_follow_from_the_timings(payload):
    data, _ = payload
    rows = {r["system"]: r for r in data["results"]}
    ref = rows["peft-mixed"]["tok_s"]
    assert rows["peft-mixed"]["x_peft_mixed"] == pytest.approx(1.0)
    for name, r in rows.items():
        assert r["x_peft_mixed"] == pytest.approx(r["tok_s"] / ref)
    for lora, base in (("loraserve", "loraserve-base"), ("loraserve-none", "loraserve-none-base")):
        want = rows[base]["tok_s"] / rows[lora]["tok_s"] - 1
        assert rows[lora]["lora_overhead"] == pytest.approx(want)
        assert data["goals"][lora]["overhead_met"] == (want <= cpu_mixed.GOAL_LORA_OVERHEAD)
        assert data["goals"][lora]["speedup_met"] == (rows[lora]["x_peft_mixed"] >= cpu_mixed.GOAL_SPEEDUP)


@slow
def test_engine_runs_are_warm_and_exact(payload):
    data, cfg = payload
    rows = {r["system"]: r for r in data["results"]}
    for name in ("loraserve", "loraserve-none"):
        assert rows[name]["adapter_loads_total"] == cfg.adapters
        assert rows[name]["adapter_loads_during_timing"] == 0
        assert rows[name]["ttft_s"] is not None and rows[name]["ttft_s"] <= rows[name]["request_latency_s"]
    # fp32, no quantization: the same greedy tokens as PEFT's mixed batch and transformers' base batch.
    assert rows["loraserve-none"]["agreement"]["identical_requests"] == cfg.requests
    assert rows["loraserve-none-base"]["agreement"]["identical_requests"] == cfg.requests


@slow
def test_json_and_table_describe_the_run(payload):
    data, cfg = payload
    on_disk = json.loads(open(cfg.out).read())
    assert on_disk["results"] == json.loads(json.dumps(data["results"], default=str))
    m = on_disk["machine"]
    assert m["cpu_model"] and m["cpu_cores_usable"] >= 1 and "avx512_bf16" in m["cpu_flags"]
    assert on_disk["model"]["layers"] == 2 and on_disk["model"]["hidden"] == 64
    w = on_disk["workload"]
    assert (w["requests"], w["distinct_adapters"], w["rank"], w["prompt_len"], w["new_tokens"]) == (3, 3, 16, 8, 4)
    assert len(w["targets"]) == 7
    for name in ALL_SYSTEMS:
        assert name in on_disk["table"]


@slow
def test_each_group_ran_in_its_own_process(payload):
    data, cfg = payload
    groups = cpu_mixed.system_groups(cfg)
    assert [g.name for g in groups] == ["loraserve", "loraserve-none", "hf"]
    assert data["workload"]["isolation"] == cpu_mixed.isolation_note(groups)
    assert data["workload"]["isolation"].startswith("one process per group: loraserve (loraserve, loraserve-base); ")
    ran = {r["system"]: r for r in data["results"]}
    assert sorted(ran) == sorted(cfg.systems) == sorted(s for g in groups for s in g.systems)
    assert all(len(ran[s]["runs_wall_s"]) == cfg.repeats and ran[s]["tokens_per_run"] > 0 for s in cfg.systems)


def test_groups_follow_the_selected_systems():
    picked = cpu_mixed.system_groups(BenchConfig(systems=("peft-single", "loraserve-base")))
    assert [(g.name, g.systems, g.quantize) for g in picked] == [("loraserve", ["loraserve-base"], "int8"),
                                                                 ("hf", ["peft-single"], "")]
    only_none = cpu_mixed.system_groups(BenchConfig(quantize="none"))
    assert [(g.name, g.systems) for g in only_none] == [("loraserve", ["loraserve", "loraserve-base"]),
                                                        ("hf", list(cpu_mixed.HF_SYSTEMS))]


def test_a_failing_or_hanging_child_fails_the_run_with_its_output():
    crash = [sys.executable, "-c", "import sys; print('loading'); sys.exit('worker blew up')"]
    with pytest.raises(RuntimeError, match=r"(?s)worker x failed with exit status 1.*loading.*worker blew up"):
        cpu_mixed.run_child(crash, 60, "worker x")
    hang = [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"]
    with pytest.raises(RuntimeError, match=r"(?s)worker y ran past 1 s and was killed.*started"):
        cpu_mixed.run_child(hang, 1, "worker y")


def test_bad_arguments_exit_2(capsys):
    assert cpu_mixed.main(["--systems", "nope", "--out", ""]) == 2
    assert "unknown systems" in capsys.readouterr().err
    assert cpu_mixed.main(["--requests", "2", "--adapters", "4", "--out", ""]) == 2
