"""loraserve against llama.cpp's llama-server on `make bench`'s workload, side by side over the same HTTP client.

`python -m benchmarks.llama_server` (or `make bench-llama`) needs llama-server built by `make llama-server`
(it says so and measures nothing otherwise). It converts the default model (SmolLM2-135M-Instruct) to a Q8_0
GGUF and `make bench`'s adapters (8 seeded random PEFT rank-16 adapters over all seven targets, the very files
loraserve serves) to GGUF LoRAs, starts both servers (llama-server: every adapter loaded at scale 0, none
applied unless a request asks; loraserve: the real `loraserve serve` with its defaults and the same adapters
registered), and drives both over the OpenAI-style POST /v1/completions with one client: 8 concurrent requests a round,
each 64 prompt token ids (the same ids to both), 32 new tokens, greedy, EOS ignored. Rows: the base model;
8 distinct adapters (request i on adapter i); one adapter x 8; the base model streamed (SSE). Every round runs
every row on both systems, the order alternating; tokens/s = generated tokens / the round's wall time; the
ratio loraserve / llama-server is the median of per-round ratios, with its range. Every round's prompts are
new (neither server can reuse a cached prefix); each request must come back with 64 prompt and 32 generated
tokens, or the run stops. Writes benchmarks/results/llama_server.json.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from benchmarks.common import cpu_machine_info, cpu_seconds, machine_line, median, print_table, write_json
from benchmarks.llama_cpp import LORA_OUTTYPE, MODEL_OUTTYPE, LlamaCpp, LlamaServer, NotBuilt
from server.client.sse import sse_data
from server.fleet.ports import free_port

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "llama_server.json"
WORKDIR = REPO / "build" / "llama.cpp" / "bench"  # adapters and server logs, kept between runs
SYSTEMS = ("llama-server", "loraserve")
GOAL_RATIO = 1.0           # loraserve ahead of llama-server on every row (issue 16)
GOAL_DISTINCT_RATIO = 2.0  # and at least 2x on 8 distinct adapters


@dataclass(frozen=True)
class Row:
    name: str
    adapters: str   # "none", "distinct" (request i on adapter i), "one" (all on adapter 0)
    stream: bool = False

    def adapter_of(self, request: int) -> Optional[int]:
        return None if self.adapters == "none" else (request if self.adapters == "distinct" else 0)


ROWS = (Row("base", "none"), Row("8 distinct adapters", "distinct"), Row("one adapter x 8", "one"),
        Row("base, streamed", "none", stream=True))


@dataclass
class Target:
    """One server as the client sees it: where it is and how a request names its adapter."""

    system: str
    base_url: str
    pid: int
    adapter_names: Sequence[str] = ()

    def body(self, prompt: list[int], adapter: Optional[int], new_tokens: int, stream: bool) -> dict[str, Any]:
        body: dict[str, Any] = {"prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True,
                                "seed": 0, "stream": stream}
        if stream:
            body["stream_options"] = {"include_usage": True}
        if self.system == "loraserve":
            body["model"] = "default" if adapter is None else self.adapter_names[adapter]
        elif adapter is not None:  # llama-server: the per-request adapter list (id -> scale; the rest at 0)
            body["lora"] = [{"id": adapter, "scale": 1.0}]
        return body


async def _one(client: Any, target: Target, body: dict[str, Any]) -> dict[str, Any]:
    """One completion; returns its prompt/completion token counts, text and timings."""
    t0 = time.perf_counter()
    if not body["stream"]:
        r = await client.post(f"{target.base_url}/v1/completions", json=body)
        if r.status_code != 200:
            raise RuntimeError(f"{target.system}: HTTP {r.status_code}: {r.text[:500]}")
        out = r.json()
        usage = out.get("usage") or {}
        return {"prompt_tokens": usage.get("prompt_tokens"), "completion_tokens": usage.get("completion_tokens"),
                "text": out["choices"][0]["text"], "latency_s": time.perf_counter() - t0, "chunks": 1}
    text, chunks, ttft, usage = [], 0, None, {}
    async with client.stream("POST", f"{target.base_url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{target.system}: HTTP {r.status_code}: {(await r.aread())[:500]!r}")
        async for data in sse_data(r):
            if not data.startswith("{"):
                continue
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(f"{target.system}: stream error {chunk['error']}")
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices") or []:
                if choice.get("text"):
                    chunks += 1
                    ttft = ttft if ttft is not None else time.perf_counter() - t0
                    text.append(choice["text"])
    return {"prompt_tokens": usage.get("prompt_tokens"), "completion_tokens": usage.get("completion_tokens"),
            "text": "".join(text), "latency_s": time.perf_counter() - t0, "ttft_s": ttft, "chunks": chunks}


async def _batch(client: Any, target: Target, row: Row, prompts: list[list[int]], new_tokens: int
                 ) -> tuple[float, list[dict[str, Any]]]:
    bodies = [target.body(p, row.adapter_of(i), new_tokens, row.stream) for i, p in enumerate(prompts)]
    t0 = time.perf_counter()
    results = await asyncio.gather(*(_one(client, target, b) for b in bodies))
    return time.perf_counter() - t0, list(results)


def run_batch(loop: asyncio.AbstractEventLoop, client: Any, target: Target, others: Sequence[Target], row: Row,
              prompts: list[list[int]], new_tokens: int) -> dict[str, Any]:
    """One round of one row on one system: wall time, tokens, and what each server process burnt meanwhile."""
    cpu0 = {t.system: cpu_seconds(t.pid) for t in (target, *others)}
    wall, results = loop.run_until_complete(_batch(client, target, row, prompts, new_tokens))
    cpu = {t.system: round(cpu_seconds(t.pid) - cpu0[t.system], 3) for t in (target, *others)}
    generated = sum(r["completion_tokens"] or 0 for r in results)
    bad = [(i, r["prompt_tokens"], r["completion_tokens"]) for i, r in enumerate(results)
           if r["prompt_tokens"] != len(prompts[i]) or r["completion_tokens"] != new_tokens]
    if bad:
        raise RuntimeError(f"{target.system}, {row.name}: requests (index, prompt tokens, generated tokens) "
                           f"{bad} are not {len(prompts[0])} prompt + {new_tokens} generated tokens")
    out = {"wall_s": round(wall, 4), "generated_tokens": generated, "tokens_per_s": generated / wall,
           "cpu_s": cpu, "latency_max_s": round(max(r["latency_s"] for r in results), 4)}
    if row.stream:
        out["ttft_p50_s"] = median([r["ttft_s"] for r in results])
        out["chunks"] = sum(r["chunks"] for r in results)
    return out


def prompts_for(seed: int, requests: int, prompt_len: int, vocab: int, specials: Sequence[int]) -> list[list[int]]:
    """`make bench`'s prompt maker with its own seed per round and row, so no prompt repeats."""
    from benchmarks.cpu_mixed.config import BenchConfig
    from benchmarks.cpu_mixed.inputs import make_prompts

    return make_prompts(BenchConfig(requests=requests, prompt_len=prompt_len, seed=seed), vocab, specials)


