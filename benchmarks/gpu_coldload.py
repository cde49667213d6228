"""Adapter cold-load time, and what loading does to decode that is already running.

Phase "quiet": B requests decode on adapters already on the device; the gaps
between consecutive tokens of every stream (inter-token latency, ITL) are recorded.
Phase "loading": the same decode while another thread brings N cold adapters
from disk onto the device one after another (read + validate + host-to-device
copy into a free slot). A loader that never stalls the loop leaves ITL p99 close
to the quiet phase's; each load's seconds and size are reported too.
Phase "loading_host": the same, with N other adapters already read into host memory
(their load returns the weights at once), so a load is slot bookkeeping plus the
host-to-device copy: the issue's "cold load from host memory" (goal: under 5 ms, no stall).
The JSON is rewritten after each rank, so a run cut short keeps the ranks it finished.

    python -m benchmarks.gpu_coldload --shape 1b --cold 16 --rank 16 64
    python -m benchmarks.gpu_coldload --dry-run --out /tmp/cold.json
"""
from __future__ import annotations

import argparse
import gc
import threading
import time
from pathlib import Path

import torch

from benchmarks import gpu_common as common
from benchmarks.roofline import SHAPES
from benchmarks.workload import percentiles, prompt_ids


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="adapter cold-load benchmark")
    common.add_common_args(p, "results/gpu_coldload.json")
    p.add_argument("--batch", type=int, default=32, help="decoding requests while adapters load")
    p.add_argument("--running-adapters", type=int, default=8)
    p.add_argument("--cold", type=int, default=16, help="adapters loaded during decode")
    p.add_argument("--rank", type=int, nargs="+", default=[16, 64])
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=256)
    p.add_argument("--quantize", default="int8", choices=("none", "int8", "int4"))
    return p


def _decode_itl(engine, versions, args, tag: str, during=None) -> tuple[list[float], list[dict]]:
    """Run B requests; optionally start `during()` in a thread once every request has its first token.

    Returns the inter-token gaps and the loads `during` made (each with its start and end on the same clock).
    With a loader, only the gaps inside its window count, and each load says whether decode was still running
    when it ended: loads that outlast the decode disturb nothing, so they must not dilute the figure."""
    from server.engine.types import Request, SamplingParams

    vocab = engine.model_config.vocab_size
    params = SamplingParams(max_new_tokens=args.new, ignore_eos=True)
    stamps: list[list[float]] = [[] for _ in range(args.batch)]
    first_seen = threading.Barrier(args.batch + 1)
    loads: list[dict] = []

    def consume(i: int, stream) -> None:
        waited = False
        for d in stream:
            if d.token_ids:
                stamps[i].append(time.perf_counter())
                if not waited:
                    waited = True
                    first_seen.wait()

    threads = []
    for i in range(args.batch):
        req = Request(prompt_ids(args.prompt, vocab, seed=i), params, versions[i % len(versions)],
                      request_id=f"{tag}-{i}")
        th = threading.Thread(target=consume, args=(i, engine.submit(req)), daemon=True)
        th.start()
        threads.append(th)
    first_seen.wait()
    loader = None
    if during is not None:
        loader = threading.Thread(target=lambda: loads.extend(during()), daemon=True)
        loader.start()
    for th in threads:
        th.join()
    if loader is not None:
        loader.join()
    gaps = [(a, b) for s in stamps for a, b in zip(s, s[1:])]
    if loads:
        start, end = loads[0]["start"], loads[-1]["end"]
        decode_end = max((s[-1] for s in stamps if s), default=start)
        for x in loads:
            x["during_decode"] = x["end"] <= decode_end
        gaps = [(a, b) for a, b in gaps if b >= start and a <= end]
    return [b - a for a, b in gaps], loads


