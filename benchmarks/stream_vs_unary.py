"""Streaming against unary on one server: what a streamed token costs (issue 16, "base, streamed").

`python -m benchmarks.stream_vs_unary` starts the real server on the default model (default
settings, prefix cache off) and sends the same batch of requests (8 at once, 64-token prompts, 32 new tokens,
greedy, EOS ignored, base model unless --adapters) by gRPC `Generate` (one response a request)
and by `GenerateStream` (one message a token), in alternating rounds (unary then stream, stream
then unary, ...). Throughput is generated tokens over the wall time of a round, and the headline
is the median of per-round ratios stream / unary, with its range. The client runs on the same
machine, as a user's would in the issue's measurement; each round also records the CPU seconds of
the server process and of the client, so the results say which side a streamed token costs.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from benchmarks.common import cpu_machine_info, cpu_seconds, machine_line, median, write_json
from server.client.local_server import LocalServer

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "stream_vs_unary.json"


async def _round(target: str, stream: bool, prompts: list[list[int]], new_tokens: int,
                 adapters: list[str], server_pid: int) -> dict[str, Any]:
    import grpc

    from server.api.gen.loraserve.v1 import inference_pb2 as pb
    from server.api.gen.loraserve.v1 import inference_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.InferenceStub(channel)

        async def one(i: int, ids: list[int]) -> int:
            req = pb.GenerateRequest(request_id=f"b{i}", adapter_id=adapters[i % len(adapters)] if adapters else "",
                                     prompt_token_ids=pb.TokenIds(ids=ids),
                                     params=pb.SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
            if not stream:
                return len((await stub.Generate(req)).token_ids)
            n = 0
            async for chunk in stub.GenerateStream(req):
                n += len(chunk.token_ids)
            return n

        t0, client0, server0 = time.perf_counter(), time.process_time(), cpu_seconds(server_pid)
        got = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        wall = time.perf_counter() - t0
        client_cpu, server_cpu = time.process_time() - client0, cpu_seconds(server_pid) - server0
    if any(n != new_tokens for n in got):
        raise RuntimeError(f"requests ended early: {got}")
    return {"mode": "stream" if stream else "unary", "wall_s": wall, "tokens": sum(got), "tok_s": sum(got) / wall,
            "client_cpu_s": client_cpu, "server_cpu_s": server_cpu}


def run(ns: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.cpu_mixed.inputs import make_adapters
    from server.core.paths import resolve_home
    from server.model.loader import resolve_model

    model_dir = resolve_model("default", resolve_home())
    rng = random.Random(ns.seed)
    prompts = [[rng.randrange(100, 40000) for _ in range(ns.prompt_len)] for _ in range(ns.requests)]
    root = Path(tempfile.mkdtemp(prefix="stream-vs-unary-"))
    # Every round repeats the same prompts: with the prefix cache on, rounds after the warm-up would time
    # cache hits instead of prefills (as in `make bench`, the cache is off).
    serve_args = ["--model", "default", "--registry", str(root / "registry"), "--no-prefix-cache",
                  "--metrics-port", "-1", *ns.serve_args]
    names: list[str] = []
    if ns.adapters:
        for i, d in enumerate(make_adapters(model_dir, root / "adapters", ns.adapters, 16, 7)):
            names.append(f"a{i}")
            serve_args += ["--adapter", f"a{i}={d}"]
    server = LocalServer(serve_args, root / "server.log")
    rounds: list[dict[str, Any]] = []
    try:
        server.wait_serving(600)
        target = server.target
        load_before = os.getloadavg()[0]
        for stream in (False, True):  # warm-up
            asyncio.run(_round(target, stream, prompts, ns.new_tokens, names, server.proc.pid))
        for r in range(ns.rounds):
            order = (False, True) if r % 2 == 0 else (True, False)
            got = {("stream" if s else "unary"): asyncio.run(_round(target, s, prompts, ns.new_tokens, names,
                                                                    server.proc.pid))
                   for s in order}
            rounds.append({"round": r, **got, "ratio": got["stream"]["tok_s"] / got["unary"]["tok_s"]})
            print(f"round {r}: unary {got['unary']['tok_s']:.1f} tok/s, stream {got['stream']['tok_s']:.1f} tok/s, "
                  f"stream/unary {rounds[-1]['ratio']:.3f}", flush=True)
    finally:
        server.stop(60)
    ratios = [r["ratio"] for r in rounds]
    machine = cpu_machine_info()
    machine["load_average_1m"] = {"before": load_before, "after": os.getloadavg()[0]}
    payload = {
        "benchmark": "stream_vs_unary", "machine": machine, "machine_line": machine_line(machine),
        "workload": {"requests": ns.requests, "prompt_len": ns.prompt_len, "new_tokens": ns.new_tokens,
                     "adapters": ns.adapters, "rounds": ns.rounds, "serve_args": ns.serve_args},
        "unary_tok_s": median([r["unary"]["tok_s"] for r in rounds]),
        "stream_tok_s": median([r["stream"]["tok_s"] for r in rounds]),
        "stream_over_unary": median(ratios), "stream_over_unary_range": [min(ratios), max(ratios)],
        # Where a streamed token's time goes: the CPU seconds of each side, per round (both share the 2 cores).
        "cpu_s_per_round": {mode: {side: median([r[mode][f"{side}_cpu_s"] for r in rounds])
                                   for side in ("server", "client")} for mode in ("unary", "stream")},
        "rounds": rounds,
    }
    print(f"stream / unary: {payload['stream_over_unary']:.3f} ({min(ratios):.3f}..{max(ratios):.3f}); "
          f"unary {payload['unary_tok_s']:.1f} tok/s, stream {payload['stream_tok_s']:.1f} tok/s; "
          f"{payload['machine_line']}")
    cpu = payload["cpu_s_per_round"]
    print("CPU s a round (median), server / client: unary {:.2f} / {:.3f}, stream {:.2f} / {:.3f}".format(
        cpu["unary"]["server"], cpu["unary"]["client"], cpu["stream"]["server"], cpu["stream"]["client"]))
    return payload


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.stream_vs_unary", description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--adapters", type=int, default=0, help="distinct random rank-16 adapters (0: the base model)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--serve-arg", dest="serve_args", action="append", default=[],
                   help="extra `loraserve serve` argument (repeatable)")
    p.add_argument("--out", default=str(RESULTS))
    ns = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    payload = run(ns)
    if ns.out:
        write_json(ns.out, payload)
        print(f"wrote {ns.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