def llama_server_args(model_gguf: Path, lora_ggufs: Sequence[Path], ns: argparse.Namespace) -> list[str]:
    """llama-server's flags. Two differ from what the issue first named, for reasons of this llama.cpp:
    - adapters load with `--lora-scaled FILE:0`, not `--lora FILE --lora-init-without-apply`: the latter only
      skips applying them at start-up; the server's default adapter list keeps scale 1, so every request that
      sends no `lora` field (the base rows) would run all adapters at once. At scale 0 none is applied (and a
      zero-scale adapter is skipped, not computed); a request's `lora: [{id, scale: 1}]` turns its one on.
    - `--no-repack`: on a CPU with AMX, the AMX buffer type llama.cpp picks for Q8_0 weights crashes
      (SIGSEGV in ggml_backend_amx_mul_mat at the start-up warm-up). For Q8_0 on x86 AMX is the only repacked
      layout, so without AMX this changes nothing; with it, Q8_0 runs the AVX-512/AVX2 dot products.
    """
    # llama.cpp pads each slot's context to a multiple of 256; ask for that, room for prompt + answer per slot.
    ctx = ns.requests * ((ns.prompt_len + ns.new_tokens + 255) // 256 * 256)
    args = ["-m", str(model_gguf), "-np", str(ns.requests), "-c", str(ctx), "-t", str(ns.threads),
            "-tb", str(ns.threads), "--no-repack"]
    for f in lora_ggufs:
        args += ["--lora-scaled", f"{f}:0"]
    return args + list(ns.llama_args)


def sanity(loop: asyncio.AbstractEventLoop, clients: dict[str, Any], targets: dict[str, Target],
           prompt: list[int], new_tokens: int) -> dict[str, Any]:
    """Greedy texts for one prompt on the base and on adapter 0: an adapter must change each system's output;
    how far the two systems agree is recorded (int8 and Q8_0 round differently, so they need not)."""
    out: dict[str, Any] = {}
    for s, t in targets.items():
        texts = {}
        for label, adapter in (("base", None), ("adapter0", 0)):
            res = loop.run_until_complete(_one(clients[s], t, t.body(prompt, adapter, new_tokens, False)))
            texts[label] = res["text"]
        out[s] = texts
        if texts["base"] == texts["adapter0"]:
            raise RuntimeError(f"{s}: adapter 0 left the greedy output unchanged; the adapter is not applied")
    for label in ("base", "adapter0"):
        a, b = out[SYSTEMS[0]][label], out[SYSTEMS[1]][label]
        out[f"{label}_common_prefix_chars"] = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y),
                                                   min(len(a), len(b)))
    return out


