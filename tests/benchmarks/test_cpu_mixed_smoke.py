"""`make bench`'s code path end to end on a tiny random Llama: every system runs, the numbers add up.

Timing values themselves are not asserted (they depend on the machine); what is
checked is that each system did the same work (token counts, finish on length),
that the derived columns follow from the raw timings, and that our fp32 engine
produces PEFT's tokens, so the benchmark compares like with like. Each group of
systems runs in a child process of its own (libgomp: see server/core/threads.py),
with the timed rounds interleaved across the children; the protocol between parent and
children is also checked quickly with stand-in children that do not load torch.
"""
from __future__ import annotations

import json
import os
import sys
import time

import pytest

from benchmarks import cpu_mixed
from benchmarks.common import median
from benchmarks.cpu_mixed.config import ALL_SYSTEMS, GOAL_LORA_OVERHEAD, GOAL_SPEEDUP, HF_SYSTEMS, BenchConfig
from benchmarks.cpu_mixed.groups import isolation_note, system_groups
from benchmarks.cpu_mixed.protocol import PROTOCOL_PREFIX, run_workers

slow = pytest.mark.slow  # three child processes (each imports torch): two engines, transformers and PEFT, all tiny


@pytest.fixture(scope="module")
def payload(tiny_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    cfg = BenchConfig(model=str(tiny_dir), requests=3, adapters=3, rank=16, prompt_len=8, new_tokens=4,
                      repeats=2, out=str(tmp / "results" / "cpu_mixed.json"), workdir=str(tmp / "adapters"),
                      home=str(tmp / "home"))
    timelines = []
    real = cpu_mixed.measure_in_children

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        timelines.append(out[2])
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu_mixed, "measure_in_children", spy)
        data = cpu_mixed.run(cfg)
    return data, cfg, timelines[0]


@slow
def test_every_system_did_the_same_work(payload):
    data, cfg, _ = payload
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
    data, _, _ = payload
    rows = {r["system"]: r for r in data["results"]}
    ref = rows["peft-mixed"]
    assert rows["peft-mixed"]["x_peft_mixed"] == pytest.approx(1.0)
    for name, r in rows.items():  # per round: PEFT's wall time over this system's, then the median
        per_round = [p / w for p, w in zip(ref["runs_wall_s"], r["runs_wall_s"])]
        assert r["x_peft_mixed_rounds"] == pytest.approx(per_round)
        assert r["x_peft_mixed"] == pytest.approx(median(per_round))
        assert r["x_peft_mixed_of_medians"] == pytest.approx(r["tok_s"] / ref["tok_s"])
    for lora, base in (("loraserve", "loraserve-base"), ("loraserve-none", "loraserve-none-base")):
        per_round = [a / b - 1 for a, b in zip(rows[lora]["runs_wall_s"], rows[base]["runs_wall_s"])]
        want = median(per_round)
        assert rows[lora]["lora_overhead"] == pytest.approx(want)
        assert rows[lora]["lora_overhead_of_medians"] == pytest.approx(rows[base]["tok_s"] / rows[lora]["tok_s"] - 1)
        assert data["goals"][lora]["overhead_met"] == (want <= GOAL_LORA_OVERHEAD)
        assert data["goals"][lora]["speedup_met"] == (rows[lora]["x_peft_mixed"] >= GOAL_SPEEDUP)


@slow
def test_engine_runs_are_warm_and_exact(payload):
    data, cfg, _ = payload
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
    data, cfg, _ = payload
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
def test_roofline_and_kernel_are_reported(payload):
    """The machine's limits measured in the run, each step against its floors, and the kernel that ran."""
    data, cfg, _ = payload
    r = data["roofline"]
    assert r["limits"]["read_bytes_per_s"] > 0 and r["limits"]["fp32_flops_per_s"] > 0
    assert len(r["limits"]["samples"]) == 2  # before and after the children ran
    assert [s["step"] for s in r["steps"]] == ["decode, no adapters", "decode, 3 adapters", "prefill, 3 adapters"]
    assert all(s["measured_s"] > 0 and s["of_floor"] > 0 for s in r["steps"])
    assert r["lora_share"]["lora_bytes"] > 0 and "roofline" in data["table"]
    rows = {x["system"]: x for x in data["results"]}
    assert "int8 dynamic" in rows["loraserve"]["base_kernel"] and rows["loraserve-none"]["base_kernel"].startswith("dense")


@slow
def test_each_group_ran_in_its_own_process(payload):
    data, cfg, _ = payload
    groups = system_groups(cfg)
    assert [g.name for g in groups] == ["loraserve", "loraserve-none", "hf"]
    assert data["workload"]["isolation"] == isolation_note(groups)
    assert data["workload"]["isolation"].startswith("one process per group, timed rounds interleaved across the "
                                                    "group processes")
    assert data["workload"]["isolation"].endswith("): loraserve (loraserve, loraserve-base); loraserve-none "
                                                  "(loraserve-none, loraserve-none-base); hf (hf-base, peft-mixed, "
                                                  "peft-single)")
    ran = {r["system"]: r for r in data["results"]}
    assert sorted(ran) == sorted(cfg.systems) == sorted(s for g in groups for s in g.systems)
    assert all(len(ran[s]["runs_wall_s"]) == cfg.repeats and ran[s]["tokens_per_run"] > 0 for s in cfg.systems)


def test_groups_follow_the_selected_systems():
    picked = system_groups(BenchConfig(systems=("peft-single", "loraserve-base")))
    assert [(g.name, g.systems, g.quantize) for g in picked] == [("loraserve", ["loraserve-base"], "int8"),
                                                                 ("hf", ["peft-single"], "")]
    only_none = system_groups(BenchConfig(quantize="none"))
    assert [(g.name, g.systems) for g in only_none] == [("loraserve", ["loraserve", "loraserve-base"]),
                                                        ("hf", list(HF_SYSTEMS))]


