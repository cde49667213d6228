"""S-LoRA-style serving run: many adapters, power-law popularity, Gamma/Poisson arrivals.

Requests from `benchmarks.workload.slora_requests` are submitted at their arrival
times to one engine whose device slots hold fewer adapters than the trace uses,
so adapters load and evict while traffic runs. Reports throughput (requests/s,
tokens/s), p50/p90/p99 first-token and end-to-end latency, SLO attainment, and
the pool's loads/evictions, for each adapter count (the JSON rewritten after each, so a run cut
short keeps the counts it finished).

    python -m benchmarks.gpu_slora --shape 1b --num-adapters 100 1000 --rate 4 --num-requests 400
    python -m benchmarks.gpu_slora --dry-run --out /tmp/slora.json
"""
from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

import torch

from benchmarks import gpu_common as common
from benchmarks.roofline import SHAPES
from benchmarks.workload import WorkloadConfig, percentiles, prompt_ids, slora_requests, summarize


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="S-LoRA-style multi-adapter serving benchmark")
    common.add_common_args(p, "results/gpu_slora.json")
    p.add_argument("--num-adapters", type=int, nargs="+", default=[100, 1000])
    p.add_argument("--alpha", type=float, default=1.0, help="numpy power(alpha) popularity; < 1 is skewed")
    p.add_argument("--rate", type=float, default=4.0, help="requests/s")
    p.add_argument("--cv", type=float, default=1.0, help="1 = Poisson arrivals")
    p.add_argument("--num-requests", type=int, default=400)
    p.add_argument("--input-range", type=int, nargs=2, default=[8, 512])
    p.add_argument("--output-range", type=int, nargs=2, default=[8, 512])
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--slots", type=int, default=64, help="adapter slots on the device")
    p.add_argument("--quantize", default="int8", choices=("none", "int8", "int4"))
    p.add_argument("--slo", type=float, default=6.0, help="first-token SLO in seconds, for attainment")
    return p


