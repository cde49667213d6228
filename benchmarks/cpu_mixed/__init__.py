"""CPU mixed-adapter throughput: loraserve against transformers and PEFT in one run (`make bench`).

The workload is issue 3's: R concurrent requests (8) on R distinct rank-16 LoRA
adapters over all seven Llama targets, every prompt P tokens (64), every request
N new tokens (32), greedy with EOS ignored so each system does the same work.
Systems:

  loraserve            our engine with EngineConfig defaults (quantize int8, dtype auto)
  loraserve-base       the same engine, the same requests without adapters
  loraserve-none       our engine with quantize none (dtype auto)
  loraserve-none-base  the same engine without adapters
  hf-base              transformers' generate, one batch of R, left padding, no adapters
  peft-mixed           PEFT generate with `adapter_names=` (R adapters in one PeftModel)
  peft-single          PEFT generate, the batch of R on one adapter

Each system gets one warm-up run (adapter loads, allocator and kernel warm-up
happen there) and then `repeats` timed runs; we report the median. Throughput is
generated tokens / wall time of a run; the LoRA overhead compares an engine's
adapter run with its own no-adapter run at the same settings (the two are timed
back to back, in alternating order, in every round). Both ratios, x PEFT mixed and
LoRA overhead, are medians of per-round ratios (`paired`), printed with their range. Adapters are random PEFT
LoRA weights with fixed seeds, made with PEFT itself in a temporary directory.

Each group of systems (an engine with and without adapters at one quantization, or
the transformers/PEFT systems) is measured in a child process of its own:
libgomp slows every small op once more than one long-lived thread owns an OpenMP
pool (see `server/core/threads.py`), so an engine thread and PEFT on the main
thread of one process would slow each other down. The children stay up for the
whole run and the timed rounds are interleaved across them (round r of every group,
one group at a time, before round r+1), so drift in the machine's speed hits every
group alike instead of landing in the cross-group ratios.

The package, by job: `config` (settings, systems, goals), `inputs` (prompts and
adapters), `systems` (the contenders and their timed rounds), `groups` (which systems
share a child process; the child's side), `protocol` (the parent's side of the line
protocol), `timings` and `stats` (results and ratios), `report` (the printed table).
This module is the entry point: `run` does one whole benchmark, `main` is the CLI.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from benchmarks.common import cpu_machine_info, machine_line, write_json  # noqa: E402
from benchmarks.cpu_mixed.config import ALL_SYSTEMS, PEFT_TARGETS, BenchConfig  # noqa: E402
from benchmarks.cpu_mixed.groups import isolation_note, measure_in_children, system_groups, worker_main  # noqa: E402
from benchmarks.cpu_mixed.inputs import make_adapters, make_prompts  # noqa: E402
from benchmarks.cpu_mixed.report import print_report  # noqa: E402
from benchmarks.cpu_mixed.roofline import best_limits, format_roofline, measure_limits, roofline  # noqa: E402
from benchmarks.cpu_mixed.stats import goals, summarize  # noqa: E402
from benchmarks.cpu_mixed.systems import model_shape  # noqa: E402

__all__ = ["BenchConfig", "main", "run"]

log = logging.getLogger("benchmarks.cpu_mixed")


def _loadavg() -> Optional[float]:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def run(cfg: BenchConfig) -> dict[str, Any]:
    """Make prompts and adapters here, measure each group of systems in a child process of its own
    (rounds interleaved across them), and return the JSON payload (also written to cfg.out when set)."""
    cfg.validate()
    from server.core.engine_config import EngineConfig
    from server.model.config import ModelConfig
    from server.model.loader import load_tokenizer, resolve_model

    t_start = time.perf_counter()
    load_before = _loadavg()
    probe = EngineConfig(model=cfg.model, quantize=cfg.quantize, home=cfg.home)
    model_dir = resolve_model(cfg.model, probe.resolve_home())
    # transformers and PEFT run in the dtype a user would pick on this CPU: bf16 where it is native.
    dtype = EngineConfig(quantize="none").resolve_dtype(probe.resolve_device())
    mc = ModelConfig.from_file(model_dir / "config.json")
    tok = load_tokenizer(model_dir)
    specials = set(getattr(tok, "all_special_ids", []) or []) | set(mc.eos_token_ids)
    prompts = make_prompts(cfg, mc.vocab_size, sorted(specials))

    groups = system_groups(cfg)
    limit_samples = [measure_limits()]  # the machine's limits, before and after the children run
    with tempfile.TemporaryDirectory(prefix="loraserve-bench-") as tmp:
        root = Path(cfg.workdir) if cfg.workdir else Path(tmp)
        t0 = time.perf_counter()
        adapter_dirs = make_adapters(model_dir, root, cfg.adapters, cfg.rank, cfg.seed)
        adapters_s = time.perf_counter() - t0
        shared = {"prompts": prompts, "adapter_dirs": [str(d.resolve()) for d in adapter_dirs],
                  "model_dir": str(model_dir.resolve()), "dtype": str(dtype).replace("torch.", "")}
        log.info("prompts and adapters ready in %.0f s; measuring %s", time.perf_counter() - t_start,
                 isolation_note(groups))
        results, engine_model, _timeline = measure_in_children(cfg, groups, shared, Path(tmp))
    limit_samples.append(measure_limits())
    order = {s: i for i, s in enumerate(ALL_SYSTEMS)}
    results.sort(key=lambda r: order.get(r.system, 99))
    model_info: dict[str, Any] = engine_model or {"path": str(model_dir), **model_shape(mc)}

    machine = cpu_machine_info()
    # Other work on a shared machine skews absolute numbers (ratios less so): record how busy it was.
    machine["load_average_1m"] = {"before": load_before, "after": _loadavg()}
    rows = summarize(results)
    payload: dict[str, Any] = {
        "benchmark": "cpu_mixed",
        "machine": machine,
        "machine_line": machine_line(machine),
        "model": {"name": "SmolLM2-135M-Instruct" if cfg.model == "default" else cfg.model, **model_info},
        "workload": {"requests": cfg.requests, "distinct_adapters": cfg.adapters, "rank": cfg.rank,
                     "lora_alpha": 2 * cfg.rank, "targets": list(PEFT_TARGETS), "prompt_len": cfg.prompt_len,
                     "new_tokens": cfg.new_tokens, "sampling": "greedy, ignore_eos", "repeats": cfg.repeats,
                     "warmup_runs": 1, "seed": cfg.seed, "baseline_dtype": str(dtype).replace("torch.", ""),
                     "statistic": "median wall time over timed runs; tok/s = generated tokens / wall time; "
                                  "x PEFT mixed and LoRA overhead: median over rounds of the per-round ratio",
                     "isolation": isolation_note(groups)},
        "results": rows,
        "goals": {},
        "setup_s": {"adapters": adapters_s},
        "total_s": None,
    }
    payload["goals"] = goals(rows)
    payload["roofline"] = roofline(results, model_info, cfg, best_limits(limit_samples))
    payload["total_s"] = time.perf_counter() - t_start
    payload["table"] = print_report(payload)
    if payload["roofline"]:
        text = format_roofline(payload["roofline"])
        print(text)
        payload["table"] += "\n" + text
    if cfg.out:
        write_json(cfg.out, payload)
        print(f"wrote {cfg.out} ({payload['total_s']:.0f} s in all)")
    return payload


def main(argv: Optional[Sequence[str]] = None) -> int:
    d = BenchConfig()
    p = argparse.ArgumentParser(prog="python -m benchmarks.cpu_mixed", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=d.model)
    p.add_argument("--requests", type=int, default=d.requests)
    p.add_argument("--adapters", type=int, default=d.adapters)
    p.add_argument("--rank", type=int, default=d.rank)
    p.add_argument("--prompt-len", type=int, default=d.prompt_len)
    p.add_argument("--new-tokens", type=int, default=d.new_tokens)
    p.add_argument("--repeats", type=int, default=d.repeats)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--quantize", default=d.quantize, help="loraserve's main quantization (int8 is its default)")
    p.add_argument("--systems", default=",".join(d.systems), help=f"comma list of {', '.join(ALL_SYSTEMS)}")
    p.add_argument("--out", default=d.out, help="JSON path ('' to skip writing)")
    p.add_argument("--workdir", default=d.workdir, help="keep adapters here (default: a temporary directory)")
    p.add_argument("--home", default=d.home, help="loraserve cache dir (default $LORASERVE_HOME)")
    p.add_argument("--worker-timeout", type=float, default=d.worker_timeout_s,
                   help="seconds a group's child process may take to set up, for one round or to finish "
                        "before it is killed and the run fails")
    # Internal: the parent starts one child per group of systems with these (protocol: groups.worker_main).
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    p.add_argument("--worker-input", default="", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("server", "transformers", "peft"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if a.worker:
        return worker_main(a.worker, a.worker_input)
    cfg = BenchConfig(model=a.model, requests=a.requests, adapters=a.adapters, rank=a.rank,
                      prompt_len=a.prompt_len, new_tokens=a.new_tokens, repeats=a.repeats, seed=a.seed,
                      quantize=a.quantize, systems=tuple(s for s in a.systems.split(",") if s), out=a.out,
                      workdir=a.workdir, home=a.home, worker_timeout_s=a.worker_timeout)
    try:
        run(cfg)
    except ValueError as e:
        print(f"cpu_mixed: {e}", file=sys.stderr)
        return 2
    return 0
