"""benchmarks/gpu_suite.py: steps in children with budgets, one JSON kept after every step, the dry run.

The GPU run itself needs a GPU; here the suite's machinery runs with small stand-in steps
(real child processes that succeed, fail, hang), and its --dry-run runs every real step's
tiny CPU version end to end so that the suite cannot rot between GPU sessions.
"""
from __future__ import annotations

import json
import signal
import sys

import pytest

from benchmarks import gpu_suite


def test_gpu_budgets_fit_eight_minutes_and_every_step_has_a_dry_run(tmp_path):
    plan = gpu_suite.steps(tmp_path, tmp_path / "work")
    assert [s.name for s in plan] == ["tests", "kernels", "e2e", "slora", "coldload"]
    assert sum(s.budget_s + gpu_suite.GRACE_S for s in plan) <= 8 * 60
    for s in plan:
        assert "--dry-run" in s.dry_argv or "--collect-only" in s.dry_argv
    for path in gpu_suite.GPU_TEST_FILES:
        assert (gpu_suite.ROOT / path).is_file(), path


def _stand_in(name: str, code: str, budget: float, out_json: str | None = None) -> gpu_suite.Step:
    argv = [sys.executable, "-c", code]
    return gpu_suite.Step(name, name, argv, argv, budget, budget, out_json)


@pytest.mark.slow  # the suite records the machine: imports torch, transformers, peft, triton
def test_a_failing_or_hanging_step_keeps_what_finished(tmp_path, monkeypatch):
    out = tmp_path / "suite.json"
    results = out.parent / "suite-dry-run"
    writes = (f"import json; json.dump({{'derived': [{{'B': 32, 'quantize': 'int8', 'x_peft_mixed': 150.0, "
              f"'lora_overhead_identical': 0.2}}]}}, open({str(results / 'e2e.json')!r}, 'w'))")
    plan = [_stand_in("e2e", writes, 60, "e2e.json"),
            _stand_in("crashes", "raise SystemExit(3)", 60),
            _stand_in("hangs", "import time; time.sleep(60)", 2)]
    monkeypatch.setattr(gpu_suite, "steps", lambda results, workdir: plan)
    assert gpu_suite.main(["--dry-run", "--out", str(out), "--workdir", str(tmp_path / "w")]) == 1
    data = json.loads(out.read_text())
    status = {s["name"]: s["status"] for s in data["steps"]}
    assert status == {"e2e": "ok", "crashes": "failed", "hangs": "timeout"}
    assert data["steps"][0]["result"]["derived"][0]["x_peft_mixed"] == 150.0
    goals = {g["figure"]: g for g in data["goals"]}
    x = goals["x PEFT mixed-batch throughput, 32 distinct adapters, int8"]
    assert x["value"] == 150.0 and x["met"] is True
    overhead = goals["LoRA overhead vs our base, all on one adapter, B=32, int8"]
    assert overhead["value"] == 0.2 and overhead["met"] is False
    assert goals["cold load p50 from host memory, rank 16 (s)"]["value"] is None  # not measured: never claimed


def _writes_when_interrupted(path) -> str:
    """A step's code that sleeps, and on KeyboardInterrupt writes {"cut": true} to `path` before ending."""
    return ("import json, time\ntry:\n    time.sleep(60)\nexcept KeyboardInterrupt:\n"
            f"    json.dump({{'cut': True}}, open({str(path)!r}, 'w'))\n    raise")


def test_a_step_past_its_budget_is_interrupted_and_keeps_what_it_wrote(tmp_path):
    """SIGINT first (pytest writes its report then; a benchmark's last rewrite stands), SIGKILL only after."""
    code = _writes_when_interrupted(tmp_path / "r.json")
    rec = gpu_suite.run_step(_stand_in("cut", code, 3, "r.json"), tmp_path, dry_run=True)
    assert rec["status"] == "timeout" and rec["result"] == {"cut": True}, rec
    assert rec["wall_s"] < 3 + gpu_suite.GRACE_S + 5


def test_a_suite_started_in_the_background_still_interrupts_its_steps(tmp_path):
    """A shell's background job (`make gpu-suite &`) runs with SIGINT ignored, which its children inherit: the
    suite gives them the default back, so an over-budget step still writes what it has."""
    code = _writes_when_interrupted(tmp_path / "r.json")
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        rec = gpu_suite.run_step(_stand_in("cut", code, 3, "r.json"), tmp_path, dry_run=True)
    finally:
        signal.signal(signal.SIGINT, before)
    assert rec["status"] == "timeout" and rec["result"] == {"cut": True}, rec
    assert rec["wall_s"] < 3 + gpu_suite.GRACE_S


