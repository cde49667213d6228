"""`python -m benchmarks.soak`: a bounded soak of the real server under mixed traffic and faults.

It starts `loraserve serve` with a tenants file (3 tenants, quotas), registers 40 adapters over 8 device
slots and a small host cache (so both tiers churn), then for `--duration` seconds runs closed-loop
workers: normal requests (greedy and sampled, streamed and unary, prompts and chat; a fifth over the
OpenAI-compatible HTTP API), 10% streams cancelled after their first chunk, 5% requests whose deadline
expires, 5% bad requests of every kind in docs/api.md's status tables (over gRPC and HTTP); beside them
a new version of a hot adapter every 2 s, initech bursting past its concurrency quota and globex past its
adapter quota. Then it checks, and writes to JSON:

- 0 unexpected status codes (each kind allows the statuses its table gives it);
- every OK greedy answer equals the same request (same adapter version) served alone afterwards;
- KV blocks in use 0, no device slot held by a request, requests running and waiting 0;
- the server's resident memory after warm-up grows by less than `--rss-growth-bound-mb`;
- no internal error or traceback in the server log;
and reports p50/p99 latency and time to first token per tenant. Exit code 0 when every check passes.

`make test` (CI) runs 30 s of it on a tiny random Llama (tests/benchmarks/test_soak.py; `make reliability`
prints its figures); docs/reliability.md quotes a 20-minute run on the same model (`make soak` runs one on the
default model).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import secrets
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Optional

WEIGHTS = (("normal", 0.80), ("cancelled", 0.10), ("deadline", 0.05), ("bad", 0.05))


def _pct(xs: list[float], q: float) -> Optional[float]:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))], 4)


class RssSampler:
    """The server's resident memory every `every` seconds, in a thread."""

    def __init__(self, server: Any, every: float = 2.0):
        self.server, self.every = server, every
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), self.server.rss_mb()))
            self._stop.wait(self.every)

    def start(self) -> "RssSampler":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def summary(self, warm_until: float, bound_mb: float) -> dict[str, Any]:
        before = [r for t, r in self.samples if t <= warm_until]
        after = [r for t, r in self.samples if t > warm_until]
        base = statistics.median(before[-5:]) if before else (after[0] if after else 0.0)
        peak = max(after, default=base)
        return {"after_warmup_mb": round(base, 1), "peak_after_warmup_mb": round(peak, 1),
                "end_mb": round(self.samples[-1][1], 1) if self.samples else None,
                "growth_mb": round(peak - base, 1), "bound_mb": bound_mb, "samples": len(self.samples)}


async def _load(traffic: Any, args: argparse.Namespace, rng: random.Random) -> tuple[list[Any], int]:
    """Workers and the periodic tasks for `args.duration` seconds: every outcome in completion order, and how
    many workers were still waiting on the server `args.hang_after` seconds after the end."""
    outcomes: list[Any] = []
    end = time.monotonic() + args.duration
    kinds, weights = zip(*WEIGHTS)

    async def worker() -> None:
        while time.monotonic() < end:
            kind = rng.choices(kinds, weights)[0]
            outcomes.append(await getattr(traffic, kind)())

    async def every(seconds: float, action: Any) -> None:
        while True:
            await asyncio.sleep(seconds)
            if time.monotonic() >= end:
                return
            got = await action()
            outcomes.extend(got if isinstance(got, list) else [got])

    hot = iter(range(1 << 30))
    from benchmarks.soak_traffic import HOT

    # Bad requests also come on a timer, so even a short run sends every kind in the catalogue at least once.
    bad_every = min(args.duration / (1.5 * len(traffic.bad_catalogue())), 10.0)
    periodic = [every(args.hot_swap_every, lambda: traffic.hot_swap(HOT[next(hot) % len(HOT)])),
                every(bad_every, traffic.bad),
                every(args.duration / 6 if args.duration < 120 else 20.0, traffic.burst),
                every(args.duration / 4 if args.duration < 120 else 30.0, traffic.over_name_quota)]
    tasks = [asyncio.ensure_future(t) for t in periodic]
    workers = [asyncio.ensure_future(worker()) for _ in range(args.concurrency)]
    # A server that stops answering must fail the soak, not hang it: calls still open this long after the end
    # are cancelled and the run is marked hung.
    done, pending = await asyncio.wait(workers, timeout=end - time.monotonic() + args.hang_after)
    for t in [*tasks, *pending]:
        t.cancel()
    await asyncio.gather(*tasks, *pending, return_exceptions=True)
    return outcomes, len(pending)