@slow
def test_rounds_interleave_across_the_group_processes(payload):
    _, cfg, timeline = payload
    want = [(g, r) for r in range(1, cfg.repeats + 1) for g in ("loraserve", "loraserve-none", "hf")]
    assert [(t["group"], t["round"]) for t in timeline] == want
    # The children's own clocks: loraserve round 1 before loraserve-none round 1 before hf round 1 before
    # loraserve round 2 ..., and no two groups measure at the same time.
    by_clock = sorted(timeline, key=lambda t: t["start"])
    assert [(t["group"], t["round"]) for t in by_clock] == want
    assert all(x["start"] < x["end"] <= y["start"] for x, y in zip(by_clock, by_clock[1:]))


# A stand-in for `--worker` that speaks worker_main's protocol without loading torch.
# argv: group, pid file, trouble ("" none, "setup" crash, "hang-setup", "roundN" crash, "hang-roundN"), prefix.
FAKE_WORKER = r'''
import json, os, sys, time
group, pid_file, trouble, prefix = sys.argv[1:5]
open(pid_file, "w").write(str(os.getpid()))
proto = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)
print("setting up " + group, flush=True)  # fd 1 is stderr now: a log line
proto.write("stray output on stdout\n")   # no protocol prefix: shown, otherwise ignored
proto.flush()


def answer(msg):
    proto.write(prefix + json.dumps(msg) + "\n")
    proto.flush()


if trouble == "setup":
    sys.exit("worker blew up")
if trouble == "hang-setup":
    time.sleep(60)
answer({"event": "ready", "group": group, "pid": os.getpid()})
for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["cmd"] == "round":
        r = cmd["round"]
        if trouble == f"round{r}":
            raise RuntimeError(f"round {r} blew up")
        if trouble == f"hang-round{r}":
            time.sleep(60)
        print(f"{group} round {r}", flush=True)
        start = time.time()
        time.sleep(0.02)
        answer({"event": "round", "group": group, "round": r, "start": start, "end": time.time()})
    elif cmd["cmd"] == "finish":
        answer({"event": "results", "group": group, "model": None, "results": []})
        sys.exit(0)
sys.exit("stdin closed")
'''


def fake_workers(tmp_path, trouble=None):
    trouble = trouble or {}
    return {g: [sys.executable, "-c", FAKE_WORKER, g, str(tmp_path / f"{g}.pid"), trouble.get(g, ""),
                PROTOCOL_PREFIX] for g in ("a", "b", "c")}


def started_and_alive(tmp_path):
    """Pids of the stand-ins that started, and those of them still running (not yet reaped)."""
    started = [int(f.read_text()) for f in tmp_path.glob("*.pid")]
    alive = []
    for pid in started:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        alive.append(pid)
    return started, alive


def test_rounds_interleave_across_persistent_children(tmp_path, capfd):
    outs, timeline = run_workers(fake_workers(tmp_path), repeats=3, timeout_s=60)
    assert outs == {g: {"event": "results", "group": g, "model": None, "results": []} for g in "abc"}
    want = [(g, r) for r in (1, 2, 3) for g in "abc"]  # a1 b1 c1 a2 b2 c2 a3 b3 c3
    assert [(t["group"], t["round"]) for t in timeline] == want
    by_clock = sorted(timeline, key=lambda t: t["start"])
    assert [(t["group"], t["round"]) for t in by_clock] == want
    assert all(x["start"] < x["end"] <= y["start"] for x, y in zip(by_clock, by_clock[1:]))
    err = capfd.readouterr().err
    assert "setting up a" in err and "c round 3" in err and "stray output on stdout" in err
    started, alive = started_and_alive(tmp_path)
    assert len(started) == 3 and alive == []


def test_a_failing_or_hanging_child_fails_the_run_with_its_output(tmp_path):
    with pytest.raises(RuntimeError, match=r"(?s)worker a failed with exit status 1 \(waiting for its set-up\)"
                                           r".*setting up a.*worker blew up"):
        run_workers(fake_workers(tmp_path, {"a": "setup"}), 2, 60)
    with pytest.raises(RuntimeError, match=r"(?s)worker a ran past 1 s and was killed \(waiting for its set-up\)"
                                           r".*setting up a"):
        run_workers(fake_workers(tmp_path, {"a": "hang-setup"}), 2, 1)
    assert started_and_alive(tmp_path)[1] == []


@pytest.mark.parametrize("trouble, error", [
    ("round2", r"(?s)worker b failed with exit status 1 \(waiting for round 2\).*b round 1.*round 2 blew up"),
    ("hang-round2", r"(?s)worker b ran past 2 s and was killed \(waiting for round 2\).*b round 1"),
], ids=["crash", "hang"])
def test_a_child_failing_mid_run_fails_the_run_and_no_child_outlives_it(tmp_path, trouble, error):
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match=error):
        run_workers(fake_workers(tmp_path, {"b": trouble}), 3, 2)
    assert time.perf_counter() - t0 < 30
    started, alive = started_and_alive(tmp_path)
    assert len(started) == 3 and alive == []  # a and c sat idle waiting for their next command: killed too


def test_bad_arguments_exit_2(capsys):
    assert cpu_mixed.main(["--systems", "nope", "--out", ""]) == 2
    assert "unknown systems" in capsys.readouterr().err
    assert cpu_mixed.main(["--requests", "2", "--adapters", "4", "--out", ""]) == 2
