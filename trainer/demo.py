"""`make demo`: train two adapters, serve them beside the base, and score all three side by side.

1. Trains one LoRA adapter per example task (`examples/orders`, `examples/zorbish`) on the
   default base model, within a time budget sized for a 2-core CPU.
2. Starts a real `loraserve serve` process on a free loopback port and registers both
   adapters through the Adapters gRPC service.
3. Sends every eval prompt twice, to the base and to the task's adapter, all mixed together
   and concurrent, so the server batches base and both adapters in the same steps.
4. Prints exact-match accuracy of base vs adapter per task, and writes `demo_report.json`.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from server.client.local_server import LocalServer

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
TASKS = ("orders", "zorbish")


@dataclass
class DemoConfig:
    workdir: str = ""                 # empty = a fresh temporary directory
    model: str = "default"
    # Measured: the format task is learned in a few dozen steps; the dictionary takes longer.
    steps: dict[str, int] = field(default_factory=lambda: {"orders": 60, "zorbish": 150})
    rank: int = 8
    alpha: float = 16.0
    # The dictionary task needs more updates than the format task; a larger lr gets them sooner.
    lr: dict[str, float] = field(default_factory=lambda: {"orders": 1e-3, "zorbish": 2e-3})
    batch_size: int = 8
    max_seq_len: int = 96
    train_budget_s: float = 480.0     # both adapters' training loops together (hard limits, see train_adapters)
    eval_examples: int = 50           # per task; each is sent to the base and to the adapter
    concurrency: int = 16
    max_new_tokens: int = 40
    seed: int = 0
    keep_server: bool = False


@dataclass
class TaskResult:
    task: str
    adapter_id: str = ""
    train_seconds: float = 0.0
    train_cpu_seconds: float = 0.0   # CPU time of all threads: what the run costs on a machine shared with others
    steps: int = 0
    final_loss: Optional[float] = None
    base_correct: int = 0
    adapter_correct: int = 0
    n: int = 0
    samples: list[dict[str, str]] = field(default_factory=list)

    @property
    def base_acc(self) -> float:
        return self.base_correct / self.n if self.n else 0.0

    @property
    def adapter_acc(self) -> float:
        return self.adapter_correct / self.n if self.n else 0.0


def _say(msg: str) -> None:
    print(msg, flush=True)


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def ensure_datasets() -> None:
    if all((EXAMPLES / t / f).is_file() for t in TASKS for f in ("train.jsonl", "eval.jsonl")):
        return
    from examples.make_datasets import main as make

    make(["--out", str(EXAMPLES)])


# ---------------------------------------------------------------- training

def train_adapters(cfg: DemoConfig, work: Path) -> dict[str, TaskResult]:
    from trainer.train import TrainConfig, train

    results: dict[str, TaskResult] = {}
    used = 0.0
    for n, task in enumerate(TASKS):
        # An even share of what is left, so time the first task did not need goes to the next.
        per_task = max(1.0, (cfg.train_budget_s - used) / (len(TASKS) - n))
        _say(f"\n== training adapter '{task}' ({cfg.steps[task]} steps, rank {cfg.rank}, lr {cfg.lr[task]:g}, "
             f"time limit {per_task:.0f} s)")
        tcfg = TrainConfig(
            data=str(EXAMPLES / task / "train.jsonl"),
            output=str(work / "adapters" / task), model=cfg.model, rank=cfg.rank, alpha=cfg.alpha, dropout=0.0,
            max_steps=cfg.steps[task], lr=cfg.lr[task], batch_size=cfg.batch_size, max_seq_len=cfg.max_seq_len,
            warmup_ratio=0.05, seed=cfg.seed, save_every=0, eval_every=10**9, restore_best=False,
            time_limit=per_task, progress=True)
        t0, c0 = time.perf_counter(), time.process_time()
        res = train(tcfg)
        m = res.metrics
        results[task] = TaskResult(task, train_seconds=time.perf_counter() - t0, steps=m["steps"],
                                   final_loss=m["train_loss_last10"], train_cpu_seconds=time.process_time() - c0)
        used += m["train_seconds"]
        _say(f"   {task}: {m['steps']} steps in {results[task].train_seconds:.0f} s "
             f"({results[task].train_cpu_seconds:.0f} CPU s), loss "
             f"{m['train_loss_first']:.3f} -> {m['train_loss_last10']:.3f} (mean of the last 10 steps)"
             + (" (stopped by the time limit)" if m.get("out_of_time") else ""))
    return results


# ---------------------------------------------------------------- evaluation

def exact(output: str, answer: str) -> bool:
    """The whole answer on the first line, nothing more, nothing less (surrounding spaces aside)."""
    return output.strip().split("\n")[0].strip() == answer.strip()


def evaluate(cfg: DemoConfig, target: str, results: dict[str, TaskResult]) -> dict[str, Any]:
    import grpc

    from server.api.gen.loraserve.v1 import inference_pb2 as pb
    from server.api.gen.loraserve.v1 import inference_pb2_grpc as pb_grpc

    jobs = []
    for task in TASKS:
        rows = _read_jsonl(EXAMPLES / task / "eval.jsonl")[: cfg.eval_examples]
        results[task].n = len(rows)
        for i, r in enumerate(rows):
            jobs.append((task, i, "", r))
            jobs.append((task, i, results[task].adapter_id, r))
    random.Random(cfg.seed).shuffle(jobs)  # base and both adapters interleaved in every batch
    outputs: dict[tuple[str, int, str], str] = {}
    served_by: dict[str, set] = {}
    lock = threading.Lock()
    channel = grpc.insecure_channel(target)
    stub = pb_grpc.InferenceStub(channel)

    def one(job) -> None:
        task, i, adapter, row = job
        req = pb.GenerateRequest(adapter_id=adapter, prompt=row["prompt"],
                                 params=pb.SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=0.0,
                                                          stop=["\n"]))
        resp = stub.Generate(req, timeout=600)
        with lock:
            outputs[(task, i, adapter)] = resp.text
            served_by.setdefault(adapter or "base", set()).add(
                f"{resp.adapter_id}@{resp.adapter_version}" if resp.adapter_id else "base")

    t0 = time.perf_counter()
    try:
        with ThreadPoolExecutor(cfg.concurrency) as pool:
            list(pool.map(one, jobs))
    finally:
        channel.close()
    seconds = time.perf_counter() - t0
    for task, i, adapter, row in jobs:
        ok = exact(outputs[(task, i, adapter)], row["completion"])
        res = results[task]
        if adapter:
            res.adapter_correct += ok
        else:
            res.base_correct += ok
        if i < 3 and adapter == "":
            res.samples.append({"prompt": row["prompt"].split("\n")[1], "expected": row["completion"].strip(),
                                "base": outputs[(task, i, "")].strip(),
                                "adapter": outputs[(task, i, res.adapter_id)].strip()})
    return {"requests": len(jobs), "seconds": seconds, "served_by": {k: sorted(v) for k, v in served_by.items()}}


# ---------------------------------------------------------------- main

def print_table(results: dict[str, TaskResult]) -> None:
    _say("\n" + f"{'task':<10} {'examples':>8} {'base exact-match':>17} {'adapter exact-match':>20} "
         f"{'train s':>8} {'steps':>6}")
    for r in results.values():
        _say(f"{r.task:<10} {r.n:>8} {r.base_acc:>16.1%} {r.adapter_acc:>19.1%} {r.train_seconds:>8.0f} "
             f"{r.steps:>6}")


def run(cfg: DemoConfig) -> dict[str, Any]:
    from trainer.register import register_adapter

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ensure_datasets()
    work = Path(cfg.workdir) if cfg.workdir else Path(tempfile.mkdtemp(prefix="loraserve-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    _say(f"loraserve demo: working in {work}")
    t_all = time.perf_counter()
    results = train_adapters(cfg, work)
    train_total = sum(r.train_seconds for r in results.values())
    train_cpu = sum(r.train_cpu_seconds for r in results.values())
    _say(f"\n== both adapters trained in {train_total:.0f} s ({train_cpu:.0f} CPU s); starting the server")
    server = LocalServer(["--model", cfg.model, "--http-port", "-1", "--metrics-port", "-1",
                          "--registry", str(work / "registry"), "--log-level", "info"], work / "server.log")
    try:
        t0 = time.perf_counter()
        server.wait_serving(600)
        start_s = time.perf_counter() - t0
        _say(f"   serving on {server.target} after {start_s:.0f} s")
        for task in TASKS:
            reg = register_adapter(work / "adapters" / task, server.target, f"demo-{task}")
            results[task].adapter_id = reg.adapter_id
            _say(f"   registered {reg.adapter_id} (sha256 {reg.digest[:12]}...)")
        _say(f"\n== sending each task's eval prompts to the base and to its adapter, mixed and concurrent "
             f"({cfg.concurrency} at a time)")
        ev = evaluate(cfg, server.target, results)
    finally:
        if not cfg.keep_server:
            server.stop(60)
    for r in results.values():
        _say(f"\n{r.task}: first eval examples")
        for s in r.samples:
            _say(f"   input:    {s['prompt']}\n   expected: {s['expected']}\n   base:     {s['base']!r}\n"
                 f"   adapter:  {s['adapter']!r}")
    print_table(results)
    _say(f"\ntraining {train_total:.0f} s (budget {cfg.train_budget_s:.0f} s); server start {start_s:.0f} s; "
         f"{ev['requests']} requests in {ev['seconds']:.1f} s; whole demo {time.perf_counter() - t_all:.0f} s "
         f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    report = {"config": asdict(cfg), "workdir": str(work), "train_seconds_total": train_total,
              "train_cpu_seconds_total": train_cpu, "cpu_count": os.cpu_count(),
              "load_average_1m": os.getloadavg()[0],
              "server_start_seconds": start_s, "eval": ev, "total_seconds": time.perf_counter() - t_all,
              "tasks": {t: {**asdict(r), "base_acc": r.base_acc, "adapter_acc": r.adapter_acc}
                        for t, r in results.items()}}
    (work / "demo_report.json").write_text(json.dumps(report, indent=2))
    _say(f"report: {work / 'demo_report.json'}")
    return report


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.demo", description=__doc__.split("\n\n")[0])
    d = DemoConfig()
    p.add_argument("--workdir", default=d.workdir, help="where adapters, registry and logs go (default: a temp dir)")
    p.add_argument("--model", default=d.model)
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per adapter (default per task)")
    p.add_argument("--train-budget", type=float, default=d.train_budget_s, help="seconds for both adapters")
    p.add_argument("--eval-examples", type=int, default=d.eval_examples, help="eval prompts per task")
    p.add_argument("--concurrency", type=int, default=d.concurrency)
    a = p.parse_args(argv)
    cfg = DemoConfig(workdir=a.workdir, model=a.model, train_budget_s=a.train_budget,
                     eval_examples=a.eval_examples, concurrency=a.concurrency)
    if a.steps is not None:
        cfg.steps = {t: a.steps for t in TASKS}
    report = run(cfg)
    worse = [t for t, r in report["tasks"].items() if not r["adapter_acc"] > r["base_acc"] + 0.2]
    if worse:
        print(f"demo: the adapter did not clearly beat the base on {', '.join(worse)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
