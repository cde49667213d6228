"""What every GPU benchmark script shares: device checks, random-weight models and adapters, output.

No weights can be downloaded, so models are random-weight Llama shapes saved in
Hugging Face format (config.json + safetensors + a word-level tokenizer that
covers the whole vocabulary, so any generated id detokenizes), and adapters are
random PEFT LoRA directories. Every script writes one JSON (machine, shape,
workload, results), rewritten after every configuration it finishes so that a run cut
short keeps what it measured, prints a table and, where matplotlib imports, draws a PNG.
Where $OUT is set (the device machine returns only files written under it) the JSON
goes there by default.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib.metadata
import itertools
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

from benchmarks.roofline import SHAPES, ModelShape

PEFT_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
ALL_TARGETS = tuple(PEFT_MODULES)
EXIT_NO_CUDA = 2


def add_common_args(p: argparse.ArgumentParser, default_out: str) -> None:
    p.add_argument("--shape", choices=sorted(SHAPES), default="1b", help="random-weight Llama shape")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny shape and sizes (with --device cpu: a smoke run)")
    p.add_argument("--dry-run", action="store_true", help="same as --device cpu --tiny")
    p.add_argument("--out", default=default_results_path(default_out), help="JSON path; the PNG goes beside it")
    p.add_argument("--workdir", default="/tmp/loraserve-bench", help="random models and adapters go here")
    p.add_argument("--seed", type=int, default=0)


def default_results_path(default: str) -> str:
    """`default`, or the same file name under $OUT where that is set: on the device machine only files
    written under $OUT come back."""
    out = os.environ.get("OUT")
    return str(Path(out) / Path(default).name) if out else default


def resolve_args(args: argparse.Namespace) -> torch.device:
    """Apply --dry-run, refuse CUDA runs without CUDA (exit 2), and refuse full-size CPU runs."""
    if args.dry_run:
        args.device, args.tiny = "cpu", True
    if args.tiny:
        args.shape = "tiny"
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"{Path(sys.argv[0]).name}: CUDA is not available (torch {torch.__version__}, "
              f"CUDA build {torch.version.cuda}); this benchmark needs a GPU. "
              "Use --dry-run (or --device cpu --tiny) for a CPU smoke run.", file=sys.stderr)
        sys.exit(EXIT_NO_CUDA)
    if args.device == "cpu" and not args.tiny:
        print("--device cpu runs only the tiny shape: add --tiny (or use --dry-run)", file=sys.stderr)
        sys.exit(EXIT_NO_CUDA)
    torch.manual_seed(args.seed)
    return torch.device(args.device)


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(), "python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "device": str(device), "cpu_count": os.cpu_count(),
    }
    for mod in ("triton", "xformers", "transformers", "peft"):  # read from the installed metadata: importing
        try:                                                        # peft and transformers costs seconds a child
            info[mod] = importlib.metadata.version(mod)
        except importlib.metadata.PackageNotFoundError:
            info[mod] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    sm_count=props.multi_processor_count, capability=f"{props.major}.{props.minor}")
    else:
        info["gpu"] = None
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_us(fn, device: torch.device, warmup: int = 5, iters: int = 50) -> float:
    """Median microseconds per call (CUDA events on GPU, perf_counter on CPU)."""
    import statistics
    import time

    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e) * 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    """The results file, replaced whole (written beside it, then renamed): a run killed mid-write leaves the
    previous file, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def print_table(rows: Sequence[dict[str, Any]], cols: Sequence[str], title: str = "") -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return "" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
    lines = [title] if title else []
    lines.append("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    text = "\n".join(lines)
    print(text)
    return text


def png_path(json_path: str | Path) -> Path:
    return Path(json_path).with_suffix(".png")


def plot(json_path: str | Path, ncols: int, draw: Callable[[Sequence[Any]], None]) -> Optional[Path]:
    """Draw `ncols` side-by-side axes with `draw(axes)` into the PNG beside the JSON; None (said on stderr)
    where matplotlib does not import: plots are optional, the JSON is the result."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        print(f"no plot: matplotlib does not import ({e})", file=sys.stderr)
        return None
    fig, axes = plt.subplots(1, ncols, figsize=(6 * ncols, 4.2), squeeze=False)
    draw(axes[0])
    fig.tight_layout()
    path = png_path(json_path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def wrote(out: Path, png: Optional[Path]) -> str:
    return f"wrote {out}" + (f" and {png}" if png else "")


# ----------------------------------------------------------------------------- random models


def _word_tokenizer(vocab_size: int):
    """A word-level tokenizer with one token per id ("t0".."tN"), so every id decodes."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", bos_token="t1", eos_token="t2",
                                   pad_token="t3")
    fast.chat_template = "{% for m in messages %}t1 {{ m['content'] }} {% endfor %}"
    return fast


