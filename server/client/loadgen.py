"""`loraserve bench`: a closed-loop (or Poisson open-loop) load generator against a running server.

Measures what a client sees over real gRPC (`--protocol grpc`, GenerateStream) or the
OpenAI-compatible HTTP API (`--protocol http`, streamed /v1/completions): request and token
throughput, time to first token, inter-token gaps and end-to-end latency percentiles, errors
by status code. Both protocols send the same requests (prompt, adapter, length, seed) for the
same `--seed`. Adapter choice follows Punica's mixes (identical, uniform, distinct) or a
Zipf-like skew.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

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
    gaps_s: list[float] = field(default_factory=list)  # between consecutive chunks that carried tokens


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
    itl_p50_s: float = float("nan")
    itl_p99_s: float = float("nan")
    protocol: str = "grpc"
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


@dataclass(frozen=True)
class Job:
    """One request of the workload, the same whichever protocol carries it."""

    index: int
    delay_s: float
    adapter: str
    prompt: str
    max_new_tokens: int


def workload(args: argparse.Namespace) -> list[Job]:
    """The requests of a run, drawn from `--seed` before anything is sent (so both protocols get the same)."""
    rng = random.Random(args.seed)
    adapters = [a for a in args.adapters.split(",") if a] if args.adapters else []
    if args.include_base and adapters:
        adapters = [""] + adapters
    choice = pick_adapters(adapters, args.mix, args.requests, rng)
    jobs, t = [], 0.0
    for i in range(args.requests):
        n_words = rng.randint(args.prompt_words_min, args.prompt_words_max)
        prompt = " ".join(rng.choice(WORDS) for _ in range(n_words))
        jobs.append(Job(i, t, choice[i], prompt, rng.randint(args.min_new_tokens, args.max_new_tokens)))
        if args.rate > 0:
            t += rng.expovariate(args.rate)
    return jobs


class _Timer:
    """TTFT and the gaps between token-carrying chunks of one request."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.ttft: Optional[float] = None
        self.last = 0.0
        self.gaps: list[float] = []

    def tokens(self) -> None:
        now = time.perf_counter()
        if self.ttft is None:
            self.ttft = now - self.t0
        else:
            self.gaps.append(now - self.last)
        self.last = now

    def result(self, tokens: int, adapter: str) -> Result:
        return Result(True, "OK", self.ttft or 0.0, time.perf_counter() - self.t0, tokens, adapter, self.gaps)


class GrpcSender:
    def __init__(self, args: argparse.Namespace):
        from server.api.gen.loraserve.v1 import inference_pb2 as pb
        from server.api.gen.loraserve.v1 import inference_pb2_grpc as pb_grpc
        from server.client.admin import metadata
        from server.client.channel import ClientTls, open_aio_channel
        from server.client.routing import CHANNEL_OPTIONS

        self.args, self.pb = args, pb
        self.md = metadata(args.api_key)
        self.channel = open_aio_channel(args.target, ClientTls.from_args(args), options=CHANNEL_OPTIONS)
        self.stub = pb_grpc.InferenceStub(self.channel)

    async def send(self, job: Job) -> Result:
        import grpc

        from server.client.routing import failed_call, routing_metadata

        pb = self.pb
        params = pb.SamplingParams(max_new_tokens=job.max_new_tokens, ignore_eos=True,
                                   temperature=self.args.temperature, seed=job.index)
        req = pb.GenerateRequest(request_id=f"bench-{job.index}", adapter_id=job.adapter, prompt=job.prompt,
                                 params=params)
        timer, tokens = _Timer(), 0
        try:
            async for chunk in self.stub.GenerateStream(req, metadata=self.md + routing_metadata(job.adapter),
                                                        timeout=self.args.timeout):
                if chunk.token_ids:
                    timer.tokens()
                    tokens += len(chunk.token_ids)
        except grpc.aio.AioRpcError as e:
            return Result(False, failed_call(e)[0], adapter=job.adapter)
        return timer.result(tokens, job.adapter)

    async def close(self) -> None:
        await self.channel.close()