def run_one(args, model_dir: Path, adapters: list[Path], device: torch.device, n_adapters: int) -> dict:
    from server.core.engine_config import EngineConfig
    from server.engine.engine import Engine
    from server.engine.types import Request, SamplingParams

    wl = WorkloadConfig(num_adapters=n_adapters, alpha=args.alpha, rate=args.rate, cv=args.cv,
                        num_requests=args.num_requests, input_range=tuple(args.input_range),
                        output_range=tuple(args.output_range), seed=args.seed)
    trace = slora_requests(wl)
    max_ctx = args.input_range[1] + args.output_range[1]
    cfg = EngineConfig(model=str(model_dir), device=device.type,
                       dtype="bfloat16" if device.type == "cuda" else "float32", quantize=args.quantize,
                       max_adapters_on_device=args.slots, max_rank=args.rank, max_model_len=max_ctx,
                       max_batch_size=64 if device.type == "cuda" else 8,
                       kv_cache_tokens=0 if device.type == "cuda" else 8 * max_ctx, max_waiting=10 * len(trace) + 16)
    engine = Engine.from_config(cfg)
    engine.start()
    try:
        versions = [common.local_adapter(p, engine.model_config, args.rank) for p in adapters[:n_adapters]]
        vocab = engine.model_config.vocab_size
        reqs = [(r.arrival_s, Request(prompt_ids(r.prompt_len, vocab, seed=r.index),
                                      SamplingParams(max_new_tokens=r.output_len, ignore_eos=True),
                                      versions[r.adapter], request_id=f"slora-{n_adapters}-{r.index}"))
                for r in trace]
        common.run_requests(engine, [(0.0, Request(prompt_ids(8, vocab, seed=1), SamplingParams(max_new_tokens=2)))])
        before = engine.stats()
        t0 = time.perf_counter()
        res = common.run_requests(engine, reqs)
        wall = time.perf_counter() - t0
        after = engine.stats()
    finally:
        engine.shutdown()
        del engine
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    ok = [r for r in res if "error" not in r]
    tokens = sum(r["tokens"] for r in ok)
    return {
        "num_adapters": n_adapters, "workload": wl.to_dict(), "trace": summarize(trace),
        "requests": len(res), "failed": len(res) - len(ok),
        "first_error": next((r["error"] for r in res if "error" in r), None),
        "wall_s": wall, "req_s": len(ok) / wall, "tok_s": tokens / wall,
        "ttft_s": percentiles([r["ttft"] for r in ok]), "e2e_s": percentiles([r["e2e"] for r in ok]),
        "slo_attainment": sum(r["ttft"] <= args.slo for r in ok) / max(1, len(res)),
        "adapter_loads": after.pool.loads - before.pool.loads,
        "adapter_evictions": after.pool.evictions - before.pool.evictions,
        "adapter_load_seconds": after.pool.load_seconds - before.pool.load_seconds,
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = common.resolve_args(args)
    if args.tiny:
        args.num_adapters, args.num_requests, args.rate, args.slots = [6], 12, 40.0, 3
        args.input_range, args.output_range = [4, 12], [2, 6]
    shape = SHAPES[args.shape]
    work = Path(args.workdir)
    print(f"preparing random {shape.name} model and {max(args.num_adapters)} adapters under {work} ...", flush=True)
    model_dir = common.make_random_model_dir(shape, work / f"model-{shape.name}", device, seed=args.seed)
    adapters = common.make_random_adapters(shape, work / f"adapters-{shape.name}", max(args.num_adapters),
                                           args.rank, seed=args.seed, device=device)
    rows: list[dict] = []
    payload = {"benchmark": "gpu_slora", "machine": common.machine_info(device), "shape": shape.to_dict(),
               "engine": {"slots": args.slots, "rank": args.rank, "quantize": args.quantize}, "results": rows,
               "note": "CPU dry run on a tiny shape: numbers are meaningless" if device.type == "cpu" else ""}
    for n in args.num_adapters:
        rows.append(run_one(args, model_dir, adapters, device, n))
        out = common.write_json(args.out, payload)  # after every count: a run cut short keeps what it measured
    table = [{"adapters": r["num_adapters"], "req/s": r["req_s"], "tok/s": r["tok_s"],
              "ttft p50": r["ttft_s"]["p50"], "ttft p99": r["ttft_s"]["p99"], "e2e p50": r["e2e_s"]["p50"],
              "e2e p99": r["e2e_s"]["p99"], "slo": r["slo_attainment"], "loads": r["adapter_loads"],
              "evictions": r["adapter_evictions"], "failed": r["failed"]} for r in rows]
    common.print_table(table, list(table[0]), title=f"S-LoRA workload, shape {shape.name}, rate {args.rate}/s, "
                       f"cv {args.cv}, alpha {args.alpha}, {args.slots} slots, quantize {args.quantize}")

    def draw(axes) -> None:
        xs = [r["num_adapters"] for r in rows]
        axes[0].plot(xs, [r["tok_s"] for r in rows], marker="o")
        axes[0].set_xlabel("adapters in the trace")
        axes[0].set_ylabel("tokens/s")
        for q in ("p50", "p99"):
            axes[1].plot(xs, [r["ttft_s"][q] for r in rows], marker="o", label=f"first token {q}")
            axes[1].plot(xs, [r["e2e_s"][q] for r in rows], marker="s", label=f"end to end {q}")
        axes[1].set_xlabel("adapters in the trace")
        axes[1].set_ylabel("seconds")
        axes[1].legend()
        for ax in axes:
            ax.set_xscale("log")
            ax.grid(alpha=0.3)

    print(common.wrote(out, common.plot(out, 2, draw)))
    failed = sum(r["failed"] for r in rows)
    if failed:
        print(f"FAIL: {failed} requests failed; first: {rows[0]['first_error']}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