def run_rank(args, model_dir: Path, device: torch.device, rank: int) -> dict:
    from server.core.engine_config import EngineConfig
    from server.core.identity import AdapterVersion
    from server.engine.engine import Engine

    shape = SHAPES[args.shape]
    n_total = args.running_adapters + args.cold
    paths = common.make_random_adapters(shape, Path(args.workdir) / f"adapters-{shape.name}", n_total, rank,
                                        seed=args.seed, device=device)
    cfg = EngineConfig(model=str(model_dir), device=device.type,
                       dtype="bfloat16" if device.type == "cuda" else "float32", quantize=args.quantize,
                       max_adapters_on_device=n_total + args.cold, max_rank=rank, max_batch_size=args.batch,
                       kv_cache_tokens=args.batch * (args.prompt + args.new + 16),
                       max_model_len=args.prompt + args.new + 16)  # graphs only for the context it reaches
    engine = Engine.from_config(cfg)
    engine.start()
    try:
        versions = [common.local_adapter(p, engine.model_config, rank) for p in paths]
        running, cold = versions[:args.running_adapters], versions[args.running_adapters:]
        for s in running:
            engine.pool.load(s)
        _decode_itl(engine, running, args, f"warm-r{rank}")
        quiet, _ = _decode_itl(engine, running, args, f"quiet-r{rank}")

        def load_all(specs) -> list[dict]:
            out = []
            for s in specs:
                t0 = time.perf_counter()
                engine.pool.load(s)
                t1 = time.perf_counter()
                out.append({"adapter": s.name, "seconds": t1 - t0, "start": t0, "end": t1})
            return out

        loading, loads = _decode_itl(engine, running, args, f"loading-r{rank}", during=lambda: load_all(cold))
        # The same adapters under other digests (so not resident), their weights read into host memory first.
        in_host = [AdapterVersion(tenant=s.tenant, name=f"{s.name}-host", version=s.version, digest=f"host:{s.digest}",
                                  load=(lambda w: lambda: w)(s.load())) for s in cold]
        loading_host, host_loads = _decode_itl(engine, running, args, f"loading-host-r{rank}",
                                               during=lambda: load_all(in_host))
    finally:
        engine.shutdown()
        engine = None  # the closures above hold it too: drop it so the device memory can go
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    size = sum(f.stat().st_size for f in Path(paths[-1]).glob("*.safetensors"))
    q, lo, lh = percentiles(quiet), percentiles(loading), percentiles(loading_host)
    return {"rank": rank, "adapter_bytes": size, "cold_loads": loads,
            "load_s": percentiles([x["seconds"] for x in loads]),
            "itl_quiet_s": {**q, "max": max(quiet, default=float("nan"))},
            "itl_loading_s": {**lo, "max": max(loading, default=float("nan"))},
            "itl_p99_ratio": lo["p99"] / q["p99"] if q["p99"] else float("nan"),
            "loads_during_decode": sum(x["during_decode"] for x in loads),
            "host_loads_during_decode": sum(x["during_decode"] for x in host_loads),
            "host_loads": host_loads, "host_load_s": percentiles([x["seconds"] for x in host_loads]),
            "itl_loading_host_s": {**lh, "max": max(loading_host, default=float("nan"))},
            "itl_host_p99_ratio": lh["p99"] / q["p99"] if q["p99"] else float("nan")}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = common.resolve_args(args)
    if args.tiny:
        args.batch, args.running_adapters, args.cold, args.prompt, args.new, args.rank = 2, 2, 2, 8, 6, [8]
    shape = SHAPES[args.shape]
    print(f"preparing random {shape.name} model under {args.workdir} ...", flush=True)
    model_dir = common.make_random_model_dir(shape, Path(args.workdir) / f"model-{shape.name}", device,
                                             seed=args.seed)
    rows: list[dict] = []
    payload = {"benchmark": "gpu_coldload", "machine": common.machine_info(device), "shape": shape.to_dict(),
               "workload": {"batch": args.batch, "running_adapters": args.running_adapters, "cold": args.cold,
                            "prompt": args.prompt, "new": args.new, "quantize": args.quantize},
               "results": rows,
               "note": "CPU dry run on a tiny shape: numbers are meaningless" if device.type == "cpu" else ""}
    for r in args.rank:
        rows.append(run_rank(args, model_dir, device, r))
        out = common.write_json(args.out, payload)  # after every rank: a run cut short keeps what it measured
    table = [{"rank": r["rank"], "adapter MB": r["adapter_bytes"] / 1e6, "load p50 s": r["load_s"]["p50"],
              "load max s": max((x["seconds"] for x in r["cold_loads"]), default=float("nan")),
              "ITL p50 quiet ms": r["itl_quiet_s"]["p50"] * 1e3, "ITL p99 quiet ms": r["itl_quiet_s"]["p99"] * 1e3,
              "ITL p50 loading ms": r["itl_loading_s"]["p50"] * 1e3,
              "ITL p99 loading ms": r["itl_loading_s"]["p99"] * 1e3, "p99 ratio": r["itl_p99_ratio"],
              "host load p50 ms": r["host_load_s"]["p50"] * 1e3, "host p99 ratio": r["itl_host_p99_ratio"],
              "loads in decode": f"{r['loads_during_decode']}+{r['host_loads_during_decode']}"}
             for r in rows]
    common.print_table(table, list(table[0]), title=f"cold loads during decode, shape {shape.name}, B={args.batch}, "
                       f"{args.cold} cold adapters")

    def draw(axes) -> None:
        xs = range(len(rows))
        axes[0].bar(xs, [r["load_s"]["p50"] for r in rows])
        axes[0].set_xticks(list(xs), [f"rank {r['rank']}" for r in rows])
        axes[0].set_ylabel("cold load p50, s")
        for k, label in (("itl_quiet_s", "quiet"), ("itl_loading_s", "while loading")):
            axes[1].plot([r["rank"] for r in rows], [r[k]["p99"] * 1e3 for r in rows], marker="o",
                         label=f"ITL p99 {label}")
        axes[1].set_xlabel("rank")
        axes[1].set_ylabel("ms")
        axes[1].legend()

    print(common.wrote(out, common.plot(out, 2, draw)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
