"""The prefix cache, on vs off, side by side in one run (CPU, SmolLM2-135M-Instruct by default).

Shared workload: 32 requests over 4 adapters; each adapter's requests share a 512-token system prompt and
add a distinct 32-token question; 32 new tokens each, greedy, EOS ignored, all submitted at once. Reported per
mode: TTFT p50 of the requests that can hit (all but the first of each adapter), TTFT p50 of a request sent
alone after the batch (a new question on a warm cache), and total throughput (generated tokens / wall time).
No-shared workload: the same shape with every prompt distinct, to show what the cache costs when it never hits.
Each mode runs in a fresh engine; the modes alternate (off, on) so drift on a shared machine hits both. Each
batch also records the process's CPU seconds (steadier than wall time on a shared machine), and the results file
the load average before and after. Writes benchmarks/results/prefix_cache.json (after each mode, so a run cut
short keeps what it measured).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import cpu_machine_info, machine_line, median, write_json
from benchmarks.cpu_mixed.inputs import make_adapters

RESULTS = Path(__file__).resolve().parent / "results" / "prefix_cache.json"


def _random_ids(n: int, vocab: int, g: torch.Generator) -> list[int]:
    return torch.randint(100, vocab, (n,), generator=g).tolist()


def workloads(args: argparse.Namespace, vocab: int) -> dict[str, list[tuple[int, list[int]]]]:
    """name -> [(adapter index, prompt ids)] in submission order (adapters interleaved)."""
    g = torch.Generator().manual_seed(args.seed)
    systems = [_random_ids(args.system_len, vocab, g) for _ in range(args.adapters)]
    shared, distinct = [], []
    for i in range(args.requests):
        a = i % args.adapters
        shared.append((a, systems[a] + _random_ids(args.question_len, vocab, g)))
        distinct.append((a, _random_ids(args.system_len + args.question_len, vocab, g)))
    return {"shared": shared, "distinct": distinct}


def run_batch(engine: Any, versions: list[Any], jobs: list[tuple[int, list[int]]], new_tokens: int) -> dict:
    from server.engine.types import Request, SamplingParams

    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    ttft: list[float] = [0.0] * len(jobs)
    counts = [0] * len(jobs)

    def consume(i: int, stream: Any) -> None:  # one reader per stream, so each first token is timed when it comes
        for d in stream:
            if counts[i] == 0:
                ttft[i] = time.perf_counter() - t0
            counts[i] += len(d.token_ids)

    t0, cpu0 = time.perf_counter(), time.process_time()
    readers = [threading.Thread(target=consume, args=(i, engine.submit(Request(p, params, versions[a]))))
               for i, (a, p) in enumerate(jobs)]
    for r in readers:
        r.start()
    for r in readers:
        r.join()
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    tokens = sum(counts)
    return {"wall_s": wall, "tokens": tokens, "tok_per_s": tokens / wall, "cpu_s": cpu, "ttft_s": ttft}


def run_mode(args: argparse.Namespace, on: bool, adapter_dirs: list[Path],
             loads: dict[str, list[tuple[int, list[int]]]]) -> dict:
    from server.core.engine_config import EngineConfig
    from server.core.identity import AdapterVersion
    from server.engine.engine import Engine
    from server.lora.weights import load_peft_adapter

    cfg = EngineConfig(model=args.model, quantize=args.quantize, device="cpu", prefix_cache=on, max_rank=16)
    engine = Engine.from_config(cfg)
    engine.start()
    try:
        versions = [AdapterVersion("bench", f"a{i}", 1, f"path:{d}",
                                   load=lambda d=d: load_peft_adapter(d, engine.model_config, cfg.max_rank))
                    for i, d in enumerate(adapter_dirs)]
        # Warm-up: adapters into slots, kernels built; a short unrelated prompt leaves no useful cache behind.
        run_batch(engine, versions, [(a, [11 + a] * 8) for a in range(len(versions))], 2)
        out: dict[str, Any] = {"prefix_cache": on}
        before = engine.stats().prefix
        shared = run_batch(engine, versions, loads["shared"], args.new_tokens)
        firsts = {a: i for i, (a, _) in reversed(list(enumerate(loads["shared"])))}
        hit_ttft = [t for i, t in enumerate(shared["ttft_s"]) if i not in firsts.values()]
        shared["ttft_hit_p50_s"] = median(hit_ttft)
        after = engine.stats().prefix
        shared["cache_hits"], shared["cache_misses"] = after.hits - before.hits, after.misses - before.misses
        shared["tokens_saved"] = after.tokens_saved - before.tokens_saved
        alone = []
        g = torch.Generator().manual_seed(args.seed + 1)
        for a in range(len(versions)):
            system = loads["shared"][firsts[a]][1][:args.system_len]
            r = run_batch(engine, versions, [(a, system + _random_ids(args.question_len, 10_000, g))], 1)
            alone.append(r["ttft_s"][0])
        shared["ttft_alone_p50_s"] = median(alone)
        out["shared"] = {k: v for k, v in shared.items() if k != "ttft_s"}
        distinct = run_batch(engine, versions, loads["distinct"], args.new_tokens)
        out["distinct"] = {k: v for k, v in distinct.items() if k != "ttft_s"}
        out["distinct"]["ttft_p50_s"] = median(distinct["ttft_s"])
        out["prefix_stats"] = dataclasses.asdict(engine.stats().prefix)
        return out
    finally:
        engine.shutdown()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--quantize", default="int8", choices=("none", "int8", "int4"))
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--adapters", type=int, default=4)
    p.add_argument("--system-len", type=int, default=512)
    p.add_argument("--question-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)

    from server.core.paths import resolve_home
    from server.model.config import ModelConfig
    from server.model.loader import resolve_model

    model_dir = resolve_model(args.model, resolve_home())
    vocab = ModelConfig.from_file(model_dir / "config.json").vocab_size
    loads = workloads(args, vocab)
    load_before = os.getloadavg()
    result: dict[str, Any] = {"benchmark": "prefix_cache", "workload": vars(args) | {"out": str(args.out)},
                              "load_average": {"before": load_before}}
    with tempfile.TemporaryDirectory() as tmp:
        dirs = make_adapters(model_dir, Path(tmp), args.adapters, args.rank, args.seed)
        for on_, name in ((False, "off"), (True, "on")):
            m = result[name] = run_mode(args, on_, dirs, loads)
            s, d = m["shared"], m["distinct"]
            print(f"cache {name:3}: shared {s['tok_per_s']:.1f} tok/s, TTFT p50 hit {s['ttft_hit_p50_s']:.2f} s, "
                  f"alone {s['ttft_alone_p50_s']:.3f} s; distinct {d['tok_per_s']:.1f} tok/s "
                  f"(load average now {os.getloadavg()[0]:.1f})", flush=True)
            write_json(args.out, {"machine": cpu_machine_info(), **result})
    off, on = result["off"], result["on"]
    summary = {
        "ttft_hit_p50_speedup": off["shared"]["ttft_hit_p50_s"] / on["shared"]["ttft_hit_p50_s"],
        "ttft_alone_p50_speedup": off["shared"]["ttft_alone_p50_s"] / on["shared"]["ttft_alone_p50_s"],
        "shared_throughput_ratio": on["shared"]["tok_per_s"] / off["shared"]["tok_per_s"],
        "distinct_throughput_change": on["distinct"]["tok_per_s"] / off["distinct"]["tok_per_s"] - 1.0,
    }
    summary["shared_cpu_ratio"] = off["shared"]["cpu_s"] / on["shared"]["cpu_s"]
    summary["distinct_cpu_change"] = on["distinct"]["cpu_s"] / off["distinct"]["cpu_s"] - 1.0
    info = cpu_machine_info()
    result["load_average"]["after"] = os.getloadavg()
    write_json(args.out, {"machine": info, "machine_line": machine_line(info), **result, "summary": summary})
    print(machine_line(info))
    print(f"load average before {load_before[0]:.1f}, after {result['load_average']['after'][0]:.1f}")
    print({k: round(v, 3) for k, v in summary.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