async def _replay(traffic: Any, outcomes: list[Any], limit: int, rng: random.Random) -> dict[str, Any]:
    """Each distinct OK greedy request again, alone, on the version that served it: same tokens?"""
    from benchmarks.soak_traffic import Outcome
    from server.api.gen.loraserve.v1 import inference_pb2 as ipb

    groups: dict[tuple, list[Any]] = defaultdict(list)
    for o in outcomes:
        if o.greedy_ok:
            req = o.request
            adapter = f"{o.adapter_id}@{o.version}" if o.adapter_id else ""
            groups[(o.tenant, adapter, req.SerializeToString(deterministic=True))].append(o)
    keys = list(groups)
    if limit and len(keys) > limit:
        keys = rng.sample(keys, limit)
    mismatches, checked, checked_http, t0 = [], 0, 0, time.monotonic()
    for tenant, adapter, raw in keys:
        req = ipb.GenerateRequest.FromString(raw)
        req.adapter_id = adapter
        alone = await traffic.generate(Outcome("replay", tenant, ()), req, stream=False)
        for o in groups[(tenant, adapter, raw)]:
            checked += 1
            checked_http += bool(o.allowed_http)
            if alone.code.name != "OK" or alone.token_ids != o.token_ids:
                mismatches.append({"tenant": tenant, "adapter": adapter or "base", "prompt": req.prompt or "(chat)",
                                   "served": o.token_ids, "alone": alone.token_ids, "alone_status": alone.code.name})
    return {"distinct_requests_replayed": len(keys), "distinct_requests_total": len(groups),
            "answers_checked": checked, "answers_checked_served_over_http": checked_http,
            "mismatches": len(mismatches), "mismatch_examples": mismatches[:10],
            "replay_seconds": round(time.monotonic() - t0, 1)}


async def _settle(server: Any, timeout: float = 60.0) -> dict[str, float]:
    """Engine state once the load is gone (in-flight cancellations finish within moments)."""
    names = ("loraserve_kv_blocks_used", "loraserve_requests_running", "loraserve_requests_waiting",
             "loraserve_adapter_slots_in_use")
    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics()
        state = {n: m.get(n, -1.0) for n in names}
        if all(v == 0 for v in state.values()) or time.monotonic() > deadline:
            return state
        await asyncio.sleep(0.5)


def _latency(outcomes: list[Any]) -> dict[str, Any]:
    out = {}
    for tenant in sorted({o.tenant for o in outcomes}):
        ok = [o for o in outcomes if o.tenant == tenant and o.kind == "normal" and o.code.name == "OK"]
        lat = [o.latency_s for o in ok]
        ttft = [o.ttft_s for o in ok if o.ttft_s is not None]
        out[tenant] = {"ok_requests": len(ok), "p50_s": _pct(lat, 50), "p99_s": _pct(lat, 99),
                       "ttft_p50_s": _pct(ttft, 50), "ttft_p99_s": _pct(ttft, 99),
                       "tokens": sum(len(o.token_ids) for o in ok)}
    return out


