"""Adapter affinity vs round-robin across a fleet: the S-LoRA workload against 3 replicas through HAProxy.

One PostgreSQL registry holds 200 random adapters (registered once, before any replica starts). Each
arm starts 3 fresh replicas (cold device slots and host caches) behind HAProxy with
deploy/haproxy/haproxy.cfg and balances one way:

- `affinity`: pure consistent hashing on `x-loraserve-adapter` (`hash-balance-factor 0`);
- `bounded`: the same with bounded loads (`--balance-factor`, default 150, the config's default: no
  replica gets more than 1.5x the average of requests in flight; the excess goes to the next replica);
- `round-robin`.

Every arm replays the same S-LoRA trace (power-law adapter popularity, Poisson arrivals, open loop:
requests are sent at their arrival times whatever the fleet's state) and reads each replica's
/metrics afterwards. Rounds rotate the order of the arms.

Reported per arm: device-slot hit rate (the share of requests that did not need a load of their adapter
into a slot of the replica serving them: 1 - slot loads / requests), cold loads (adapter loads into
slots) per second, disk loads (reads of the shared objects folder into a replica's host memory),
throughput, TTFT and end-to-end latency p50/p99 as the client sees them, and how requests spread over
the replicas.

    python -m benchmarks.fleet_affinity [--requests 200 --rate 0.8 --rounds 1 --arms affinity,bounded,round-robin]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from benchmarks.common import write_json
from benchmarks.workload import WorkloadConfig, percentiles, prompt_ids, slora_requests, summarize

RESULTS = Path(__file__).resolve().parent / "results" / "fleet_affinity.json"


@dataclass
class Arm:
    balance: str
    round: int
    requests: int = 0
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    requests_per_s: float = 0.0
    tokens_per_s: float = 0.0
    ttft: dict[str, float] = field(default_factory=dict)
    latency: dict[str, float] = field(default_factory=dict)
    slot_hits: float = 0.0
    slot_misses: float = 0.0
    slot_hit_rate: float = 0.0
    cold_loads: float = 0.0
    cold_loads_per_s: float = 0.0
    disk_loads: float = 0.0
    per_replica_requests: dict[str, float] = field(default_factory=dict)
    adapters_per_replica: dict[str, int] = field(default_factory=dict)


async def _replay(target: str, trace: list, names: list[str], vocab: int, timeout: float) -> list[dict[str, Any]]:
    import grpc

    from server.api.gen.loraserve.v1 import inference_pb2 as pb
    from server.api.gen.loraserve.v1 import inference_pb2_grpc as pb_grpc
    from server.client.routing import CHANNEL_OPTIONS, routing_metadata

    out: list[dict[str, Any]] = []
    async with grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) as ch:
        stub = pb_grpc.InferenceStub(ch)
        t0 = time.perf_counter()

        async def one(r) -> None:
            await asyncio.sleep(max(0.0, r.arrival_s - (time.perf_counter() - t0)))
            name = names[r.adapter]
            req = pb.GenerateRequest(adapter_id=name, prompt_token_ids=pb.TokenIds(
                ids=prompt_ids(r.prompt_len, vocab, seed=r.index)),
                params=pb.SamplingParams(max_new_tokens=r.output_len, ignore_eos=True))
            start = time.perf_counter()
            ttft, tokens, code = None, 0, "OK"
            try:
                async for c in stub.GenerateStream(req, metadata=routing_metadata(name), timeout=timeout):
                    if c.token_ids and ttft is None:
                        ttft = time.perf_counter() - start
                    tokens += len(c.token_ids)
            except grpc.aio.AioRpcError as e:
                code = e.code().name
            out.append({"code": code, "ttft": ttft, "latency": time.perf_counter() - start, "tokens": tokens,
                        "end": time.perf_counter() - t0})

        await asyncio.gather(*(one(r) for r in trace))
    return out


def _run_arm(balance: str, rnd: int, args: argparse.Namespace, registry_url: str, objects: Path, trace: list,
             names: list[str], vocab: int, workdir: Path) -> Arm:
    """Start a fleet balancing by `balance`, replay the trace through its proxy, read every replica's metrics."""
    from server.fleet.haproxy import AFFINITY, ROUND_ROBIN
    from server.fleet.local import LocalFleet
    from server.fleet.replica import metric_value, parse_samples

    serve_args = ["--max-adapters-on-device", str(args.slots), "--max-rank", str(args.rank),
                  "--cpu-threads", str(args.cpu_threads), "--metrics-adapter-labels", "1024",
                  "--max-batch-size", "16", *args.serve_arg]
    fleet = LocalFleet(args.replicas, model=args.model, workdir=workdir / f"{balance}-{rnd}",
                       balance=ROUND_ROBIN if balance == "round-robin" else AFFINITY, serve_args=serve_args,
                       registry_url=registry_url, objects=objects,
                       balance_factor=args.balance_factor if balance == "bounded" else 0)
    fleet.start()
    try:
        print(f"  [{balance} #{rnd}] fleet up; replaying {len(trace)} requests ...", flush=True)
        t0 = time.perf_counter()
        results = asyncio.run(_replay(fleet.target, trace, names, vocab, args.timeout))
        wall = time.perf_counter() - t0
        arm = Arm(balance, rnd, requests=len(results))
        ok = [r for r in results if r["code"] == "OK"]
        arm.ok = len(ok)
        for r in results:
            if r["code"] != "OK":
                arm.errors[r["code"]] = arm.errors.get(r["code"], 0) + 1
        arm.seconds = wall
        arm.requests_per_s = len(ok) / wall
        arm.tokens_per_s = sum(r["tokens"] for r in ok) / wall
        arm.ttft = percentiles([r["ttft"] for r in ok if r["ttft"] is not None])
        arm.latency = percentiles([r["latency"] for r in ok])
        for rep in fleet.replicas:
            text = rep.metrics_text()
            arm.slot_hits += metric_value(text, "loraserve_adapter_slot_hits_total")
            arm.slot_misses += metric_value(text, "loraserve_adapter_slot_misses_total")
            arm.cold_loads += metric_value(text, "loraserve_adapter_loads_total")
            arm.disk_loads += metric_value(text, "loraserve_adapter_disk_loads_total")
            served = parse_samples(text, "loraserve_adapter_requests_total")
            arm.per_replica_requests[rep.name] = sum(v for _, v in served)
            arm.adapters_per_replica[rep.name] = sum(1 for lab, v in served if v and lab.get("adapter") != "base")
        # The pool counts a "miss" per scheduling attempt that finds no slot, so a request can miss several
        # times; a load into a slot happens once per cold request (requests of one adapter share a load).
        arm.slot_hit_rate = 1.0 - arm.cold_loads / arm.ok if arm.ok else 0.0
        arm.cold_loads_per_s = arm.cold_loads / wall
        return arm
    finally:
        fleet.stop()