def run(ns: argparse.Namespace) -> dict[str, Any]:
    import httpx

    from benchmarks.cpu_mixed.inputs import make_adapters
    from benchmarks.cpu_mixed.systems import model_shape
    from server.client.local_server import LocalServer
    from server.core.engine_config import EngineConfig
    from server.core.paths import resolve_home
    from server.model.config import ModelConfig
    from server.model.loader import load_tokenizer, resolve_model

    build = LlamaCpp()
    build.check()
    model_dir = resolve_model("default", resolve_home())
    mc = ModelConfig.from_file(model_dir / "config.json")
    tok = load_tokenizer(model_dir)
    specials = sorted(set(getattr(tok, "all_special_ids", []) or []) | set(mc.eos_token_ids))
    workdir = Path(ns.workdir) if ns.workdir else WORKDIR
    t0 = time.perf_counter()
    adapter_dirs = make_adapters(model_dir, workdir / f"adapters-r{ns.rank}-s{ns.seed}", ns.requests, ns.rank,
                                 ns.seed)
    model_gguf = build.convert_model(model_dir)
    lora_ggufs = [build.convert_adapter(d, model_dir) for d in adapter_dirs]
    print(f"inputs ready in {time.perf_counter() - t0:.0f} s: {model_gguf.name}, {len(lora_ggufs)} GGUF LoRAs",
          flush=True)

    names = [f"a{i}" for i in range(len(adapter_dirs))]
    registry = tempfile.TemporaryDirectory(prefix="llama-bench-registry-")  # a fresh one: every adapter is @1
    serve_args = ["--model", "default", "--registry", registry.name, *ns.serve_args]
    for name, d in zip(names, adapter_dirs):
        serve_args += ["--adapter", f"{name}={d}"]
    llama_args = llama_server_args(model_gguf, lora_ggufs, ns)
    llama = LlamaServer(build, llama_args, workdir, free_port())
    lora = LocalServer(serve_args, workdir / "loraserve" / "server.log")
    loop = asyncio.new_event_loop()
    limits = httpx.Limits(max_connections=ns.requests, max_keepalive_connections=ns.requests)
    clients = {s: httpx.AsyncClient(limits=limits, timeout=600) for s in SYSTEMS}
    rounds: list[dict[str, Any]] = []
    load_before = os.getloadavg()
    try:
        llama.wait_ready()
        lora.wait_serving()
        loaded = llama.lora_adapters()
        if len(loaded) != len(lora_ggufs) or any(a.get("scale", 0) != 0 for a in loaded):
            raise RuntimeError(f"llama-server's adapters are not {len(lora_ggufs)} loaded at scale 0: {loaded}")
        targets = {"llama-server": Target("llama-server", llama.base_url, llama.proc.pid),
                   "loraserve": Target("loraserve", f"http://127.0.0.1:{lora.http_port}", lora.proc.pid, names)}
        warm = prompts_for(ns.seed + 999_983, ns.requests, ns.prompt_len, mc.vocab_size, specials)
        checks = sanity(loop, clients, targets, warm[0], ns.new_tokens)
        for s in SYSTEMS:  # warm-up: every row once on each system (adapters loaded, code paths warm)
            for row in ROWS:
                run_batch(loop, clients[s], targets[s], [], row, warm, ns.new_tokens)
        for r in range(ns.rounds):
            rec: dict[str, Any] = {"round": r, "load_average": os.getloadavg()[0], "rows": {}}
            for i, row in enumerate(ROWS):
                prompts = prompts_for(ns.seed + 1 + r * len(ROWS) + i, ns.requests, ns.prompt_len, mc.vocab_size,
                                      specials)
                order = SYSTEMS if (r + i) % 2 == 0 else SYSTEMS[::-1]
                got = {s: run_batch(loop, clients[s], targets[s], [targets[o] for o in SYSTEMS if o != s], row,
                                    prompts, ns.new_tokens) for s in order}
                rec["rows"][row.name] = {"order": list(order), **got}
            rounds.append(rec)
            print(f"round {r}: " + "; ".join(
                f"{name} " + " / ".join(f"{v[s]['tokens_per_s']:.1f}" for s in SYSTEMS)
                for name, v in rec["rows"].items()) + " tok/s (llama-server / loraserve)", flush=True)
    finally:
        for c in clients.values():
            loop.run_until_complete(c.aclose())
        loop.close()
        lora.stop()
        llama.stop()
        registry.cleanup()
    settings = {
        "llama-server": {"sdist": f"llama-cpp-python {build.version}", "llama_cpp_commit": build.commit(),
                         "build": build.build_settings(), "version": build.version_line(),
                         "args": [str(build.server_bin), *llama_args],
                         "model_gguf": {"file": model_gguf.name, "outtype": MODEL_OUTTYPE,
                                        "bytes": model_gguf.stat().st_size},
                         "lora_gguf_outtype": LORA_OUTTYPE,
                         "request": "lora: [{id: i, scale: 1.0}] per request (none for the base)"},
        "loraserve": {"args": ["loraserve", "serve", *serve_args],
                      "engine_defaults": dataclasses.asdict(EngineConfig(model="default")),
                      "request": "model: the adapter's name (`default` for the base)",
                      # what it loaded and which kernels it picked, from its own start-up log
                      "startup_log": [e for e in lora.events if e.get("event") not in ("request", "audit")][:30]},
    }
    return report(ns, rounds, {"dir": str(model_dir), "shape": {"name": "SmolLM2-135M-Instruct (default)", **model_shape(mc)}}, settings, checks,
                  {"before": load_before, "after": os.getloadavg()})


