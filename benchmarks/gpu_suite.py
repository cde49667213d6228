"""The whole GPU check in one command: CUDA tests, kernel timings, end to end, S-LoRA, cold load.

GPU time comes in short, scarce slots, so everything the GPU issue asks for runs from
here in one go (under 8 minutes on an H100/H200), in order, each step in a child
process with its own time budget. After every step the suite rewrites one JSON
(gpu_suite.json, the steps' own JSONs in suite/ beside it): a step that fails, hangs
or crashes the driver costs only itself, and what finished before it is kept. A step
past its budget gets SIGINT (pytest then writes its report) and, GRACE_S later, SIGKILL;
the benchmarks rewrite their JSON after every configuration, so a cut-short one keeps
what it measured. At the end it prints one table of steps and one of the issue's goals,
each figure beside its goal.

Where the environment sets $OUT (the device machine returns only what is written
under it), everything goes under $OUT by default; elsewhere under benchmarks/results/.

    python -m benchmarks.gpu_suite                 # on the GPU machine (or: make gpu-suite)
    python -m benchmarks.gpu_suite --dry-run       # tiny CPU version of every step (CI runs it)
    python -m benchmarks.gpu_suite --only e2e slora

What the GPU machine needs beyond torch, triton, transformers and peft is `REQUIRED`
below (`OPTIONAL` only improves coverage: matplotlib draws PNGs beside the JSONs). It
reaches no package registry, so those come as wheels in the ignored .whl/ folder
(docs/benchmarks.md, "Carrying wheels"): the suite installs each missing one alone with
`pip install --no-deps --no-index --find-links .whl --target .whl/site` and puts that
folder on the children's path, leaving the machine's environment alone; with --no-deps
no dependency's copy (numpy's above all) lands there ahead of the machine's own. It
also prints whether Triton can build its launcher here (a C compiler, Python.h).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parent.parent
WHEELS = ROOT / ".whl"
WHEEL_SITE = WHEELS / "site"
# Import name -> pip name, for what the suite's steps import beyond torch/triton/transformers/peft; pytest's own
# dependencies are named, as each missing package is installed alone without its dependencies.
REQUIRED = {"pytest": "pytest", "pluggy": "pluggy", "iniconfig": "iniconfig", "packaging": "packaging",
            "pygments": "pygments", "safetensors": "safetensors", "tokenizers": "tokenizers", "numpy": "numpy",
            "tqdm": "tqdm", **({"exceptiongroup": "exceptiongroup", "tomli": "tomli"} if sys.version_info < (3, 11)
                               else {})}
OPTIONAL = {"xformers": "xformers", "pytest_timeout": "pytest-timeout", "matplotlib": "matplotlib"}
# The tests the first step runs with -m gpu, in this order: CUDA graphs and the engine vs PEFT first, so they run
# even if the kernel sweep at model sizes (many Triton compiles) runs out of budget.
GPU_TEST_FILES = ("tests/engine/test_cuda_graphs.py", "tests/engine/test_engine_cuda.py",
                  "tests/model/test_int8_triton.py", "tests/attention/test_xformers_probe.py",
                  "tests/lora/test_pool.py",
                  "tests/benchmarks/test_lora_variants.py", "tests/lora/test_triton_sgmv.py")
GOAL_X_PEFT, GOAL_OVERHEAD, GOAL_ROOFLINE, GOAL_COLD_HOST_S = 100.0, 0.10, 0.70, 0.005
GRACE_S = 5.0  # a step past its budget: SIGINT, then SIGKILL this much later


@dataclass
class Step:
    """One child process: its argv on a GPU and for --dry-run, its time budget, the JSON it writes."""

    name: str
    what: str
    gpu_argv: list[str]
    dry_argv: list[str]
    budget_s: float
    dry_budget_s: float
    out_json: Optional[str] = None  # file name under the results folder (None: the tests step)
    env: dict[str, str] = field(default_factory=dict)


def steps(results: Path, workdir: Path) -> list[Step]:
    py = [sys.executable, "-m"]
    out = lambda name: ["--out", str(results / name), "--workdir", str(workdir)]  # noqa: E731
    junit = str(results / "gpu_tests.xml")
    return [
        Step("tests", "pytest -m gpu: kernels vs torch reference (bf16/fp32, 1B/8B shapes, ranks 8-64, ragged, "
                      "repeated and empty slots); engine on CUDA vs PEFT; CUDA graphs on vs off",
             py + ["pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "-rfEs", f"--junitxml={junit}",
                   *GPU_TEST_FILES],
             # No CUDA here: the dry run checks that every GPU test still collects (imports, fixtures, marks).
             py + ["pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "--collect-only", f"--junitxml={junit}",
                   *GPU_TEST_FILES],
             budget_s=125, dry_budget_s=40),
        Step("kernels", "SGMV/BGMV/fused vs torch reference vs torch._grouped_mm, B = 1..64, four adapter mixes",
             py + ["benchmarks.gpu_kernels", "--shape", "1b", "--iters", "30", *out("gpu_kernels.json")],
             py + ["benchmarks.gpu_kernels", "--dry-run", *out("gpu_kernels.json")],
             budget_s=55, dry_budget_s=120, out_json="gpu_kernels.json", env={"TRITON_INTERPRET": ""}),
        Step("e2e", "1B shape bf16, int8 and bf16 base: B = 32 and 64 on as many rank-16 adapters, prompt 128, "
                    "64 new; vs one adapter, vs no adapter, vs PEFT mixed batch (B = 32); vs HBM roofline",
             # PEFT at B = 32 only (the goal's batch): its mixed batch and adapter loads cost it seconds each.
             py + ["benchmarks.gpu_e2e", "--shape", "1b", "--batch", "32", "64", "--adapters", "64",
                   "--peft-batch", "32", "--quantize", "int8", "none", *out("gpu_e2e.json")],
             py + ["benchmarks.gpu_e2e", "--dry-run", "--quantize", "int8", "--batch", "2", *out("gpu_e2e.json")],
             budget_s=115, dry_budget_s=120, out_json="gpu_e2e.json"),
        Step("slora", "S-LoRA workload: 256 adapters, power-law popularity, Poisson arrivals, 64 device slots",
             py + ["benchmarks.gpu_slora", "--shape", "1b", "--num-adapters", "256", "--rate", "8",
                   "--num-requests", "240", "--output-range", "8", "256", *out("gpu_slora.json")],
             py + ["benchmarks.gpu_slora", "--dry-run", *out("gpu_slora.json")],
             budget_s=75, dry_budget_s=120, out_json="gpu_slora.json"),
        Step("coldload", "cold adapter loads (disk -> device, host memory -> device) during decode of B = 32: "
                         "load time, ITL stall (rank 16, the goal's, first; then 64)",
             # 400 tokens: decode (about a millisecond a step) outlasts the loads it is meant to be disturbed by
             py + ["benchmarks.gpu_coldload", "--shape", "1b", "--new", "400", "--rank", "16", "64",
                   *out("gpu_coldload.json")],
             py + ["benchmarks.gpu_coldload", "--dry-run", *out("gpu_coldload.json")],
             budget_s=60, dry_budget_s=120, out_json="gpu_coldload.json"),
    ]


# ----------------------------------------------------------------------------- dependencies


def missing_modules(names: dict[str, str], extra_path: Optional[Path] = None) -> list[str]:
    """pip names of the modules in `names` that do not import (looked up, not imported)."""
    if extra_path is not None and extra_path.is_dir() and str(extra_path) not in sys.path:
        sys.path.insert(0, str(extra_path))
        importlib.invalidate_caches()
    return [pip for mod, pip in names.items() if importlib.util.find_spec(mod) is None]


def install_wheels(packages: list[str]) -> tuple[bool, str]:
    """Install `packages` from .whl/ into .whl/site (no registry, no change to the machine's environment), each
    alone and without its dependencies: one bad wheel costs only itself, and no copy of a dependency the machine
    has (numpy) is put on the children's path ahead of the machine's own."""
    if not packages:
        return True, "nothing to install"
    if not WHEELS.is_dir():
        return False, f"{WHEELS} is missing: carry the wheels (docs/benchmarks.md, 'Carrying wheels')"
    ok, log = True, []
    for pkg in packages:
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--find-links", str(WHEELS),
               "--target", str(WHEEL_SITE), pkg]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        ok = ok and proc.returncode == 0
        log.append(f"{pkg}: {'ok' if proc.returncode == 0 else 'failed'} {(proc.stdout + proc.stderr)[-600:]}".strip())
    return ok, "\n".join(log)[-2000:]


def preflight() -> dict[str, Any]:
    """What Triton needs to build its launcher on first use, found as it finds them: a C compiler ($CC, else gcc,
    else clang) and Python.h."""
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")
    version = None
    if cc:
        try:
            proc = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=10)
            version = (proc.stdout.splitlines() or ["?"])[0] if proc.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            version = None
    scheme = sysconfig.get_default_scheme()
    include = sysconfig.get_paths(scheme="posix_prefix" if scheme == "posix_local" else scheme)["include"]
    header = Path(include) / "Python.h"
    return {"cc": cc, "cc_version": version, "python_h": str(header), "python_h_exists": header.is_file()}


# ----------------------------------------------------------------------------- running the steps


def child_env(step: Step, dry_run: bool) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    paths = [str(ROOT)] + ([str(WHEEL_SITE)] if WHEEL_SITE.is_dir() else []) + [env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    for k, v in step.env.items():
        if v:
            env[k] = v
        else:
            env.pop(k, None)  # e.g. gpu_kernels chooses the interpreter itself, before importing triton
    if dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def _restore_sigint() -> None:  # in the child, before exec
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _sigint_preexec() -> Optional[Callable[[], None]]:
    """What the child needs so that a budget's SIGINT reaches it. A shell starts a background job (`make gpu-suite
    &`, nohup) with SIGINT ignored, children inherit that through exec, and Python then installs no
    KeyboardInterrupt: the step would see nothing, write nothing, and be killed GRACE_S later. So where SIGINT
    is ignored here, the child gets the default back (fork + exec then, instead of the faster spawn)."""
    return _restore_sigint if signal.getsignal(signal.SIGINT) == signal.SIG_IGN else None


def run_step(step: Step, results: Path, dry_run: bool, budget_scale: float = 1.0) -> dict[str, Any]:
    """Run one step in a child with its budget; never raises. Returns its record for the suite JSON."""
    argv = step.dry_argv if dry_run else step.gpu_argv
    budget = (step.dry_budget_s if dry_run else step.budget_s) * budget_scale
    rec: dict[str, Any] = {"name": step.name, "what": step.what, "argv": argv[1:], "budget_s": budget}
    for stale in ([step.out_json] if step.out_json else ["gpu_tests.xml"]):
        (results / stale).unlink(missing_ok=True)  # a file from an earlier run must not count
    print(f"\n=== {step.name} (budget {budget:.0f} s): {' '.join(argv[2:])}", flush=True)
    t0 = time.perf_counter()
    try:
        with subprocess.Popen(argv, cwd=ROOT, env=child_env(step, dry_run), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, preexec_fn=_sigint_preexec()) as proc:
            try:
                stdout, stderr = proc.communicate(timeout=budget)
                rec.update(rc=proc.returncode, status="ok" if proc.returncode == 0 else "failed")
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGINT)  # pytest stops and writes its junit XML of the tests that ran
                try:
                    stdout, stderr = proc.communicate(timeout=GRACE_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    stdout, stderr = proc.communicate()
                rec.update(rc=None, status="timeout")
        output = _text(stdout) + _text(stderr)
    except Exception as e:  # noqa: BLE001 (a step that cannot even start is a result too)
        rec.update(rc=None, status="error")
        output = f"{type(e).__name__}: {e}"
    rec["wall_s"] = round(time.perf_counter() - t0, 2)
    rec["output_tail"] = output[-4000:]
    print(output[-6000:], flush=True)
    if step.out_json and (results / step.out_json).is_file():
        try:
            rec["result"] = json.loads((results / step.out_json).read_text())
        except ValueError as e:
            rec["result_error"] = str(e)
    if step.name == "tests":
        rec["tests"] = junit_counts(results / "gpu_tests.xml")
        collected = re.search(r"(\d+)(?:/\d+)? tests? collected", output)
        rec["tests"]["collected"] = int(collected.group(1)) if collected else None
    return rec


def _text(b: Any) -> str:
    if b is None:
        return ""
    return b.decode(errors="replace") if isinstance(b, bytes) else str(b)


def junit_counts(path: Path) -> dict[str, Any]:
    """Test counts and the names of failed tests from pytest's junit XML (all zero when there is none)."""
    if not path.is_file():
        return {"total": 0, "failed": [], "skipped": 0, "passed": 0}
    root = ET.parse(path).getroot()
    cases = root.iter("testcase")
    out: dict[str, Any] = {"total": 0, "failed": [], "skipped": 0}
    for c in cases:
        out["total"] += 1
        name = f"{c.get('classname')}::{c.get('name')}"
        if c.find("failure") is not None or c.find("error") is not None:
            out["failed"].append(name)
        elif c.find("skipped") is not None:
            out["skipped"] += 1
    out["passed"] = out["total"] - len(out["failed"]) - out["skipped"]
    return out


# ----------------------------------------------------------------------------- the goals


def goals(records: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each goal of the GPU issue with its measured figure (None: not measured in this run)."""
    derived = records.get("e2e", {}).get("result", {}).get("derived", [])
    batches = sorted({d["B"] for d in derived})

    def e2e(B: int, q: str, key: str) -> Optional[float]:
        """The e2e figure at batch B (a dry run's tiny batches stand in: the smallest for 32, the largest for 64)."""
        if batches and B not in batches:
            B = batches[0] if B == 32 else batches[-1]
        for d in derived:
            if d["B"] == B and d["quantize"] == q:
                return d.get(key)
        return None

    cold = records.get("coldload", {}).get("result", {}).get("results", [])
    cold16 = next((r for r in cold if r.get("rank") == 16), cold[0] if cold else None)
    rows = [
        ("x PEFT mixed-batch throughput, 32 distinct adapters, int8", e2e(32, "int8", "x_peft_mixed"),
         f">= {GOAL_X_PEFT:g}", lambda v: v >= GOAL_X_PEFT),
        ("LoRA overhead vs our base, all on one adapter, B=32, int8", e2e(32, "int8", "lora_overhead_identical"),
         f"<= {GOAL_OVERHEAD:g}", lambda v: v <= GOAL_OVERHEAD),
        ("LoRA overhead vs our base, 32 distinct adapters, B=32, int8", e2e(32, "int8", "lora_overhead_distinct"),
         "stated", None),
        ("decode at B=64 / HBM roofline, int8", e2e(64, "int8", "roofline_fraction"),
         f">= {GOAL_ROOFLINE:g}", lambda v: v >= GOAL_ROOFLINE),
        ("decode at B=64 / HBM roofline, bf16 base", e2e(64, "none", "roofline_fraction"),
         f">= {GOAL_ROOFLINE:g}", lambda v: v >= GOAL_ROOFLINE),
        ("cold load p50 from disk, rank 16 (s)", cold16["load_s"]["p50"] if cold16 else None, "stated", None),
        ("ITL p99 while loading / quiet, rank 16", cold16.get("itl_p99_ratio") if cold16 else None,
         "~1 (no stall)", None),
        ("cold load p50 from host memory, rank 16 (s)", cold16["host_load_s"]["p50"] if cold16 else None,
         f"< {GOAL_COLD_HOST_S:g}", lambda v: v < GOAL_COLD_HOST_S),
        ("ITL p99 while loading from host / quiet, rank 16", cold16.get("itl_host_p99_ratio") if cold16 else None,
         "~1 (no stall)", None),
    ]
    out = []
    for name, value, goal, ok in rows:
        out.append({"figure": name, "value": value, "goal": goal,
                    "met": None if value is None or ok is None else bool(ok(value))})
    return out


def _tests_summary(t: Optional[dict[str, Any]]) -> str:
    if not t:
        return ""
    if not t["total"]:
        return f"{t.get('collected')} collected" if t.get("collected") is not None else "no test ran"
    return f"{t['passed']} passed, {len(t['failed'])} failed, {t['skipped']} skipped"


def default_out() -> Path:
    """$OUT/gpu_suite.json where $OUT is set (on the device machine only what is written under it comes back),
    else benchmarks/results/gpu_suite.json."""
    out = os.environ.get("OUT")
    return (Path(out) if out else ROOT / "benchmarks" / "results") / "gpu_suite.json"


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description="the whole GPU check, one JSON")
    p.add_argument("--dry-run", action="store_true", help="tiny CPU version of every step (no CUDA needed)")
    p.add_argument("--only", nargs="+", help="run only these steps (tests kernels e2e slora coldload)")
    p.add_argument("--out", default=str(default_out()), help="the suite's JSON; the steps' go in suite/ beside it")
    p.add_argument("--workdir", default="/tmp/loraserve-bench", help="random models and adapters go here")
    p.add_argument("--budget-scale", type=float, default=1.0, help="multiply every step's time budget")
    args = p.parse_args(argv)
    from benchmarks import gpu_common as common  # imports torch: after argument errors, not before

    out = Path(args.out)
    results = out.parent / ("suite-dry-run" if args.dry_run else "suite")
    results.mkdir(parents=True, exist_ok=True)
    workdir = Path(args.workdir) / ("dry-run" if args.dry_run else "gpu")

    import torch

    device = torch.device("cpu" if args.dry_run else "cuda")
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_suite: CUDA is not available; use --dry-run for the CPU version", file=sys.stderr)
        return common.EXIT_NO_CUDA
    checks = preflight()
    print(f"preflight (Triton builds its launcher with both): C compiler {checks['cc'] or 'MISSING'}"
          f"{' (' + checks['cc_version'] + ')' if checks['cc_version'] else ''}; Python.h {checks['python_h']} "
          f"{'exists' if checks['python_h_exists'] else 'MISSING'}", flush=True)
    missing = missing_modules(REQUIRED, WHEEL_SITE)
    install_log = ""
    if missing:
        ok, install_log = install_wheels(missing)
        print(f"installing {missing} from {WHEELS}: {'ok' if ok else 'failed'}\n{install_log}", flush=True)
        missing = missing_modules(REQUIRED, WHEEL_SITE)
    payload: dict[str, Any] = {
        "benchmark": "gpu_suite", "dry_run": args.dry_run, "machine": common.machine_info(device),
        "missing_required": missing, "missing_optional": missing_modules(OPTIONAL, WHEEL_SITE),
        "wheel_install_log": install_log, "preflight": checks, "steps": [], "goals": [],
        "note": "CPU dry run on tiny shapes: numbers are meaningless" if args.dry_run else ""}
    records: dict[str, dict[str, Any]] = {}
    plan = [s for s in steps(results, workdir) if not args.only or s.name in args.only]
    t0 = time.perf_counter()
    for step in plan:
        records[step.name] = run_step(step, results, args.dry_run, args.budget_scale)
        payload["steps"] = list(records.values())
        payload["goals"] = goals(records)
        payload["wall_s"] = round(time.perf_counter() - t0, 2)
        common.write_json(out, payload)  # after every step: what finished is kept

    table = [{"step": r["name"], "status": r["status"], "wall s": r["wall_s"], "budget s": r["budget_s"],
              "tests": _tests_summary(r.get("tests"))}
             for r in records.values()]
    common.print_table(table, ["step", "status", "wall s", "budget s", "tests"],
                       title=f"GPU suite ({'CPU dry run' if args.dry_run else payload['machine'].get('gpu')}), "
                             f"{payload['wall_s']:.0f} s")
    common.print_table(payload["goals"], ["figure", "value", "goal", "met"], title="the GPU issue's goals")
    print(f"wrote {out}")
    return 0 if all(r["status"] == "ok" for r in records.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