def _register(args: argparse.Namespace, registry_url: str, objects: Path, names: list[str], adapters_dir: Path) -> int:
    """Make the adapters and register them once, in-process, so no replica starts with them in memory."""
    from adapter_registry import Registry
    from server.fleet.adapters import write_random_adapter
    from server.model.config import ModelConfig
    from server.core.paths import resolve_home
    from server.model.loader import model_fingerprint, resolve_model

    home = resolve_home()  # the replicas' home ($LORASERVE_HOME or the default)
    model_dir = resolve_model(args.model, home)
    cfg = ModelConfig.from_file(model_dir / "config.json")
    reg = Registry(registry_url, cfg, model_fingerprint(model_dir, home), args.rank, objects=objects,
                   host_cache_bytes=0)
    try:
        for i, name in enumerate(names):
            d = write_random_adapter(model_dir, adapters_dir / name, rank=args.rank,
                                     targets=("q", "k", "v", "o", "gate", "up", "down"), seed=i)
            reg.register_path("default", name, d, {"bench": "fleet_affinity"}, allow_any_path=True)
    finally:
        reg.close()
    return cfg.vocab_size


def _row(a: Arm) -> str:
    return (f"| {a.balance} #{a.round} | {a.ok}/{a.requests} | {100 * a.slot_hit_rate:.1f}% | {a.cold_loads:.0f} "
            f"({a.cold_loads_per_s:.2f}/s) | {a.disk_loads:.0f} | {a.requests_per_s:.2f} | {a.tokens_per_s:.1f} | "
            f"{a.ttft['p50']:.2f} / {a.ttft['p99']:.2f} | {a.latency['p50']:.2f} / {a.latency['p99']:.2f} | "
            f"{'/'.join(f'{v:.0f}' for v in a.per_replica_requests.values())} |")


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fleet_affinity", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--adapters", type=int, default=200)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--slots", type=int, default=8, help="device slots per replica (--max-adapters-on-device)")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--rate", type=float, default=0.8, help="mean arrivals per second (Poisson)")
    p.add_argument("--alpha", type=float, default=0.3, help="popularity power law (numpy power; < 1 is skewed)")
    p.add_argument("--prompt", type=int, nargs=2, default=(8, 64), metavar=("LO", "HI"))
    p.add_argument("--output", type=int, nargs=2, default=(4, 24), metavar=("LO", "HI"))
    p.add_argument("--arms", default="affinity,bounded,round-robin",
                   help="comma-separated: affinity, bounded, round-robin")
    p.add_argument("--balance-factor", type=int, default=150, help="hash-balance-factor of the bounded arm")
    p.add_argument("--rounds", type=int, default=1, help="times every arm runs, the order rotated each round")
    p.add_argument("--cpu-threads", type=int, default=1, help="engine threads per replica")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--serve-arg", action="append", default=[], help="extra `serve` flag for every replica")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)

    from server.fleet.postgres import PostgresCluster

    kinds = [a.strip() for a in args.arms.split(",") if a.strip()]
    if not kinds or set(kinds) - {"affinity", "bounded", "round-robin"}:
        p.error(f"--arms {args.arms!r}: choose from affinity, bounded, round-robin")

    wl = WorkloadConfig(num_adapters=args.adapters, alpha=args.alpha, rate=args.rate, cv=1.0,
                        num_requests=args.requests, input_range=tuple(args.prompt), output_range=tuple(args.output),
                        seed=args.seed)
    load_start = os.getloadavg()
    trace = slora_requests(wl)
    names = [f"a{i:03d}" for i in range(args.adapters)]
    shape = summarize(trace)
    print(f"trace: {shape}", flush=True)
    arms: list[Arm] = []
    with tempfile.TemporaryDirectory(prefix="loraserve-fleet-bench-") as tmp, PostgresCluster() as pg:
        work = Path(tmp)
        url = pg.create_database("loraserve")
        objects = work / "objects"
        t0 = time.perf_counter()
        vocab = _register(args, url, objects, names, work / "adapters")
        print(f"registered {len(names)} adapters in {time.perf_counter() - t0:.0f}s", flush=True)
        for rnd in range(args.rounds):
            for balance in kinds[rnd % len(kinds):] + kinds[:rnd % len(kinds)]:
                arm = _run_arm(balance, rnd + 1, args, url, objects, trace, names, vocab, work)
                arms.append(arm)
                print("  " + _row(arm), flush=True)
    header = ("| arm | ok | slot hit rate | cold loads | disk loads | req/s | tok/s | TTFT p50 / p99 s | "
              "e2e p50 / p99 s | requests per replica |")
    print("\n" + header + "\n|" + "---|" * 10)
    for a in arms:
        print(_row(a))
    out = {"created_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "machine": platform.processor() or
           platform.machine(), "cpus": os.cpu_count(), "load_average_start": load_start, "load_average_end": os.getloadavg(),
           "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
           "workload": wl.to_dict(), "trace": shape, "arms": [asdict(a) for a in arms]}
    write_json(args.out, out)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