def make_random_model_dir(shape: ModelShape, path: str | Path, device: torch.device,
                          dtype: torch.dtype = torch.bfloat16, seed: int = 0, std: float = 0.02) -> Path:
    """Save a random-weight Llama of `shape` (reused when config.json already matches)."""
    from safetensors.torch import save_file

    path = Path(path)
    # config.json written as Hugging Face's LlamaConfig would (importing transformers' config costs a child
    # of the GPU suite a second); transformers fills every field not named here with Llama's default.
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
           "vocab_size": shape.vocab_size, "hidden_size": shape.hidden_size,
           "intermediate_size": shape.intermediate_size, "num_hidden_layers": shape.num_layers,
           "num_attention_heads": shape.num_heads, "num_key_value_heads": shape.num_kv_heads,
           "head_dim": shape.head_dim, "max_position_embeddings": 4096, "hidden_act": "silu",
           "tie_word_embeddings": shape.tie_word_embeddings, "bos_token_id": 1, "eos_token_id": 2,
           "pad_token_id": 3, "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "attention_bias": False,
           "mlp_bias": False, "torch_dtype": str(dtype).replace("torch.", "")}
    marker = path / ".complete"
    want = json.dumps(cfg, sort_keys=True)
    if marker.is_file() and marker.read_text() == want:
        return path
    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator(device=device).manual_seed(seed)

    def rnd(*s: int) -> torch.Tensor:
        return (torch.randn(*s, generator=g, device=device, dtype=torch.float32) * std).to(dtype).cpu()

    h, i, hd = shape.hidden_size, shape.intermediate_size, shape.head_dim
    q, kv = shape.num_heads * hd, shape.num_kv_heads * hd
    shard: dict[str, torch.Tensor] = {"model.embed_tokens.weight": rnd(shape.vocab_size, h),
                                      "model.norm.weight": torch.ones(h, dtype=dtype)}
    if not shape.tie_word_embeddings:
        shard["lm_head.weight"] = rnd(shape.vocab_size, h)
    n_shard = 0
    index: dict[str, str] = {}

    def flush() -> None:
        nonlocal shard, n_shard
        name = f"model-{n_shard:05d}.safetensors"
        save_file(shard, str(path / name), metadata={"format": "pt"})
        index.update({k: name for k in shard})
        shard, n_shard = {}, n_shard + 1

    for layer in range(shape.num_layers):
        p = f"model.layers.{layer}."
        shard.update({
            p + "self_attn.q_proj.weight": rnd(q, h), p + "self_attn.k_proj.weight": rnd(kv, h),
            p + "self_attn.v_proj.weight": rnd(kv, h), p + "self_attn.o_proj.weight": rnd(h, q),
            p + "mlp.gate_proj.weight": rnd(i, h), p + "mlp.up_proj.weight": rnd(i, h),
            p + "mlp.down_proj.weight": rnd(h, i),
            p + "input_layernorm.weight": torch.ones(h, dtype=dtype),
            p + "post_attention_layernorm.weight": torch.ones(h, dtype=dtype),
        })
        if sum(t.numel() * t.element_size() for t in shard.values()) > 2 * 2**30:
            flush()
    if shard:
        flush()
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    _word_tokenizer(shape.vocab_size).save_pretrained(path)
    marker.write_text(want)
    return path


