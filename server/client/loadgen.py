"""`loraserve bench`: a closed-loop (or Poisson open-loop) load generator against a running server.

Measures what a client sees over real gRPC: request and token throughput, time to
first token and end-to-end latency percentiles, errors by status code. Adapter
choice follows Punica's mixes (identical, uniform, distinct) or a Zipf-like skew.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly judge "
         "boxing matches under pale blue lights near an old river bank").split()


@dataclass
class Result:
    ok: bool
    code: str
    ttft_s: float = 0.0
    latency_s: float = 0.0
    completion_tokens: int = 0
    adapter: str = ""


@dataclass
class Summary:
    requests: int
    ok: int
    errors: dict[str, int]
    seconds: float
    requests_per_s: float
    generated_tokens_per_s: float
    ttft_p50_s: float
    ttft_p99_s: float
    latency_p50_s: float
    latency_p99_s: float
    config: dict = field(default_factory=dict)


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def pick_adapters(adapters: list[str], mix: str, n: int, rng: random.Random) -> list[str]:
    """One adapter id per request ('' = base). Skewed draws rank k with weight 1/k (Zipf, s=1)."""
    if not adapters:
        return [""] * n
    if mix == "identical":
        return [adapters[0]] * n
    if mix == "distinct":
        return [adapters[i % len(adapters)] for i in range(n)]
    if mix == "uniform":
        return [rng.choice(adapters) for _ in range(n)]
    weights = [1.0 / (k + 1) for k in range(len(adapters))]
    return rng.choices(adapters, weights=weights, k=n)


async def _one(stub, pb, req, md, timeout: float) -> Result:
    import grpc

    t0 = time.perf_counter()
    ttft = None
    tokens = 0
    try:
        async for chunk in stub.GenerateStream(req, metadata=md, timeout=timeout):
            if chunk.token_ids and ttft is None:
                ttft = time.perf_counter() - t0
            tokens += len(chunk.token_ids)
    except grpc.aio.AioRpcError as e:
        return Result(False, e.code().name, adapter=req.adapter_id)
    return Result(True, "OK", ttft or 0.0, time.perf_counter() - t0, tokens, req.adapter_id)


async def run(args: argparse.Namespace) -> Summary:
    import grpc

    from server.client.admin import metadata
    from server.client.routing import CHANNEL_OPTIONS, routing_metadata
    from server.api.gen.loraserve.v1 import inference_pb2 as pb
    from server.api.gen.loraserve.v1 import inference_pb2_grpc as pb_grpc

    rng = random.Random(args.seed)
    adapters = [a for a in args.adapters.split(",") if a] if args.adapters else []
    if args.include_base and adapters:
        adapters = [""] + adapters
    choice = pick_adapters(adapters, args.mix, args.requests, rng)
    md = metadata(args.api_key)
    sem = asyncio.Semaphore(args.concurrency)
    results: list[Result] = []
    async with grpc.aio.insecure_channel(args.target, options=CHANNEL_OPTIONS) as channel:
        stub = pb_grpc.InferenceStub(channel)

        async def worker(i: int, delay: float) -> None:
            await asyncio.sleep(delay)
            async with sem:
                n_words = rng.randint(args.prompt_words_min, args.prompt_words_max)
                prompt = " ".join(rng.choice(WORDS) for _ in range(n_words))
                params = pb.SamplingParams(max_new_tokens=rng.randint(args.min_new_tokens, args.max_new_tokens),
                                           ignore_eos=True, temperature=args.temperature, seed=i)
                req = pb.GenerateRequest(request_id=f"bench-{i}", adapter_id=choice[i], prompt=prompt, params=params)
                results.append(await _one(stub, pb, req, md + routing_metadata(choice[i]), args.timeout))

        delays, t = [], 0.0
        for _ in range(args.requests):
            delays.append(t)
            if args.rate > 0:
                t += rng.expovariate(args.rate)
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(i, d) for i, d in enumerate(delays)))
        seconds = time.perf_counter() - t0
    ok = [r for r in results if r.ok]
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            errors[r.code] = errors.get(r.code, 0) + 1
    return Summary(
        requests=len(results), ok=len(ok), errors=errors, seconds=seconds,
        requests_per_s=len(ok) / seconds, generated_tokens_per_s=sum(r.completion_tokens for r in ok) / seconds,
        ttft_p50_s=_pct([r.ttft_s for r in ok], 50), ttft_p99_s=_pct([r.ttft_s for r in ok], 99),
        latency_p50_s=_pct([r.latency_s for r in ok], 50), latency_p99_s=_pct([r.latency_s for r in ok], 99),
        config={k: v for k, v in vars(args).items() if k != "api_key"})


def build_parser() -> argparse.ArgumentParser:
    from server.client.admin import add_connection_flags

    p = argparse.ArgumentParser(prog="loraserve bench", description=__doc__.splitlines()[0])
    add_connection_flags(p)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight at most")
    p.add_argument("--rate", type=float, default=0.0, help="Poisson arrivals per second (0 = all at once)")
    p.add_argument("--adapters", default="", help="comma-separated adapter ids (empty = base only)")
    p.add_argument("--include-base", action="store_true", help="also send base-model requests")
    p.add_argument("--mix", choices=("identical", "uniform", "distinct", "skewed"), default="uniform")
    p.add_argument("--prompt-words-min", type=int, default=8)
    p.add_argument("--prompt-words-max", type=int, default=64)
    p.add_argument("--min-new-tokens", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, default=None, help="write the summary as JSON here")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.requests < 1 or args.concurrency < 1:
        print("error: --requests and --concurrency must be >= 1", file=sys.stderr)
        return 2
    s = asyncio.run(run(args))
    rows = [("requests ok / sent", f"{s.ok} / {s.requests}"), ("errors", json.dumps(s.errors) if s.errors else "none"),
            ("wall seconds", f"{s.seconds:.2f}"), ("requests/s", f"{s.requests_per_s:.2f}"),
            ("generated tokens/s", f"{s.generated_tokens_per_s:.1f}"),
            ("TTFT p50 / p99 (s)", f"{s.ttft_p50_s:.3f} / {s.ttft_p99_s:.3f}"),
            ("latency p50 / p99 (s)", f"{s.latency_p50_s:.3f} / {s.latency_p99_s:.3f}")]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(asdict(s), indent=2, default=str))
    return 0 if s.ok == s.requests else 1
