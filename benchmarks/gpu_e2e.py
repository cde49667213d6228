"""End-to-end decode throughput: loraserve vs PEFT mixed-batch generate vs our base vs the HBM roofline.

B requests (default 32 and 64) with a 128-token prompt and 64 new tokens each,
greedy, ignore_eos, on a random-weight Llama (1B or 8B shape, bf16):
  loraserve            every request its own adapter (Distinct, 32 rank-16 adapters on all 7 targets)
  loraserve_identical  every request the same adapter (LoRA cost against the base: goal <= 10%)
  loraserve_base       no adapters (our own engine's floor)
  peft_mixed           transformers generate on a PeftModel with adapter_names= (PEFT's mixed batch)
  roofline             bytes per decode step / HBM bandwidth (goal: decode at >= 70% of it at B = 64)
Adapters are loaded onto the device before timing; cold loads are gpu_coldload.py's subject.
"decode tok/s" counts tokens after every request's first one, over the time after the last first token.
The JSON is rewritten after every row, so a run cut short keeps its rows; a row whose requests failed
records the error and the run goes on.

    python -m benchmarks.gpu_e2e --shape 1b --out results/gpu_e2e_1b.json
    python -m benchmarks.gpu_e2e --dry-run --out /tmp/e2e.json
"""
from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from benchmarks import gpu_common as common
from benchmarks.roofline import PEAK_BANDWIDTH, SHAPES, decode_step_bytes, measure_bandwidth, roofline_tokens_per_s
from benchmarks.workload import prompt_ids


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="end-to-end multi-adapter decode benchmark")
    common.add_common_args(p, "results/gpu_e2e.json")
    p.add_argument("--batch", type=int, nargs="+", default=[32, 64])
    p.add_argument("--adapters", type=int, default=32)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--quantize", nargs="+", default=["none", "int8"], choices=("none", "int8", "int4"))
    p.add_argument("--skip-peft", action="store_true")
    p.add_argument("--peft-batch", type=int, nargs="+",
                   help="the batch sizes of --batch PEFT runs at (default: all); it loads only the adapters they use")
    p.add_argument("--no-cuda-graphs", action="store_true", help="run decode eagerly (to measure what graphs give)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per configuration (best is kept)")
    return p


Emit = Callable[[dict], None]  # records one finished row (and rewrites the JSON)


def _summarize(res: list[dict], new: int) -> dict:
    errors = [r["error"] for r in res if "error" in r]
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, first: {errors[0]}")
    tokens = sum(r["tokens"] for r in res)
    wall = max(r["end"] for r in res) - min(r["arrival"] for r in res)
    last_first = max(r["first"] for r in res)
    decode_tokens = tokens - len(res)
    decode_wall = max(r["end"] for r in res) - last_first
    return {"tokens": tokens, "wall_s": wall, "tok_s": tokens / wall,
            "decode_tok_s": decode_tokens / decode_wall if decode_wall > 0 else float("nan"),
            "ttft_max_s": max(r["ttft"] for r in res), "complete": all(r["tokens"] == new for r in res)}


