"""What fewer bits per LoRA rank row would cost: the adapter's effect on the logits, by row format.

    python -m benchmarks.lora_row_bits [--adapters 3] [--tokens 512] [--json out.json]

Why: on CPU a decode step of distinct adapters reads every adapter in the batch, so its LoRA share cannot fall
below their bytes (`make bench`'s roofline: 39 MB of int8 rank rows beside a 166 MB int8 base for 8 rank-16
adapters on SmolLM2). Fewer bits per weight would lower that floor; this measures what they would do to the
adapters. Each format rounds every rank row of A and of B^T (the rows the CPU kernels read) and is scored
against the same adapter with fp32 rows, on SmolLM2 in fp32 through Hugging Face PEFT (the oracle), over the
first `--tokens` tokens of the perplexity text:

* delta error: |logits(format) - logits(fp32 rows)| / |logits(fp32 rows) - logits(base)|, the share of the
  adapter's own effect on the logits that the rounding changes;
* KL(fp32 rows || format), mean over positions, beside KL(fp32 rows || base), the adapter's whole effect;
* top-1 agreement with fp32 rows.

`int8/row` is what the kernels serve (`stacks.quantize_rows`: one fp32 scale a row); the others are symmetric
absmax rounding simulated in torch (`/row`: a scale a row, `/g`: a scale per group of g values), kernels that
do not exist. The adapters are `make bench`'s (random A ~ N(0, 1/in), B ~ N(0, 0.02^2), rank 16, all seven
projections), whose effect on the logits is about that of a trained adapter's.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch

from benchmarks.common import cpu_machine_info, machine_line, median, print_table, write_json
from benchmarks.perplexity import text_token_ids

RESULTS = Path(__file__).resolve().parent / "results" / "lora_row_bits.json"

# name -> (bits, group): group 0 is one scale a row; bits 0 is the fp32 reference, 16 bf16 rounding.
FORMATS = {"fp32": (0, 0), "bf16": (16, 0), "int8/row": (8, 0), "int6/row": (6, 0), "int5/g64": (5, 64),
           "int4/row": (4, 0), "int4/g32": (4, 32)}


def round_rows(rows: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """rows [n, k] as a kernel reading `bits`-bit rows would see them (dequantized to fp32)."""
    if bits == 0:
        return rows
    if bits == 16:
        return rows.bfloat16().float()
    if bits == 8 and group == 0:
        from server.lora.stacks import quantize_rows

        q, scale = quantize_rows(rows)
        return q.float() * scale[:, None]
    n, k = rows.shape
    g = rows.reshape(n, k // group, group) if group else rows.reshape(n, 1, k)
    qmax = 2 ** (bits - 1) - 1
    scale = g.abs().amax(dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny) / qmax
    return (torch.round(g / scale).clamp(-qmax, qmax) * scale).reshape(n, k)


def bits_per_weight(bits: int, group: int, row_len: int) -> float:
    """Storage bits a weight, the fp32 scales included."""
    if bits in (0, 16):
        return 32.0 if bits == 0 else 16.0
    return bits + 32 / (group or row_len)


def run(ns: argparse.Namespace) -> dict[str, Any]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from benchmarks.cpu_mixed.inputs import make_adapters
    from server.core.paths import resolve_home
    from server.model.loader import load_tokenizer, resolve_model

    model_dir = resolve_model("default", resolve_home())
    ids = text_token_ids(load_tokenizer(model_dir))[:ns.tokens]
    dirs = make_adapters(model_dir, Path(tempfile.mkdtemp(prefix="lora-row-bits-")), ns.adapters, 16, 7)
    with torch.no_grad():
        base_logits = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)(ids[None]).logits[0]
    per_format: dict[str, list[dict[str, float]]] = {name: [] for name in FORMATS}
    row_lens: list[int] = []
    for d in dirs:
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), d)
        model.eval()
        lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
        original = {n: p.detach().clone() for n, p in lora.items()}
        if not row_lens:
            # a rank row: A's row (in values) and B^T's row (out values), as the kernels store them
            row_lens = [p.shape[1] if "lora_A" in n else p.shape[0] for n, p in original.items()]
        reference: Optional[torch.Tensor] = None
        for name, (bits, group) in FORMATS.items():
            t0 = time.perf_counter()
            with torch.no_grad():
                for n, p in lora.items():
                    w = original[n]
                    p.copy_(round_rows(w, bits, group) if "lora_A" in n else round_rows(w.t(), bits, group).t())
                logits = model(ids[None]).logits[0]
            if reference is None:
                reference = logits
            ref_logp = torch.log_softmax(reference, -1)
            kl = (ref_logp.exp() * (ref_logp - torch.log_softmax(logits, -1))).sum(-1).mean().item()
            per_format[name].append({
                "delta_error": ((logits - reference).norm() / (reference - base_logits).norm()).item(),
                "kl": kl,
                "adapter_kl": (ref_logp.exp() * (ref_logp - torch.log_softmax(base_logits, -1))).sum(-1).mean().item(),
                "top1": (logits.argmax(-1) == reference.argmax(-1)).float().mean().item(),
                "seconds": time.perf_counter() - t0})
            print(f"{d.name} {name:9} delta error {per_format[name][-1]['delta_error']:.4f}  "
                  f"KL {kl:.2e}  top-1 {per_format[name][-1]['top1']:.4f}", file=sys.stderr, flush=True)
        del model
    weights_per_rank = sum(row_lens)  # values in one rank row of every targeted linear of every layer
    rows = []
    for name, (bits, group) in FORMATS.items():
        got = per_format[name]
        bpw = sum(bits_per_weight(bits, group, n) * n for n in row_lens) / weights_per_rank
        rows.append({
            "format": name, "bits/weight": round(bpw, 2),
            "MB, 8 rank-16 adapters": round(8 * 16 * weights_per_rank * bpw / 8 / 1e6, 1),
            "delta error": f"{median([g['delta_error'] for g in got]):.4f} "
                           f"({min(g['delta_error'] for g in got):.4f}..{max(g['delta_error'] for g in got):.4f})",
            "KL vs fp32 rows": f"{median([g['kl'] for g in got]):.2e}",
            "top-1 agreement": f"{median([g['top1'] for g in got]):.4f}"})
    machine = cpu_machine_info()
    payload = {
        "benchmark": "lora_row_bits", "machine": machine, "machine_line": machine_line(machine),
        "workload": {"model": "SmolLM2-135M-Instruct (fp32, Hugging Face PEFT)", "adapters": ns.adapters,
                     "rank": 16, "targets": "all seven projections", "tokens": int(ids.numel())},
        "adapter_kl_vs_base": median([g["adapter_kl"] for g in per_format["fp32"]]),
        "formats": rows, "runs": per_format,
    }
    print_table(rows, list(rows[0]), title=f"LoRA rank rows by format: {ns.adapters} adapters, {ids.numel()} tokens; "
                                           f"{payload['machine_line']}")
    print(f"the adapters' own effect: KL(fp32 rows || base) {payload['adapter_kl_vs_base']:.3f}")
    return payload


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.lora_row_bits", description=__doc__.split("\n")[0])
    p.add_argument("--adapters", type=int, default=3)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--json", dest="out", default=str(RESULTS))
    ns = p.parse_args(argv)
    payload = run(ns)
    if ns.out:
        write_json(ns.out, payload)
        print(f"wrote {ns.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
