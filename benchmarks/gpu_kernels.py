"""Micro-benchmark of one layer's LoRA matmuls: Triton SGMV/BGMV vs the torch reference vs torch._grouped_mm.

For B = 1..64 decode tokens (one per sequence, grouped by slot as the runner does)
and Punica's adapter mixes, time `apply_lora` (shrink + expand) on each of the
seven targets of a random-weight Llama shape and report microseconds per call,
per target and summed over the layer. `triton_fused` times what the server's
Triton backend runs: `apply_lora_fused` once per base projection (q/k/v, o,
gate/up, down) on the pool's stacks, for every projection whose targets are all
measured. Each method is checked against the reference before it is timed. The JSON is rewritten
after every (mix, B), so a run cut short keeps what it measured. First, the int8 base's own matmul per
projection (our Triton kernel vs the dense weight vs torch's `_weight_int8pack_mm`), with its GB/s.

    python -m benchmarks.gpu_kernels --shape 1b --out results/gpu_kernels_1b.json
    python -m benchmarks.gpu_kernels --dry-run --out /tmp/k.json   # CPU, interpreter, tiny
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable, Optional

import torch

from benchmarks import gpu_common as common
from benchmarks import lora_variants
from benchmarks.roofline import ALL_TARGETS, SHAPES
from benchmarks.workload import punica_mix
from server.lora.segments import LoraSegments
from server.lora.stacks import ProjectionStacks
from server.model.config import PROJECTIONS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="LoRA kernel micro-benchmark")
    common.add_common_args(p, "results/gpu_kernels.json")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    p.add_argument("--mixes", nargs="+", default=["distinct", "uniform", "skewed", "identical"])
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--targets", nargs="+", default=list(ALL_TARGETS), choices=ALL_TARGETS)
    p.add_argument("--prefill", type=int, default=0,
                   help="tokens per sequence (0 = decode, one token each); e.g. 128 for prefill segments")
    p.add_argument("--iters", type=int, default=100)
    return p


def _methods(K, device: torch.device, dtype: torch.dtype, with_triton: bool):
    from server.lora import torch_ref

    m = {} if not with_triton else {
        "triton": lambda y, x, a, b, s, seg: K.apply_lora(y, x, a, b, s, seg),
        "triton_sgmv": lambda y, x, a, b, s, seg: K.apply_lora(y, x, a, b, s, seg, mode="sgmv"),
        "triton_bgmv": lambda y, x, a, b, s, seg: K.apply_lora(y, x, a, b, s, seg, mode="bgmv"),
    }
    m["torch_ref"] = torch_ref.apply_lora
    if lora_variants.grouped_mm_available(device, dtype):
        m["grouped_mm"] = lora_variants.apply_lora_grouped_mm
    return m


def _projection_stacks(targets: tuple[str, ...], weights: dict, shape, rank: int, dtype: torch.dtype,
                       device: torch.device) -> ProjectionStacks:
    """The per-target weights laid out as the pool keeps one projection (server/lora/stacks.py)."""
    n_slots = weights[targets[0]][0].shape[0]
    stacks = ProjectionStacks.zeros(targets, tuple(shape.target_shape(t)[0] for t in targets),
                                    shape.target_shape(targets[0])[1], n_slots, rank, dtype, device)
    for g, t in enumerate(targets):
        a, b, scale = weights[t]
        for slot in range(n_slots):
            stacks.write(slot, g, a[slot], b[slot], float(scale[slot]))
    return stacks


def _shrink_for_interpreter(args: argparse.Namespace) -> bool:
    """CPU run: select Triton's interpreter and cut the sweep to seconds; False when Triton cannot run."""
    # Triton runs on CPU only through its interpreter, which must be chosen before import.
    can_interpret = "triton" not in sys.modules or os.environ.get("TRITON_INTERPRET") == "1"
    os.environ["TRITON_INTERPRET"] = "1"
    if not can_interpret:
        print("note: triton was imported before its interpreter could be chosen; "
              "timing the torch methods only", file=sys.stderr)
    # The interpreter runs programs one by one: keep the smoke run to seconds.
    args.batch = [2]
    args.mixes = [m for m in args.mixes if m in ("distinct", "identical")] or ["distinct"]
    args.targets = [t for t in args.targets if t in ("q", "down")] or args.targets[:1]
    args.iters = 1
    return can_interpret


