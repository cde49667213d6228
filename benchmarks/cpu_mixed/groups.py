"""Isolation: each group of systems is measured in a child process of its own.

libgomp slows every small op once more than one long-lived thread owns an OpenMP
pool (see `server/core/threads.py`), so an engine thread and PEFT on the main thread
of one process would slow each other down. A group is an engine with and without
adapters at one quantization, or the transformers/PEFT systems. This module says which
systems share a child, runs the child's side of the protocol (`worker_main`) and the
parent's (`measure_in_children`, through `protocol.run_workers`).
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from benchmarks.cpu_mixed.config import HF_SYSTEMS, BenchConfig
from benchmarks.cpu_mixed.protocol import protocol_channel, run_workers, send_answer
from benchmarks.cpu_mixed.systems import Rounds, System, engine_systems, hf_systems, warm_up
from benchmarks.cpu_mixed.timings import SystemResult

log = logging.getLogger("benchmarks.cpu_mixed")
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Group:
    """Systems measured together in one child process; quantize is the engine's, "" for transformers/PEFT."""

    name: str
    systems: list[str]
    quantize: str


def system_groups(cfg: BenchConfig) -> list[Group]:
    """The groups with at least one selected system: each engine with its no-adapter twin, then HF/PEFT.

    An adapter run and its no-adapter run share a process (and so an engine), so the
    LoRA overhead compares like with like; different groups never share one.
    """
    groups = []
    for quant in dict.fromkeys([cfg.quantize, "none"]):
        name = "loraserve" if quant == cfg.quantize else f"loraserve-{quant}"
        groups.append(Group(name, [n for n in (name, f"{name}-base") if n in cfg.systems], quant))
    groups.append(Group("hf", [s for s in HF_SYSTEMS if s in cfg.systems], ""))
    return [g for g in groups if g.systems]


def isolation_note(groups: Sequence[Group]) -> str:
    return ("one process per group, timed rounds interleaved across the group processes (round r of every "
            "group, one group at a time, before round r+1; each round of a group begins with an untimed run of "
            "its first system, so no timed run follows another group's process directly): "
            + "; ".join(f"{g.name} ({', '.join(g.systems)})" for g in groups))


def build_group(cfg: BenchConfig, g: Group, job: dict[str, Any],
                closers: list[Callable[[], None]]) -> tuple[list[System], Optional[dict[str, Any]]]:
    """Child side: one group's systems (and the engine's model facts; None for transformers/PEFT)."""
    prompts, adapter_dirs = job["prompts"], [Path(d) for d in job["adapter_dirs"]]
    if g.quantize:
        return engine_systems(cfg, g.quantize, prompts, adapter_dirs, g.systems, closers)
    return hf_systems(cfg, Path(job["model_dir"]), getattr(torch, job["dtype"]), prompts, adapter_dirs,
                      g.systems), None


def worker_main(group: str, input_path: str) -> int:
    """Entry point of a child process (`--worker`), driven by the parent's `protocol.run_workers`.

    Sets up the group's systems, warms each one up and answers "ready"; then runs one
    timed round per {"cmd": "round"} line on stdin (answering "round" with its wall-clock
    start and end), and answers {"cmd": "finish"} with the results and exits. Between
    commands it sits idle (an engine's loop thread blocks on an event). Commands and
    answers are JSON lines; answers go to stdout behind `protocol.PROTOCOL_PREFIX`, logs to
    stderr. An error ends the process with a traceback, which the parent reports; so does
    stdin closing before "finish" (the parent is gone).
    """
    chan = protocol_channel()
    job = json.loads(Path(input_path).read_text())
    if job["group"]["name"] != group:
        raise ValueError(f"--worker {group} was given the job of group {job['group']['name']}")
    cfg = BenchConfig.from_json(job["config"])
    g = Group(**job["group"])
    closers: list[Callable[[], None]] = []
    try:
        systems, model_info = build_group(cfg, g, job, closers)
        warm_up(systems)
        rounds = Rounds(systems)
        send_answer(chan, {"event": "ready", "group": g.name, "pid": os.getpid()})
        while True:
            line = sys.stdin.readline()
            if not line:
                raise RuntimeError("stdin closed before 'finish': the parent process is gone")
            cmd = json.loads(line)
            if cmd.get("cmd") == "round" and cmd.get("round") == rounds.done + 1:
                start = time.time()
                rounds.run_round(f"group {g.name} round {cmd['round']}/{cfg.repeats}")
                send_answer(chan, {"event": "round", "group": g.name, "round": cmd["round"], "start": start,
                                   "end": time.time()})
            elif cmd.get("cmd") == "finish" and rounds.done >= 1:
                send_answer(chan, {"event": "results", "group": g.name, "model": model_info,
                                   "results": [asdict(r) for r in rounds.results()]})
                return 0
            else:
                raise ValueError(f"unexpected command {line.strip()!r} after {rounds.done} rounds")
    finally:
        for close in closers:
            close()


def _child_env() -> dict[str, str]:
    """Our environment, with the repository on PYTHONPATH so `-m benchmarks.cpu_mixed` imports from any cwd."""
    paths = [str(REPO_ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def measure_in_children(cfg: BenchConfig, groups: Sequence[Group], shared: dict[str, Any], jobdir: Path
                        ) -> tuple[list[SystemResult], Optional[dict[str, Any]], list[dict[str, Any]]]:
    """Measure each group in a persistent child process of its own, rounds interleaved (`run_workers`);
    this process only waits.

    Returns every system's results, the model facts of the last engine group (None without
    one) and the timeline of rounds.
    """
    commands: dict[str, list[str]] = {}
    for g in groups:
        src = jobdir / f"{g.name}.in.json"
        src.write_text(json.dumps({**shared, "config": asdict(cfg), "group": asdict(g)}, default=str))
        commands[g.name] = [sys.executable, "-m", "benchmarks.cpu_mixed", "--worker", g.name,
                            "--worker-input", str(src)]
    t0 = time.perf_counter()
    outs, timeline = run_workers(commands, cfg.repeats, cfg.worker_timeout_s, _child_env())
    log.info("%d groups measured in child processes in %.0f s", len(groups), time.perf_counter() - t0)
    results: list[SystemResult] = []
    model_info: Optional[dict[str, Any]] = None
    for g in groups:
        out = outs[g.name]
        results += [SystemResult.from_json(r) for r in out["results"]]
        model_info = out["model"] or model_info
    return results, model_info, timeline