def test_results_go_under_out_where_it_is_set(monkeypatch, tmp_path):
    monkeypatch.setenv("OUT", str(tmp_path))
    assert gpu_suite.default_out() == tmp_path / "gpu_suite.json"
    from benchmarks import gpu_common
    assert gpu_common.default_results_path("results/gpu_e2e.json") == str(tmp_path / "gpu_e2e.json")
    monkeypatch.delenv("OUT")
    assert gpu_suite.default_out() == gpu_suite.ROOT / "benchmarks" / "results" / "gpu_suite.json"
    assert gpu_common.default_results_path("results/gpu_e2e.json") == "results/gpu_e2e.json"


def test_wheels_install_one_by_one_without_dependencies(monkeypatch, tmp_path):
    """Each missing package alone with --no-deps: a bad wheel costs only itself, and no dependency (numpy) is
    copied onto the children's path ahead of the machine's own."""
    calls = []

    class Done:
        def __init__(self, rc):
            self.returncode, self.stdout, self.stderr = rc, "", "no wheel" if rc else ""

    def run(cmd, **kw):
        calls.append(cmd)
        return Done(1 if cmd[-1] == "broken" else 0)

    monkeypatch.setattr(gpu_suite, "WHEELS", tmp_path)
    monkeypatch.setattr(gpu_suite.subprocess, "run", run)
    ok, log = gpu_suite.install_wheels(["pytest", "broken", "pluggy"])
    assert not ok and [c[-1] for c in calls] == ["pytest", "broken", "pluggy"]
    assert all("--no-deps" in c and "--no-index" in c for c in calls)
    assert "broken: failed" in log and "pluggy: ok" in log


def test_e2e_ratios_skip_a_failed_row():
    from types import SimpleNamespace

    from benchmarks.gpu_e2e import _derive

    rows = [{"system": "roofline", "quantize": "int8", "B": 2, "decode_tok_s": 100.0, "tok_s": 100.0},
            {"system": "loraserve", "quantize": "int8", "B": 2, "tok_s": 50.0, "decode_tok_s": 70.0},
            {"system": "loraserve_identical", "quantize": "int8", "B": 2, "error": "RuntimeError: 1 failed"}]
    (d,) = _derive(rows, SimpleNamespace(batch=[2], quantize=["int8"]))
    assert d["roofline_fraction"] == 0.7 and d["lora_overhead_identical"] is None and d["x_peft_mixed"] is None


def test_missing_modules_names_pip_packages():
    assert gpu_suite.missing_modules({"json": "json-pkg", "no_such_module_xyz": "no-such-pkg"}) == ["no-such-pkg"]


@pytest.mark.slow
def test_dry_run_end_to_end(tmp_path):
    """Every real step's tiny CPU version, in children, as `python -m benchmarks.gpu_suite --dry-run` runs them."""
    out = tmp_path / "gpu_suite.json"
    code = gpu_suite.main(["--dry-run", "--out", str(out), "--workdir", str(tmp_path / "work"),
                           "--budget-scale", "6"])  # a loaded shared CI box: steps run minutes, not seconds
    data = json.loads(out.read_text())
    bad = {s["name"]: s["output_tail"][-1500:] for s in data["steps"] if s["status"] != "ok"}
    assert code == 0 and not bad, bad
    assert [s["name"] for s in data["steps"]] == ["tests", "kernels", "e2e", "slora", "coldload"]
    by = {s["name"]: s for s in data["steps"]}
    for name, bench in (("kernels", "gpu_kernels"), ("e2e", "gpu_e2e"), ("slora", "gpu_slora"),
                        ("coldload", "gpu_coldload")):
        assert by[name]["result"]["benchmark"] == bench
    assert by["tests"]["tests"]["collected"] >= 16  # the gpu-marked tests all collect
    assert data["machine"]["torch"] and data["dry_run"] is True
    filled = [g["figure"] for g in data["goals"] if g["value"] is not None]
    assert len(filled) == 8, filled  # all but the bf16-base roofline (the dry run runs int8 only)
