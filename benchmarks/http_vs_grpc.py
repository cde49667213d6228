"""HTTP (OpenAI-compatible, streamed /v1/completions) against gRPC (GenerateStream) on one server, one workload.

`python -m benchmarks.http_vs_grpc` starts the real server on the real default model
(SmolLM2-135M-Instruct, default settings: int8 base, LoRA on) with two random rank-16 adapters,
then runs the same closed-loop workload (`loraserve bench`'s load generator, concurrency 16,
base + adapters, greedy, fixed lengths) over each protocol in interleaved rounds (A B, then B A,
...), so both see the same machine state. It reports generated tokens/s (the ratio HTTP/gRPC as
the median of per-round ratios, with its range), TTFT and inter-token p50/p99 for both, prints a
table and writes benchmarks/results/http_vs_grpc.json (machine, model, workload, every round).

The client runs on the same machine as the server: on a small CPU the client's own parsing
competes with the engine, which is part of what a protocol costs.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

from benchmarks.common import cpu_machine_info, machine_line, median, print_table, write_json
from server.client import loadgen
from server.client.local_server import LocalServer

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "http_vs_grpc.json"


def bench_args(ns: argparse.Namespace, protocol: str, ports: dict[str, int], adapters: list[str],
               requests: int) -> argparse.Namespace:
    argv = ["--protocol", protocol, "--target", f"127.0.0.1:{ports['grpc']}",
            "--base-url", f"http://127.0.0.1:{ports['http']}", "--requests", str(requests),
            "--concurrency", str(ns.concurrency), "--adapters", ",".join(adapters), "--include-base",
            "--mix", "uniform", "--min-new-tokens", str(ns.new_tokens), "--max-new-tokens", str(ns.new_tokens),
            "--prompt-words-min", "8", "--prompt-words-max", "64", "--seed", str(ns.seed), "--api-key", ""]
    return loadgen.build_parser().parse_args(argv)


def measure(ns: argparse.Namespace, protocol: str, ports: dict[str, int], adapters: list[str],
            requests: int) -> loadgen.Summary:
    summary = asyncio.run(loadgen.run(bench_args(ns, protocol, ports, adapters, requests)))
    if summary.ok != summary.requests:
        raise RuntimeError(f"{protocol}: {summary.requests - summary.ok} requests failed: {summary.errors}")
    return summary


def run(ns: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.cpu_mixed import make_adapters
    from server.core.paths import resolve_home
    from server.model.loader import resolve_model

    model_dir = resolve_model("default", resolve_home())
    root = Path(ns.workdir or tempfile.mkdtemp(prefix="http-vs-grpc-"))
    adapter_dirs = make_adapters(model_dir, root / "adapters", ns.adapters, ns.rank, seed=7)
    names = [f"a{i}" for i in range(len(adapter_dirs))]
    serve_args = ["--model", "default", "--registry", str(root / "registry"), "--metrics-port", "-1",
                  *ns.serve_args]
    for name, d in zip(names, adapter_dirs):
        serve_args += ["--adapter", f"{name}={d}"]
    server = LocalServer(serve_args, root / "server.log")
    rounds: list[dict[str, Any]] = []
    try:
        server.wait_serving(600)
        ports = {"grpc": server.port, "http": server.http_port}
        ns.load_before = os.getloadavg()
        for protocol in ("grpc", "http"):  # warm-up: adapters into slots, code paths and connections warm
            measure(ns, protocol, ports, names, ns.concurrency)
        for r in range(ns.rounds):
            order = ("grpc", "http") if r % 2 == 0 else ("http", "grpc")
            got = {p: measure(ns, p, ports, names, ns.requests) for p in order}
            rounds.append({"round": r, "order": list(order), **{p: asdict(s) for p, s in got.items()}})
            print(f"round {r}: " + ", ".join(f"{p} {got[p].generated_tokens_per_s:.1f} tok/s" for p in order),
                  flush=True)
    finally:
        server.stop(60)
    ns.load_after = os.getloadavg()
    return report(ns, rounds, model_dir)


def _pooled(rounds: list[dict[str, Any]], protocol: str, key: str) -> float:
    return median([r[protocol][key] for r in rounds])


def report(ns: argparse.Namespace, rounds: list[dict[str, Any]], model_dir: Path) -> dict[str, Any]:
    ratios = [r["http"]["generated_tokens_per_s"] / r["grpc"]["generated_tokens_per_s"] for r in rounds]
    rows = []
    for p in ("grpc", "http"):
        rows.append({"protocol": p, "tok/s": _pooled(rounds, p, "generated_tokens_per_s"),
                     "req/s": _pooled(rounds, p, "requests_per_s"),
                     "TTFT p50 s": _pooled(rounds, p, "ttft_p50_s"), "TTFT p99 s": _pooled(rounds, p, "ttft_p99_s"),
                     "ITL p50 ms": 1000 * _pooled(rounds, p, "itl_p50_s"),
                     "ITL p99 ms": 1000 * _pooled(rounds, p, "itl_p99_s"),
                     "latency p50 s": _pooled(rounds, p, "latency_p50_s")})
    machine = cpu_machine_info()
    payload = {
        "benchmark": "http_vs_grpc", "machine": machine, "machine_line": machine_line(machine),
        "model": {"name": "default (SmolLM2-135M-Instruct)", "dir": str(model_dir), "serve_args": ns.serve_args},
        "workload": {"concurrency": ns.concurrency, "requests_per_round": ns.requests, "rounds": ns.rounds,
                     "new_tokens": ns.new_tokens, "prompt_words": [8, 64], "adapters": ns.adapters,
                     "adapter_rank": ns.rank, "mix": "uniform over base + adapters", "temperature": 0,
                     "ignore_eos": True, "http": "streamed /v1/completions (stream_options.include_usage)",
                     "grpc": "GenerateStream"},
        "load_average": {"before": getattr(ns, "load_before", None), "after": getattr(ns, "load_after", None)},
        "summary": {"http_over_grpc_tokens_per_s": median(ratios), "range": [min(ratios), max(ratios)],
                    "per_round": ratios, "rows": rows},
        "rounds": rounds,
    }
    print_table(rows, list(rows[0]), title=f"HTTP vs gRPC, concurrency {ns.concurrency} ({machine_line(machine)})")
    print(f"HTTP / gRPC tokens/s: {median(ratios):.3f} (rounds {min(ratios):.3f}-{max(ratios):.3f})")
    return payload


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.http_vs_grpc", description=__doc__.splitlines()[0])
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--requests", type=int, default=48, help="requests per protocol per round")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--adapters", type=int, default=2)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default="", help="adapters and registry (default: a fresh temporary directory)")
    p.add_argument("--serve-arg", dest="serve_args", action="append", default=[],
                   help="extra `loraserve serve` flag (repeatable), e.g. --serve-arg=--quantize --serve-arg=none")
    p.add_argument("--out", type=Path, default=RESULTS)
    ns = p.parse_args(argv)
    t0 = time.time()
    payload = run(ns)
    payload["wall_s"] = round(time.time() - t0, 1)
    write_json(ns.out, payload)
    print(f"wrote {ns.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
