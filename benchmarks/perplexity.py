"""Perplexity and weight memory of our model for each quantization mode, on a fixed text.

    python -m benchmarks.perplexity [--model default] [--modes none,int8,int4] [--json out.json]

The text (benchmarks/data/perplexity_text.txt) is original prose shipped with the repo (narrative,
instructions, dialogue, science; about 3,700 tokens), so every run scores the same tokens. It is scored in
windows of WINDOW tokens, each a prompt from position 0, through loraserve's own decoder
(`LlamaForCausalLM.score`), fp32 activations on the CPU, exactly as a served prompt is computed.

Why this length: dynamic int8 turns any last-bit change upstream into a new draw of its rounding noise.
On the first 631 tokens alone, eight such draws (the embedding scaled by 1 + k x 1.2e-7) spread int8 from
+0.53% to +1.50% of `none`; over the whole text the same draws spread +0.32% to +0.61%. `--draws N` scores
every quantized mode N more times that way (N = 7: k = -3..4 beside the plain run's 0), so one figure can be told from
its spread.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from benchmarks.common import write_json

DATA = Path(__file__).resolve().parent / "data" / "perplexity_text.txt"
WINDOW = 1024  # tokens a prompt; SmolLM2 reads 8192, but a served prompt is chunked by --max-batch-tokens


@dataclass
class ModeResult:
    mode: str
    ppl: float
    nll: float
    rel_change: float  # ppl / ppl(none) - 1; 0 for the baseline, NaN without one
    weight_bytes: int  # every parameter and buffer of the model, shared storage once
    linear_bytes: int  # the base linears and the lm_head, the part quantization shrinks
    kernel: str
    seconds: float
    draws: Optional[list[float]] = None  # rel_change with the embedding scaled by 1 + k * DRAW_STEP, k in draw_ks


DRAW_STEP = 1.2e-7  # about one float32 ulp at 1: each k changes some last bits of the input and nothing else


def draw_ks(n: int) -> list[int]:
    """n scale steps around 0, which is the plain run: 7 -> -3..4 without 0 (with it, 8 draws)."""
    steps = [k * sign for k in range(1, n + 1) for sign in (1, -1)]  # 1, -1, 2, -2, ...
    return sorted(steps[:n])


def text_token_ids(tokenizer, text: Optional[str] = None) -> torch.Tensor:
    """The fixed text as token ids, no special tokens (the score is of the prose alone)."""
    text = DATA.read_text(encoding="utf-8") if text is None else text
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def perplexity(logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, float]:
    """(perplexity, mean NLL) of ids[1:] under logits[:-1]."""
    nll = F.cross_entropy(logits[:-1].float(), ids[1:].to(logits.device), reduction="mean").item()
    return float(torch.exp(torch.tensor(nll)).item()), nll


def windowed_perplexity(model: torch.nn.Module, ids: torch.Tensor, window: int = WINDOW) -> tuple[float, float]:
    """(perplexity, mean NLL) over every token after the first of each window; each window a prompt of its own."""
    total, count = 0.0, 0
    for start in range(0, ids.numel(), window):
        w = ids[start:start + window]
        if w.numel() < 2:
            break
        nll = perplexity(model.score(w), w)[1]
        total, count = total + nll * (w.numel() - 1), count + w.numel() - 1
    nll = total / count
    return float(torch.exp(torch.tensor(nll)).item()), nll


def linear_bytes(model: torch.nn.Module) -> int:
    from server.model.quant import DenseLinear, QuantLinear

    seen, total = set(), 0
    for m in model.modules():
        if isinstance(m, (DenseLinear, QuantLinear)):
            for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
                key = t.untyped_storage().data_ptr()
                if key not in seen:
                    seen.add(key)
                    total += t.numel() * t.element_size()
    if getattr(model, "lm_head", 1) is None:  # tied dense head: the embedding serves as lm_head
        emb = model.embed
        total += emb.numel() * emb.element_size()
    return total


def kernel_summary(model: torch.nn.Module) -> str:
    from server.model.quant import DenseLinear, QuantLinear

    kinds = sorted({f"{m.kernel}({str(m.kernel_dtype).removeprefix('torch.')})" if isinstance(m, QuantLinear)
                    else "dense" for m in model.modules() if isinstance(m, (DenseLinear, QuantLinear))})
    return ",".join(kinds) or "dense"


def run(model_spec: str = "default", modes: tuple[str, ...] = ("none", "int8", "int4"),
        dtype: torch.dtype = torch.float32, home: Optional[Path] = None, draws: int = 0,
        draw_modes: Optional[tuple[str, ...]] = None) -> dict:
    """Perplexity of the text in each mode; `draws` more runs of each quantized mode in `draw_modes` (default:
    all of them) with its input's last bits changed, to show the spread of its rounding noise."""
    from server.core.paths import resolve_home
    from server.model.llama import LlamaForCausalLM
    from server.model.loader import load_tokenizer, model_fingerprint, resolve_model
    from server.model.quant import module_nbytes

    home = resolve_home(home)
    model_dir = resolve_model(model_spec, home=home)
    ids = text_token_ids(load_tokenizer(model_dir))
    results: list[ModeResult] = []
    base: Optional[float] = None
    for mode in modes:
        t0 = time.perf_counter()
        model = LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype, device="cpu", quantize=mode)
        ppl, nll = windowed_perplexity(model, ids)
        if mode == "none":
            base = ppl
        seconds = time.perf_counter() - t0
        drawn = None
        if draws and mode != "none" and (draw_modes is None or mode in draw_modes):
            embed = model.embed.detach().clone()
            drawn = []
            for k in draw_ks(draws):
                with torch.no_grad():
                    model.embed.copy_(embed * (1 + k * DRAW_STEP))
                drawn.append(windowed_perplexity(model, ids)[0])
        results.append(ModeResult(
            mode=mode, ppl=ppl, nll=nll, rel_change=float("nan"), weight_bytes=module_nbytes(model),
            linear_bytes=linear_bytes(model), kernel=kernel_summary(model), seconds=seconds, draws=drawn))
        del model
    for r in results:
        r.rel_change = (r.ppl / base - 1.0) if base else float("nan")
        if r.draws is not None:
            r.draws = [(d / base - 1.0) if base else float("nan") for d in r.draws]
    return {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
        "model": {"spec": model_spec, "dir": str(model_dir), "fingerprint": model_fingerprint(model_dir, home=home)},
        "text": {"path": str(DATA.relative_to(DATA.parents[2])) if DATA.is_relative_to(DATA.parents[2]) else str(DATA),
                 "chars": len(DATA.read_text(encoding="utf-8")), "tokens": int(ids.numel()), "window": WINDOW},
        "dtype": str(dtype).removeprefix("torch."),
        "draw_ks": draw_ks(draws) if draws else [], "draw_step": DRAW_STEP,
        "modes": [asdict(r) for r in results],
    }