class HttpSender:
    """Streamed /v1/completions, one SSE chunk per engine delta (as gRPC streams one message per delta)."""

    def __init__(self, args: argparse.Namespace):
        import httpx

        from server.client.channel import ClientTls

        tls = ClientTls.from_args(args)  # the same --tls-ca / --tls-cert / --tls-key as gRPC
        self.extensions = {"sni_hostname": tls.server_name} if tls.server_name else {}
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
        self.args = args
        self.client = httpx.AsyncClient(base_url=args.base_url.rstrip("/"), headers=headers, limits=limits,
                                        timeout=args.timeout, verify=tls.ssl_context() if tls.enabled else True)

    async def send(self, job: Job) -> Result:
        import httpx

        from server.client.routing import routing_headers
        from server.client.sse import sse_data

        body = {"model": job.adapter or self.args.model, "prompt": job.prompt, "max_tokens": job.max_new_tokens,
                "temperature": self.args.temperature, "seed": job.index, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        timer, tokens = _Timer(), 0
        try:
            async with self.client.stream("POST", "/v1/completions", json=body, headers=routing_headers(job.adapter),
                                          extensions=self.extensions) as r:
                if r.status_code != 200:
                    await r.aread()
                    return Result(False, f"HTTP_{r.status_code}", adapter=job.adapter)
                async for data in sse_data(r):
                    if not data.startswith("{"):
                        continue
                    chunk: dict[str, Any] = json.loads(data)
                    if "error" in chunk:
                        return Result(False, f"HTTP_{chunk['error'].get('code')}", adapter=job.adapter)
                    if chunk["choices"]:
                        timer.tokens()
                    elif chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
        except httpx.HTTPError as e:
            return Result(False, type(e).__name__, adapter=job.adapter)
        return timer.result(tokens, job.adapter)

    async def close(self) -> None:
        await self.client.aclose()


async def run(args: argparse.Namespace, jobs: Optional[list[Job]] = None) -> Summary:
    jobs = workload(args) if jobs is None else jobs
    sender: Any = HttpSender(args) if args.protocol == "http" else GrpcSender(args)
    sem = asyncio.Semaphore(args.concurrency)
    results: list[Result] = []

    async def worker(job: Job) -> None:
        await asyncio.sleep(job.delay_s)
        async with sem:
            results.append(await sender.send(job))

    try:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(j) for j in jobs))
        seconds = time.perf_counter() - t0
    finally:
        await sender.close()
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
        itl_p50_s=_pct([g for r in ok for g in r.gaps_s], 50), itl_p99_s=_pct([g for r in ok for g in r.gaps_s], 99),
        protocol=args.protocol, config={k: v for k, v in vars(args).items() if k != "api_key"})


def build_parser() -> argparse.ArgumentParser:
    from server.client.admin import add_connection_flags

    p = argparse.ArgumentParser(prog="loraserve bench", description=__doc__.splitlines()[0])
    add_connection_flags(p)
    p.add_argument("--protocol", choices=("grpc", "http"), default="grpc",
                   help="grpc: GenerateStream on --target; http: streamed /v1/completions on --base-url")
    p.add_argument("--base-url", default=os.environ.get("LORASERVE_HTTP_URL", "http://127.0.0.1:50080"),
                   help="the HTTP API's root for --protocol http (https://... against a TLS server; the --tls "
                        "flags apply) [env LORASERVE_HTTP_URL, default http://127.0.0.1:50080]")
    p.add_argument("--model", default="default", help="the base model's id over HTTP (requests without an adapter)")
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


def _num(v: float, digits: int) -> str:
    """A figure for the table; '-' where there was no sample to take it from."""
    return "-" if math.isnan(v) else f"{v:.{digits}f}"


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.requests < 1 or args.concurrency < 1:
        print("error: --requests and --concurrency must be >= 1", file=sys.stderr)
        return 2
    s = asyncio.run(run(args))
    rows = [("protocol", s.protocol), ("requests ok / sent", f"{s.ok} / {s.requests}"), ("errors", json.dumps(s.errors) if s.errors else "none"),
            ("wall seconds", f"{s.seconds:.2f}"), ("requests/s", f"{s.requests_per_s:.2f}"),
            ("generated tokens/s", f"{s.generated_tokens_per_s:.1f}"),
            ("TTFT p50 / p99 (s)", f"{_num(s.ttft_p50_s, 3)} / {_num(s.ttft_p99_s, 3)}"),
            ("inter-token p50 / p99 (s)", f"{_num(s.itl_p50_s, 4)} / {_num(s.itl_p99_s, 4)}"),
            ("latency p50 / p99 (s)", f"{_num(s.latency_p50_s, 3)} / {_num(s.latency_p99_s, 3)}")]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        # A percentile with no sample is null, not NaN (which is not JSON: jq and strict parsers refuse it).
        summary = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(s).items()}
        args.output.write_text(json.dumps(summary, indent=2, default=str, allow_nan=False))
    return 0 if s.ok == s.requests else 1