def _counts(outcomes: list[Any]) -> dict[str, dict[str, int]]:
    by: dict[str, Counter] = defaultdict(Counter)
    for o in outcomes:
        kind = "bad" if o.kind.startswith("bad: ") else o.kind
        by[kind][o.status] += 1
    return {k: dict(v) for k, v in sorted(by.items())}


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    import grpc

    from benchmarks.common import cpu_machine_info
    from server.client.local_server import LocalServer
    from benchmarks.soak_traffic import TENANT_ADAPTERS, Traffic, make_lora, tenants_toml
    from server.api.gen.loraserve.v1 import adapters_pb2 as apb
    from server.api.gen.loraserve.v1 import inference_pb2 as ipb
    from server.api.gen.loraserve.v1 import inference_pb2_grpc as ipb_grpc
    from server.api.http.convert import base_model_id
    from server.model.config import ModelConfig
    from server.core.paths import resolve_home
    from server.model.loader import resolve_model

    rng = random.Random(args.seed)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="loraserve-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    keys = {t: secrets.token_urlsafe(24) for t in TENANT_ADAPTERS}
    (work / "tenants.toml").write_text(tenants_toml(keys))
    model_dir = resolve_model(args.model, resolve_home(args.home or None))
    mc = ModelConfig.from_file(Path(model_dir) / "config.json")
    host_cache_bytes = args.host_cache_bytes or 10 * len(make_lora(mc, 4, ("q", "v"), seed=0)[1])
    server_args = ["--model", args.model, "--quantize", args.quantize, "--dtype", args.dtype,
                   "--tenants", str(work / "tenants.toml"), "--registry", str(work / "registry"),
                   "--max-adapters-on-device", "8", "--host-cache-bytes", str(host_cache_bytes),
                   "--max-batch-size", str(args.max_batch_size), "--cpu-threads", str(args.cpu_threads)]
    server = LocalServer(server_args, work / "server.log", env={"LORASERVE_HOME": args.home} if args.home else None)
    report: dict[str, Any] = {"config": {**vars(args), "host_cache_bytes": host_cache_bytes},
                              "machine": cpu_machine_info(), "workdir": str(work)}
    try:
        server.wait_serving()
        async with grpc.aio.insecure_channel(server.target) as channel:
            info = await ipb_grpc.InferenceStub(channel).ModelInfo(
                ipb.ModelInfoRequest(), metadata=[("authorization", f"Bearer {keys['acme']}")], timeout=60)
            traffic = Traffic(channel, keys, mc, info.context_length, rng, f"http://127.0.0.1:{server.http_port}",
                              base_model_id(args.model))
            t0 = time.monotonic()
            await traffic.register_all()
            report["setup_seconds"] = round(time.monotonic() - t0, 1)
            sampler = RssSampler(server).start()
            started = time.monotonic()
            warm_until = started + args.warmup
            outcomes, hung = await _load(traffic, args, rng)
            load_seconds = time.monotonic() - started
            sampler.stop()
            settled = await _settle(server)
            if hung:  # replaying against a server that stopped answering would only wait
                replay = {"skipped": f"{hung} workers hung", "mismatches": 0, "answers_checked": 0}
            else:
                replay = await _replay(traffic, outcomes, args.replay_max, rng)
            try:  # the operator pin taken at set-up, released: nothing may hold a slot afterwards
                unpinned: Any = (await traffic.adapters.UnloadAdapter(
                    apb.UnloadAdapterRequest(adapter_id="acme-00"), metadata=traffic.md("acme"),
                    timeout=60)).was_on_device
            except grpc.aio.AioRpcError as e:
                unpinned = e.code().name
            after_replay = await _settle(server)
            await traffic.close()
        metrics = server.metrics()
    finally:
        code = server.stop()
    log = server.log_path.read_text()
    unexpected = [o for o in outcomes if not o.expected]
    rss = sampler.summary(warm_until, args.rss_growth_bound_mb)
    report.update({
        "model": {"name": args.model, "layers": mc.num_layers, "hidden": mc.hidden_size, "context": info.context_length,
                  "quantize": args.quantize, "dtype": args.dtype},
        "load_seconds": round(load_seconds, 1), "requests": len(outcomes),
        "requests_over_http": sum(1 for o in outcomes if o.allowed_http),
        "share_by_kind": {k: round(sum(v.values()) / max(len(outcomes), 1), 3) for k, v in _counts(outcomes).items()},
        "statuses_by_kind": _counts(outcomes),
        "unexpected": len(unexpected),
        "unexpected_examples": [{"kind": o.kind, "tenant": o.tenant, "status": o.status, "details": o.details[:300],
                                 "allowed": [c.name for c in o.allowed] + [f"HTTP_{h}" for h in o.allowed_http],
                                 "must_say": o.must_say}
                                for o in unexpected[:20]],
        "hot_swaps": {"versions_registered": sum(1 for o in outcomes if o.kind == "hot_swap" and o.code.name == "OK"),
                      "latest": traffic.hot_versions,
                      "register_p50_s": _pct(traffic.registrations, 50),
                      "register_p99_s": _pct(traffic.registrations, 99)},
        "quota_refusals": sum(1 for o in outcomes if o.status in ("RESOURCE_EXHAUSTED", "HTTP_429")
                              and o.kind in ("quota_burst", "quota_names", "normal")),
        "bad_kinds_sent": min(traffic.bad_index, len(traffic.bad_catalogue())),
        "greedy_replay": replay,
        "end_state": {"after_load": settled, "after_replay_and_unpin": after_replay,
                      "unpinned_was_on_device": unpinned},
        "rss": rss,
        "latency": _latency(outcomes),
        "server_counters": {k: v for k, v in metrics.items() if any(s in k for s in (
            "auth_failures_total", "stalled_streams_total", "preemptions_total", "adapter_loads_total",
            "adapter_evictions_total", "adapter_host_evictions_total", "adapter_host_cache_misses_total",
            "adapter_disk_loads_total",
            "adapter_registrations_total", "adapter_rejections_total"))},
        "server_exit_code": code,
    })
    internal = log.count("internal error") + log.count("Traceback")
    report["checks"] = {
        "no_hung_calls": hung == 0,
        "no_unexpected_status": not unexpected,
        "greedy_answers_equal_alone": replay["mismatches"] == 0 and replay["answers_checked"] > 0,
        "engine_state_clean": all(v == 0 for v in settled.values()) and all(v == 0 for v in after_replay.values()),
        "rss_growth_within_bound": rss["growth_mb"] < args.rss_growth_bound_mb,
        "no_internal_errors": internal == 0,
        "every_bad_kind_sent": traffic.bad_index >= len(traffic.bad_catalogue()),
        "quotas_hit": report["quota_refusals"] > 0,
        "clean_shutdown": code == 0,
    }
    report["passed"] = all(report["checks"].values())
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load (the checks follow)")
    p.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct) or a model directory")
    p.add_argument("--quantize", default="none", choices=("none", "int8", "int4"),
                   help="none: greedy answers are batch-independent, so the replay check is exact")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--cpu-threads", type=int, default=0, help="engine threads (0 = the server's default)")
    p.add_argument("--concurrency", type=int, default=6, help="closed-loop workers")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--host-cache-bytes", type=int, default=0,
                   help="host-memory adapter tier (0: room for about 10 of the 40 adapters, so it churns for any model)")
    p.add_argument("--hot-swap-every", type=float, default=2.0, help="seconds between new hot-adapter versions")
    p.add_argument("--warmup", type=float, default=None, help="seconds before memory is baselined "
                                                              "(default: a quarter of --duration, at most 120)")
    p.add_argument("--rss-growth-bound-mb", type=float, default=64.0)
    p.add_argument("--hang-after", type=float, default=120.0,
                   help="seconds after the end a call may still be open before the run counts as hung")
    p.add_argument("--replay-max", type=int, default=400,
                   help="distinct greedy requests replayed, drawn at random (0 = all; each is served alone, so a long "
                        "run's thousands would take longer than the run)")
    p.add_argument("--seed", type=int, default=15)
    p.add_argument("--home", default="", help="LORASERVE_HOME for the server (model cache)")
    p.add_argument("--workdir", default="", help="registry, tenants file and server.log (default: a temp dir)")
    p.add_argument("--output", type=Path, default=None, help="write the report as JSON here")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    # SIGTERM (timeout, CI) unwinds like Ctrl-C, so the server process is stopped, not orphaned.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.warmup is None:
        args.warmup = min(args.duration / 4, 120.0)
    report = asyncio.run(soak(args))
    if args.output:
        from benchmarks.common import write_json

        write_json(args.output, report)
    print(json.dumps({k: report[k] for k in ("requests", "statuses_by_kind", "unexpected", "greedy_replay", "end_state",
                                             "rss", "latency", "checks", "passed")}, indent=2, default=str))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