def format_table(report: dict) -> str:
    rows = [f"{'mode':<6} {'ppl':>9} {'change':>9} {'weights MB':>11} {'linears MB':>11} {'sec':>6}  kernel"]
    for r in report["modes"]:
        change = "-" if r["rel_change"] != r["rel_change"] else f"{100 * r['rel_change']:+.2f}%"
        rows.append(f"{r['mode']:<6} {r['ppl']:>9.3f} {change:>9} {r['weight_bytes'] / 1e6:>11.1f} "
                    f"{r['linear_bytes'] / 1e6:>11.1f} {r['seconds']:>6.1f}  {r['kernel']}")
    for r in report["modes"]:
        if r.get("draws"):
            d = [100 * v for v in r["draws"] + [r["rel_change"]]]
            rows.append(f"{r['mode']}: {len(d)} draws (embedding x (1 + k x {report['draw_step']:g}), k = 0 and "
                        f"{report['draw_ks']}): {min(d):+.2f}% to {max(d):+.2f}%, mean {sum(d) / len(d):+.2f}%")
    t = report["text"]
    return (f"model {report['model']['spec']} ({report['model']['dir']}), text {t['path']}: "
            f"{t['tokens']} tokens in windows of {t['window']}, {report['dtype']} activations\n" + "\n".join(rows))


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default", help="'default', a .gguf file or a Hugging Face model dir")
    ap.add_argument("--modes", default="none,int8,int4", help="comma-separated quantization modes")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--json", type=Path, help="write the report here")
    ap.add_argument("--draws", type=int, default=0,
                    help="score each quantized mode this many more times with last-bit changes of its input")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from server.model.quant import QUANT_MODES

    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    bad = [m for m in modes if m not in QUANT_MODES]
    if bad:
        ap.error(f"unknown mode(s) {', '.join(bad)}: choose from {', '.join(QUANT_MODES)}")
    report = run(args.model, modes, getattr(torch, args.dtype), draws=args.draws)
    print(format_table(report))
    if args.json:
        write_json(args.json, report)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