def run_loraserve(args, model_dir: Path, adapters: list[Path], device: torch.device, quantize: str,
                  emit: Emit) -> None:
    from server.core.engine_config import EngineConfig
    from server.engine.engine import Engine
    from server.engine.types import Request, SamplingParams

    max_b = max(args.batch)
    cfg = EngineConfig(model=str(model_dir), device=device.type,
                       dtype="bfloat16" if device.type == "cuda" else "float32", quantize=quantize,
                       max_adapters_on_device=len(adapters), max_rank=args.rank, max_batch_size=max_b,
                       max_batch_tokens=max(max_b * args.prompt, 2048),
                       kv_cache_tokens=max_b * (args.prompt + args.new + 16), cuda_graphs=not args.no_cuda_graphs,
                       # the context this workload reaches (graphs are captured per context bucket up to it), and
                       # no prefix cache: repeated prompt seeds across modes would skip prefills
                       max_model_len=args.prompt + args.new + 16, prefix_cache=False)
    engine = Engine.from_config(cfg)
    engine.start()
    try:
        versions = [common.local_adapter(p, engine.model_config, args.rank) for p in adapters]
        t0 = time.perf_counter()
        for s in versions:
            engine.pool.load(s)
        load_s = time.perf_counter() - t0
        params = SamplingParams(max_new_tokens=args.new, temperature=0.0, ignore_eos=True)
        vocab = engine.model_config.vocab_size

        def reqs(B: int, mode: str, rep: int):
            out = []
            for i in range(B):
                adapter = None if mode == "base" else versions[0 if mode == "identical" else i % len(versions)]
                out.append((0.0, Request(prompt_ids(args.prompt, vocab, seed=1000 * rep + i), params, adapter,
                                         request_id=f"{mode}-{B}-{rep}-{i}")))
            return out

        common.run_requests(engine, reqs(min(4, max_b), "distinct", 99))  # warm-up: kernels, allocator
        for B in args.batch:
            for mode, label in (("distinct", "loraserve"), ("identical", "loraserve_identical"),
                                ("base", "loraserve_base")):
                best, failure = None, {}
                try:
                    for rep in range(args.repeats):
                        s = _summarize(common.run_requests(engine, reqs(B, mode, rep)), args.new)
                        if best is None or s["tok_s"] > best["tok_s"]:
                            best = s
                except Exception as e:  # noqa: BLE001 (failed requests are this row's result, not the run's end)
                    failure = {"error": f"{type(e).__name__}: {e}", "complete": False}
                in_batch = 0 if mode == "base" else (1 if mode == "identical" else min(B, len(versions)))
                emit({"system": label, "quantize": quantize, "B": B, "adapters_in_batch": in_batch,
                      "adapter_preload_s": load_s, **(best or {}), **failure})
    finally:
        engine.shutdown()
        del engine
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def run_peft(args, model_dir: Path, adapters: list[Path], device: torch.device, emit: Emit) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(device).eval()
    adapters = adapters[:max(args.peft_batch)]  # only those its batches use: each load_adapter takes a while
    # Adapters in the model's dtype: PEFT's default autocasts bf16 adapter weights to fp32, a slower baseline
    # than a user would run.
    model = PeftModel.from_pretrained(model, str(adapters[0]), adapter_name="a0", autocast_adapter_dtype=False)
    for i, p in enumerate(adapters[1:], start=1):
        model.load_adapter(str(p), adapter_name=f"a{i}", autocast_adapter_dtype=False, low_cpu_mem_usage=True)
    vocab = model.config.vocab_size
    for B in args.peft_batch:
        ids = torch.tensor([prompt_ids(args.prompt, vocab, seed=i) for i in range(B)], device=device)
        names = [f"a{i % len(adapters)}" for i in range(B)]
        kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=names, do_sample=False,
                  max_new_tokens=args.new, min_new_tokens=args.new, pad_token_id=3)
        with torch.inference_mode():
            model.generate(**{**kw, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
            common.sync(device)
            t0 = time.perf_counter()
            out = model.generate(**kw)
            common.sync(device)
            wall = time.perf_counter() - t0
        tokens = int((out.shape[1] - ids.shape[1]) * B)
        emit({"system": "peft_mixed", "quantize": "none", "B": B, "adapters_in_batch": min(B, len(adapters)),
              "tokens": tokens, "wall_s": wall, "tok_s": tokens / wall, "complete": tokens == B * args.new})
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _derive(rows: list[dict], args) -> list[dict]:
    """The ratios the issue sets goals for, from the rows so far (None where a row is missing or failed)."""
    by = {(r["system"], r["quantize"], r["B"]): r for r in rows if "error" not in r}

    def ratio(a: Optional[dict], b: Optional[dict], key: str, minus: float = 0.0) -> Optional[float]:
        return a[key] / b[key] - minus if a is not None and b is not None else None

    derived = []
    for B in args.batch:
        peft = by.get(("peft_mixed", "none", B))
        for q in args.quantize:
            ours, ident, base, roof = (by.get((s, q, B)) for s in ("loraserve", "loraserve_identical",
                                                                  "loraserve_base", "roofline"))
            derived.append({
                "B": B, "quantize": q,
                "x_peft_mixed": ratio(ours, peft, "tok_s"),
                "lora_overhead_identical": ratio(base, ident, "decode_tok_s", 1.0),
                "lora_overhead_distinct": ratio(base, ours, "decode_tok_s", 1.0),
                "roofline_fraction": ratio(ours, roof, "decode_tok_s"),
                "base_roofline_fraction": ratio(base, roof, "decode_tok_s"),
            })
    return derived


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = common.resolve_args(args)
    if args.tiny:
        # Tiny batches: the ones asked for that are tiny already, else 2 and 4.
        args.batch = [b for b in args.batch if b <= 4] or [2, 4]
        args.adapters, args.prompt, args.new, args.repeats = 2, 8, 4, 1
    args.peft_batch = [b for b in args.peft_batch if b in args.batch] if args.peft_batch else args.batch
    shape = SHAPES[args.shape]
    work = Path(args.workdir)
    print(f"preparing random {shape.name} model and {args.adapters} adapters under {work} ...", flush=True)
    model_dir = common.make_random_model_dir(shape, work / f"model-{shape.name}", device, seed=args.seed)
    adapters = common.make_random_adapters(shape, work / f"adapters-{shape.name}", args.adapters, args.rank,
                                           seed=args.seed, device=device)
    if device.type == "cuda":
        bandwidth, bw_source = measure_bandwidth(device), "measured device copy"
        torch.cuda.empty_cache()  # the copy's 4 GB, cached by the allocator: the engines' now
    else:
        bandwidth, bw_source = PEAK_BANDWIDTH["H100 SXM"], "nominal H100 SXM (CPU dry run)"
    dtype_bytes = 2 if device.type == "cuda" else 4
    context = args.prompt + args.new // 2
    rows: list[dict] = []
    for B in args.batch:  # first: every partial file has the roofline its rows are measured against
        for q in args.quantize:
            # A quantized base reads a quantized copy of the (tied) lm_head (server/model/llama.py)
            parts = decode_step_bytes(shape, B, context, adapters=min(B, args.adapters), rank=args.rank,
                                      quantize=q, dtype_bytes=dtype_bytes, lm_head_quantized=q != "none")
            rows.append({"system": "roofline", "quantize": q, "B": B, "adapters_in_batch": min(B, args.adapters),
                         "decode_tok_s": roofline_tokens_per_s(parts["total"], B, bandwidth),
                         "tok_s": roofline_tokens_per_s(parts["total"], B, bandwidth), "step_bytes": parts})
    payload = {"benchmark": "gpu_e2e", "machine": common.machine_info(device), "shape": shape.to_dict(),
               "workload": {"batch": args.batch, "adapters": args.adapters, "rank": args.rank,
                            "targets": list(common.ALL_TARGETS), "prompt": args.prompt, "new": args.new,
                            "quantize": args.quantize, "repeats": args.repeats, "seed": args.seed,
                            "peft_batch": [] if args.skip_peft else args.peft_batch,
                            "cuda_graphs": device.type == "cuda" and not args.no_cuda_graphs},
               "bandwidth_bytes_s": bandwidth, "bandwidth_source": bw_source, "results": rows, "derived": [],
               "note": "CPU dry run on a tiny shape: numbers are meaningless" if device.type == "cpu" else ""}

    def emit(row: dict) -> None:
        rows.append(row)
        payload["derived"] = _derive(rows, args)
        common.write_json(args.out, payload)  # after every row: a run cut short keeps what it measured

    # PEFT right after the first pass: if the step's budget runs out, the x PEFT goal is not what is lost.
    for i, q in enumerate(args.quantize):
        run_loraserve(args, model_dir, adapters, device, q, emit)
        if i == 0 and not args.skip_peft and args.peft_batch:
            run_peft(args, model_dir, adapters, device, emit)
    derived = payload["derived"] = _derive(rows, args)
    out = common.write_json(args.out, payload)
    common.print_table([r for r in rows if r["system"] != "roofline"] + [r for r in rows if r["system"] == "roofline"],
                       ["system", "quantize", "B", "adapters_in_batch", "tok_s", "decode_tok_s", "ttft_max_s",
                        "complete"],
                       title=f"end-to-end, shape {shape.name}, prompt {args.prompt}, new {args.new}, rank {args.rank}")
    common.print_table(derived, ["B", "quantize", "x_peft_mixed", "lora_overhead_identical",
                                 "lora_overhead_distinct", "roofline_fraction", "base_roofline_fraction"],
                       title="goals: x_peft_mixed >= 100, lora_overhead_identical <= 0.10, "
                             "roofline_fraction >= 0.70 at B=64")

    def draw(axes) -> None:
        for ax, B in zip(axes, args.batch):
            sel = [r for r in rows if r["B"] == B and "tok_s" in r]
            labels = [f"{r['system']}\n{r['quantize']}" for r in sel]
            ax.bar(range(len(sel)), [r["tok_s"] for r in sel], color=["tab:gray" if r["system"] == "roofline" else
                                                                       "tab:orange" if r["system"] == "peft_mixed" else
                                                                       "tab:blue" for r in sel])
            ax.set_xticks(range(len(sel)), labels, rotation=60, fontsize=7)
            ax.set_yscale("log")
            ax.set_ylabel("tokens/s")
            ax.set_title(f"B = {B} ({shape.name})")

    print(common.wrote(out, common.plot(out, len(args.batch), draw)))
    incomplete = [r for r in rows if r.get("complete") is False]
    if incomplete:
        print(f"FAIL: {len(incomplete)} runs failed or produced fewer tokens than asked", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
