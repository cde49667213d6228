"""`make fleet`: PostgreSQL, three replicas and HAProxy on loopback, adapters registered through the proxy,
a mixed load, and which replica served which adapter. Serves until Ctrl-C, then stops all it started."""
from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from server.fleet.haproxy import AFFINITY, ROUND_ROBIN
from server.fleet.local import LocalFleet


def _model_dir(model: str) -> Path:
    """The model's HF directory, converted into the same home the replicas use ($LORASERVE_HOME or the default)."""
    from server.core.paths import resolve_home
    from server.model.loader import resolve_model

    return resolve_model(model, resolve_home())


def _table(fleet: LocalFleet, adapters: list[str]) -> str:
    served = fleet.served_by()
    names = [r.name for r in fleet.replicas]
    rows = [["adapter", *names]]
    for a in [*adapters, "base"]:
        rows.append([a, *[str(served.get(a, {}).get(n, "-")) for n in names]])
    slots = fleet.slot_counters()
    rows.append(["slot misses", *[f"{slots.get(n, {}).get('misses', 0):.0f}" for n in names]])
    rows.append(["slot hits", *[f"{slots.get(n, {}).get('hits', 0):.0f}" for n in names]])
    width = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  " + "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, width)))
                     for r in rows)


def _load(target: str, adapters: list[str], requests: int, concurrency: int) -> str:
    from server.client import loadgen

    args = loadgen.build_parser().parse_args([
        "--target", target, "--adapters", ",".join(adapters), "--include-base", "--mix", "skewed",
        "--requests", str(requests), "--concurrency", str(concurrency), "--min-new-tokens", "8",
        "--max-new-tokens", "24", "--timeout", "300"])
    s = asyncio.run(loadgen.run(args))
    errors = ", ".join(f"{k} {v}" for k, v in s.errors.items()) or "none"
    return (f"{s.ok}/{s.requests} ok (errors: {errors}) in {s.seconds:.1f}s, {s.requests_per_s:.1f} req/s, "
            f"{s.generated_tokens_per_s:.0f} tok/s, latency p50 {s.latency_p50_s:.2f}s p99 {s.latency_p99_s:.2f}s")


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="make fleet", description=__doc__)
    p.add_argument("--replicas", type=int, default=3, help="2 to 8 [3]")
    p.add_argument("--model", default="default", help="as `serve --model` [default: SmolLM2-135M, bundled]")
    p.add_argument("--adapters", type=int, default=6, help="random demo adapters to register [6]")
    p.add_argument("--requests", type=int, default=90, help="requests in the mixed load [90]")
    p.add_argument("--concurrency", type=int, default=6)
    p.add_argument("--round-robin", action="store_true", help="balance round-robin instead of adapter affinity")
    p.add_argument("--balance-factor", type=int, default=None,
                   help="HAProxy hash-balance-factor: 0 = pure affinity [default: the config's 150, bounded loads]")
    p.add_argument("--exit", action="store_true", help="stop after the demo instead of serving until Ctrl-C")
    p.add_argument("--workdir", type=Path, default=None, help="logs and objects (default: a temp dir, removed)")
    p.add_argument("serve_args", nargs="*", help="extra `loraserve serve` flags for every replica (after --)")
    args = p.parse_args(argv)

    def on_term(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    # Ctrl-C stops the fleet even when this was started where SIGINT is ignored (a background job of a script)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    fleet = LocalFleet(args.replicas, model=args.model, workdir=args.workdir,
                       balance=ROUND_ROBIN if args.round_robin else AFFINITY, serve_args=args.serve_args,
                       durable=True, balance_factor=args.balance_factor)
    try:
        kept = "" if args.workdir else " (removed on exit; --workdir DIR keeps them)"
        print(f"starting PostgreSQL, {args.replicas} replicas ({args.model}) and HAProxy; logs in {fleet.workdir}"
              f"{kept}", flush=True)
        t0 = time.monotonic()
        fleet.start()
        print(f"fleet up in {time.monotonic() - t0:.0f}s")
        print(f"  registry index  {fleet.registry_url}  (objects: {fleet.objects})")
        for r in fleet.replicas:
            print(f"  replica {r.name}      grpc {r.target}  http http://{r.http_address}/v1  "
                  f"metrics http://127.0.0.1:{r.metrics_port}/metrics")
        assert fleet.proxy is not None
        how = "round-robin" if args.round_robin else "affinity on x-loraserve-adapter"
        print(f"  HAProxy         grpc {fleet.target}  http {fleet.base_url}/v1  ({how}); "
              f"stats http://{fleet.proxy.admin}/stats", flush=True)
        model_dir = _model_dir(args.model)
        names = [f"demo-{i}" for i in range(args.adapters)]
        from server.fleet.adapters import write_random_adapter

        with tempfile.TemporaryDirectory(prefix="loraserve-demo-adapters-") as tmp:
            for i, name in enumerate(names):
                d = write_random_adapter(model_dir, Path(tmp) / name, rank=8 + 8 * (i % 2), seed=i)
                print(f"registered {fleet.register(name, d)} through the proxy", flush=True)
        print(f"mixed load through the proxy: {args.requests} requests, skewed over {len(names)} adapters "
              "and the base model ...", flush=True)
        print("  " + _load(fleet.target, names, args.requests, args.concurrency))
        print("which replica served which adapter (requests, from each replica's /metrics):")
        print(_table(fleet, names), flush=True)
        spread = [a for a, per in fleet.served_by().items() if a in names and len(per) > 1]
        if spread and not args.round_robin:
            print(f"  ({', '.join(sorted(spread))} also ran on another replica: with bounded loads (hash-balance-factor"
                  f" {args.balance_factor or 150}), a request whose replica already has more than that share of the "
                  "requests in flight goes to the next replica on the ring; --balance-factor 0 shows pure affinity)",
                  flush=True)
        if args.exit:
            return 0
        print(f"\nthe fleet keeps serving: loraserve generate --target {fleet.target} --adapter {names[0]} "
              f"--prompt 'Hello'\n  (loraserve bench / adapters work the same way), or over HTTP:\n"
              f"  curl {fleet.base_url}/v1/completions -H 'x-loraserve-adapter: {names[0]}' "
              f"-H 'content-type: application/json' -d '{{\"model\": \"{names[0]}\", \"prompt\": \"Hello\"}}'\n"
              "Ctrl-C stops everything", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("\nstopping the fleet ...", flush=True)
        return 0
    finally:
        fleet.stop()
        print("stopped: HAProxy, the replicas and PostgreSQL", flush=True)


if __name__ == "__main__":
    sys.exit(main())