def make_random_adapters(shape: ModelShape, root: str | Path, n: int, rank: int,
                         targets: Iterable[str] = ALL_TARGETS, alpha: Optional[float] = None,
                         seed: int = 0, std: float = 0.02, device: torch.device | str = "cpu") -> list[Path]:
    """n random PEFT LoRA adapters (adapter_config.json + adapter_model.safetensors) under root/a{i}, drawn on
    `device` (on a GPU: a 1B-shape adapter in milliseconds, where one CPU thread takes most of a second)."""
    from safetensors.torch import save_file

    targets = tuple(targets)
    out: list[Path] = []
    for a in range(n):
        d = Path(root) / f"r{rank}-{'-'.join(targets)}" / f"a{a:04d}"
        out.append(d)
        if (d / "adapter_model.safetensors").is_file():
            continue
        d.mkdir(parents=True, exist_ok=True)
        g = torch.Generator(device=device).manual_seed(seed * 100_003 + a)
        tensors = {}
        for layer in range(shape.num_layers):
            for t in targets:
                o, i = shape.target_shape(t)
                key = f"base_model.model.model.layers.{layer}.{PEFT_MODULES[t]}"
                a_w = torch.randn(rank, i, generator=g, device=device) / i ** 0.5
                b_w = torch.randn(o, rank, generator=g, device=device) * std
                tensors[f"{key}.lora_A.weight"] = a_w.to(torch.bfloat16).cpu()
                tensors[f"{key}.lora_B.weight"] = b_w.to(torch.bfloat16).cpu()
        save_file(tensors, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
        cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha or 2 * rank,
               "target_modules": [PEFT_MODULES[t].split(".")[1] for t in targets], "lora_dropout": 0.0,
               "bias": "none", "use_rslora": False, "use_dora": False, "fan_in_fan_out": False,
               "base_model_name_or_path": None, "inference_mode": True}
        (d / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    return out


# ----------------------------------------------------------------------------- driving the engine


def local_adapter(path: Path, model_config, max_rank: int):
    """An AdapterVersion that loads a PEFT directory without a registry (the engine calls load off its
    loop thread); the path stands in for the content digest."""
    import functools

    from server.core.identity import AdapterVersion
    from server.lora.weights import load_peft_adapter

    return AdapterVersion(tenant="default", name=Path(path).name, version=1, digest=str(path),
                          load=functools.partial(load_peft_adapter, Path(path), model_config, max_rank))


def run_requests(engine, requests: Sequence[tuple[float, Any]]) -> list[dict[str, float]]:
    """Submit (offset_s, Request) pairs at their offsets; time each one's tokens from a collector thread.

    Returns per request: arrival, first-token and finish times (seconds from start),
    ttft, e2e, tokens, finish_reason. Errors are recorded, not raised.
    """
    import threading
    import time

    results: list[dict[str, Any]] = [dict() for _ in requests]
    threads = []
    t0 = time.perf_counter()

    def collect(i: int, stream, arrival: float) -> None:
        r = results[i]
        r.update(arrival=arrival, tokens=0, first=None)
        try:
            for d in stream:
                now = time.perf_counter() - t0
                if d.token_ids and r["first"] is None:
                    r["first"] = now
                r["tokens"] += len(d.token_ids)
                if d.finished:
                    r["finish_reason"] = d.finish_reason
        except Exception as e:  # noqa: BLE001 (one failed request is a result, not a crash)
            r["error"] = f"{type(e).__name__}: {e}"
        r["end"] = time.perf_counter() - t0
        r["ttft"] = (r["first"] if r["first"] is not None else r["end"]) - arrival
        r["e2e"] = r["end"] - arrival

    i = 0
    # Requests with one offset arrive together (a burst: the next step schedules them side by side).
    for offset, group in itertools.groupby(sorted(requests, key=lambda p: p[0]), key=lambda p: p[0]):
        burst = [req for _, req in group]
        delay = offset - (time.perf_counter() - t0)
        if delay > 0:
            time.sleep(delay)
        arrival = time.perf_counter() - t0
        for k, stream in enumerate(engine.submit_many(burst), start=i):
            th = threading.Thread(target=collect, args=(k, stream, arrival), daemon=True)
            th.start()
            threads.append(th)
        i += len(burst)
    for th in threads:
        th.join()
    return results