def summarize(rounds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per row: each system's median tok/s and the median (and range) of per-round loraserve / llama-server."""
    out = []
    for row in ROWS:
        per = [r["rows"][row.name] for r in rounds]
        ratios = [p["loraserve"]["tokens_per_s"] / p["llama-server"]["tokens_per_s"] for p in per]
        out.append({"row": row.name,
                    "llama-server tok/s": median([p["llama-server"]["tokens_per_s"] for p in per]),
                    "loraserve tok/s": median([p["loraserve"]["tokens_per_s"] for p in per]),
                    "ratio": median(ratios), "ratio min": min(ratios), "ratio max": max(ratios),
                    "per_round": ratios,
                    "goal": GOAL_DISTINCT_RATIO if row.adapters == "distinct" else GOAL_RATIO})
    for r in out:
        r["met"] = r["ratio"] > r["goal"] if r["goal"] == GOAL_RATIO else r["ratio"] >= r["goal"]
    return out


def report(ns: argparse.Namespace, rounds: list[dict[str, Any]], model: dict[str, Any], settings: dict[str, Any],
           checks: dict[str, Any], load: dict[str, Any]) -> dict[str, Any]:
    rows = summarize(rounds)
    machine = cpu_machine_info()
    table = [{"row": r["row"], "llama-server tok/s": r["llama-server tok/s"], "loraserve tok/s": r["loraserve tok/s"],
              "ratio": f"{r['ratio']:.2f}x ({r['ratio min']:.2f}-{r['ratio max']:.2f})",
              "goal": f"{'>' if r['goal'] == GOAL_RATIO else '>='}{r['goal']:g}x {'met' if r['met'] else 'NOT met'}"}
             for r in rows]
    print_table(table, list(table[0]), title=f"loraserve vs llama-server, {ns.requests} concurrent x "
                f"({ns.prompt_len} prompt + {ns.new_tokens} new) tokens, {len(rounds)} rounds "
                f"({machine_line(machine)})")
    print(f"load average before {load['before'][0]:.2f}, after {load['after'][0]:.2f}")
    return {
        "benchmark": "llama_server", "machine": machine, "machine_line": machine_line(machine), "model": model,
        "workload": {"requests": ns.requests, "concurrent": True, "prompt_tokens": ns.prompt_len,
                     "new_tokens": ns.new_tokens, "greedy": True, "ignore_eos": True, "adapters": ns.requests,
                     "adapter_rank": ns.rank, "adapter_targets": "all seven (q k v o gate up down)",
                     "adapter_seed": ns.seed, "rounds": len(rounds), "rows": [dataclasses.asdict(r) for r in ROWS],
                     "endpoint": "POST /v1/completions (token-id prompt; SSE with stream_options.include_usage "
                                 "for the streamed row), one httpx client for both",
                     "tokens_per_s": "generated tokens / wall time of the round (8 requests sent at once)",
                     "ratio": "loraserve / llama-server, median of per-round ratios"},
        "settings": settings, "sanity": checks, "load_average": load,
        "summary": {"rows": rows, "all_goals_met": all(r["met"] for r in rows)}, "rounds": rounds,
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.llama_server", description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--requests", type=int, default=8, help="concurrent requests (and adapters, and slots)")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--seed", type=int, default=0, help="adapters' seed (`make bench`'s) and prompts' base seed")
    p.add_argument("--threads", type=int, default=2, help="llama-server -t/-tb (loraserve: its default)")
    p.add_argument("--workdir", default="", help=f"adapters and logs (default {WORKDIR.relative_to(REPO)})")
    p.add_argument("--serve-arg", dest="serve_args", action="append", default=[],
                   help="extra `loraserve serve` flag (repeatable)")
    p.add_argument("--llama-arg", dest="llama_args", action="append", default=[],
                   help="extra llama-server flag (repeatable)")
    p.add_argument("--out", type=Path, default=RESULTS)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        LlamaCpp().check()
    except NotBuilt as e:
        print(f"skipped: {e}", file=sys.stderr)
        return 0
    t0 = time.time()
    payload = run(ns)
    payload["wall_s"] = round(time.time() - t0, 1)
    write_json(ns.out, payload)
    print(f"wrote {ns.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