def _random_weights(args: argparse.Namespace, shape, n_slots: int, device: torch.device, dtype: torch.dtype,
                    g: torch.Generator) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per target: A, B and scale for n_slots slots; slot 0 is the all-zero "no adapter" slot."""
    weights = {}
    for t in args.targets:
        o, i = shape.target_shape(t)
        a = (torch.randn(n_slots, args.rank, i, device=device, generator=g) / i ** 0.5).to(dtype)
        b = (torch.randn(n_slots, o, args.rank, device=device, generator=g) * 0.02).to(dtype)
        a[0], b[0] = 0, 0
        scale = torch.full((n_slots,), 2.0, device=device)
        scale[0] = 0
        weights[t] = (a, b, scale)
    return weights


Emit = Callable[[list[dict]], None]  # records the rows of one finished (mix, B) (and rewrites the JSON)


def _time_methods(args: argparse.Namespace, K, shape, methods: dict, weights: dict, device: torch.device,
                  dtype: torch.dtype, g: torch.Generator, emit: Emit) -> None:
    """One row per (mix, B, target, method): microseconds per call and error against the fp32 reference."""
    for mix in args.mixes:
        for B in args.batch:
            rows = []
            # Sequence i uses slot adapter+1; the runner sorts sequences by slot.
            slots = sorted(s + 1 for s in punica_mix(mix, B, seed=args.seed))
            per_seq = args.prefill or 1
            seg = LoraSegments.from_sequences(slots, [per_seq] * B, device)
            T = seg.num_tokens
            for t in args.targets:
                a, b, scale = weights[t]
                o, i = shape.target_shape(t)
                x = (torch.randn(T, i, device=device, generator=g)).to(dtype)
                y0 = torch.randn(T, o, device=device, generator=g).to(dtype)
                want = methods["torch_ref"](y0.clone().float(), x.float(), a.float(), b.float(), scale, seg)
                for name, fn in methods.items():
                    got = fn(y0.clone(), x, a, b, scale, seg)
                    err = float((got.float() - want).abs().max() / want.abs().max())
                    y = y0.clone()
                    us = common.bench_us(lambda: fn(y, x, a, b, scale, seg), device,
                                         warmup=min(5, args.iters - 1), iters=args.iters)
                    rows.append({"mix": mix, "B": B, "tokens": T, "target": t, "method": name,
                                 "adapters": len(set(slots)), "us": us, "rel_err": err,
                                 "mode": K.pick_mode(seg) if name == "triton" else ""})
            emit(rows)


def _per_layer(rows: list[dict]) -> dict[tuple[str, int, str], float]:
    """(mix, B, method) -> microseconds summed over the targets."""
    layer: dict[tuple[str, int, str], float] = {}
    for r in rows:
        key = (r["mix"], r["B"], r["method"])
        layer[key] = layer.get(key, 0.0) + r["us"]
    return layer


def _print_layer_table(args: argparse.Namespace, layer: dict, names: list[str], shape, dtype: torch.dtype) -> None:
    table = []
    for mix in args.mixes:
        for B in args.batch:
            row = {"mix": mix, "B": B}
            row.update({n: layer.get((mix, B, n)) for n in names})
            row["fastest"] = min(names, key=lambda n: layer.get((mix, B, n), float("inf")))
            table.append(row)
    common.print_table(table, ["mix", "B", *names, "fastest"],
                       title=f"LoRA us per layer ({'+'.join(args.targets)}), shape {shape.name}, rank {args.rank}, "
                             f"{'prefill ' + str(args.prefill) if args.prefill else 'decode'}, {dtype}")


def _plot(args: argparse.Namespace, layer: dict, names: list[str], out) -> Optional[Path]:
    def draw(axes) -> None:
        for ax, mix in zip(axes, args.mixes):
            for n in names:
                ax.plot(args.batch, [layer[(mix, B, n)] for B in args.batch], marker="o", label=n)
            ax.set_title(mix)
            ax.set_xlabel("tokens in batch (B)")
            ax.set_xscale("log", base=2)
            ax.set_ylabel("us per layer")
            ax.grid(alpha=0.3)
        axes[0].legend()

    return common.plot(out, len(args.mixes), draw)


def _time_fused(args: argparse.Namespace, K, shape, methods: dict, weights: dict, device: torch.device,
                dtype: torch.dtype, g: torch.Generator, emit: Emit) -> dict:
    """`triton_fused` rows: `apply_lora_fused` once per projection whose targets are all measured,
    checked against the reference target by target; returns the projections it covered."""
    fused = {targets: K.FusedLora.of(_projection_stacks(targets, weights, shape, args.rank, dtype, device))
             for targets in PROJECTIONS if all(t in args.targets for t in targets)}
    for mix in args.mixes:
        for B in args.batch:
            rows = []
            slots = sorted(s + 1 for s in punica_mix(mix, B, seed=args.seed))
            seg = LoraSegments.from_sequences(slots, [args.prefill or 1] * B, device)
            T = seg.num_tokens
            for targets, fl in fused.items():
                x = torch.randn(T, fl.stacks.a.shape[2], device=device, generator=g).to(dtype)
                y0 = torch.randn(T, sum(fl.stacks.widths), device=device, generator=g).to(dtype)
                want, lo = y0.clone().float(), 0
                for t in targets:
                    a, b, scale = weights[t]
                    hi = lo + b.shape[1]
                    want[:, lo:hi] = methods["torch_ref"](want[:, lo:hi].clone(), x.float(), a.float(),
                                                          b.float(), scale, seg)
                    lo = hi
                got = K.apply_lora_fused(y0.clone(), x, fl, seg)
                err = float((got.float() - want).abs().max() / want.abs().max())
                y = y0.clone()
                us = common.bench_us(lambda: K.apply_lora_fused(y, x, fl, seg), device,
                                     warmup=min(5, args.iters - 1), iters=args.iters)
                rows.append({"mix": mix, "B": B, "tokens": T, "target": "+".join(targets), "method": "triton_fused",
                             "adapters": len(set(slots)), "us": us, "rel_err": err, "mode": K.pick_mode(seg)})
            emit(rows)
    return fused


def _time_base_linears(args: argparse.Namespace, shape, device: torch.device, dtype: torch.dtype,
                       g: torch.Generator) -> list[dict]:
    """The int8 base's matmul per fused projection (q/k/v, o, gate/up, down) at each decode B: our Triton kernel
    (server/model/int8_triton.py, what QuantLinear runs on CUDA) vs the dense weight in the run's dtype (cuBLAS,
    `--quantize none`) vs torch's
    `_weight_int8pack_mm` (what ran before), with the weight bytes each reads and the GB/s that makes: a decode
    step is memory-bound, so GB/s against the device's copy bandwidth is its roofline share."""
    from server.model import int8_triton
    from server.model.quant import quantize_int8

    rows = []
    for targets in PROJECTIONS:
        proj = "+".join(targets)
        outs = [shape.target_shape(t) for t in targets]
        n, k = sum(o for o, _ in outs), outs[0][1]
        w = torch.randn(n, k, device=device, generator=g) / k ** 0.5
        q, scale = quantize_int8(w, dtype)
        dense = w.to(dtype)
        methods = {"int8_triton": (lambda x: int8_triton.int8_matmul(x, q, scale), n * k),
                   "dense": (lambda x: torch.nn.functional.linear(x, dense), dense.element_size() * n * k)}
        if device.type == "cuda" and hasattr(torch.ops.aten, "_weight_int8pack_mm"):
            methods["int8pack_mm"] = (lambda x: torch._weight_int8pack_mm(x, q, scale), n * k)
        for B in args.batch:
            x = torch.randn(B, k, device=device, generator=g).to(dtype)
            want = x.float() @ (q.float() * scale.float()[:, None]).t()
            for name, (fn, nbytes) in methods.items():
                err = float((fn(x).float() - want).abs().max() / want.abs().max()) if name != "dense" else 0.0
                us = common.bench_us(lambda: fn(x), device, warmup=min(5, args.iters - 1), iters=args.iters)
                rows.append({"projection": proj, "n": n, "k": k, "B": B, "method": name, "us": us,
                             "weight_mb": nbytes / 1e6, "gb_per_s": nbytes / us / 1e3, "rel_err": err})
    return rows


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = common.resolve_args(args)
    can_interpret = _shrink_for_interpreter(args) if device.type == "cpu" else False
    from server.lora import triton_sgmv as K

    shape = SHAPES[args.shape]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(args.seed)
    methods = _methods(K, device, dtype, with_triton=device.type == "cuda" or can_interpret)
    weights = _random_weights(args, shape, max(args.batch) + 1, device, dtype, g)
    rows: list[dict] = []
    payload = {"benchmark": "gpu_kernels", "machine": common.machine_info(device), "shape": shape.to_dict(),
               "workload": {"batch": args.batch, "mixes": args.mixes, "rank": args.rank, "targets": args.targets,
                            "prefill_tokens_per_seq": args.prefill, "dtype": str(dtype), "iters": args.iters,
                            "seed": args.seed},
               "per_target": rows, "per_layer": [], "max_rel_err": None,
               "note": "CPU dry run under the Triton interpreter: times are meaningless"
                       if device.type == "cpu" else ""}

    def emit(new_rows: list[dict]) -> None:
        rows.extend(new_rows)
        payload["per_layer"] = [{"mix": m, "B": B, "method": meth, "layer_us": us}
                                for (m, B, meth), us in _per_layer(rows).items()]
        payload["max_rel_err"] = max(r["rel_err"] for r in rows)
        common.write_json(args.out, payload)  # after every (mix, B): a run cut short keeps what it measured

    if device.type == "cuda" or can_interpret:  # the int8 base first: the e2e step's int8 rows depend on it
        base = _time_base_linears(args, shape, device, dtype, g)
        payload["base_linears"] = base
        common.write_json(args.out, payload)
        common.print_table(base, ["projection", "B", "method", "us", "weight_mb", "gb_per_s", "rel_err"],
                           title=f"base linears of one layer, shape {shape.name}, {dtype}: int8 (ours, torch's) "
                                 "vs dense")
    _time_methods(args, K, shape, methods, weights, device, dtype, g, emit)
    fused = _time_fused(args, K, shape, methods, weights, device, dtype, g, emit) if "triton" in methods else {}
    layer = _per_layer(rows)
    # The fused method's layer sum compares with the others only when its projections cover every target.
    covers_all = {t for targets in fused for t in targets} == set(args.targets)
    names = list(methods) + (["triton_fused"] if fused and covers_all else [])
    _print_layer_table(args, layer, names, shape, dtype)
    worst = payload["max_rel_err"]
    print(f"max relative error vs reference over all runs: {worst:.2e}")
    out = Path(args.out)  # written by the last emit
    print(common.wrote(out, _plot(args, layer, names, out)))
    if worst > (2e-2 if dtype != torch.float32 else 1e-4):
        print(f"FAIL: a method disagrees with the reference (max relative error {worst:.2e})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
