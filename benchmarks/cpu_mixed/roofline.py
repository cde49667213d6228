"""Where a step's time goes: this machine's limits, measured in the same run, against each step's work.

Two limits bound a step on a CPU: bytes it must stream from memory over the machine's read
bandwidth, and the arithmetic over its fp32 matmul peak. Both are measured here, in the
parent process while the children idle between phases: the bandwidth as a large read
(`torch.sum` over 512 MB), the peak as a large GEMM (2048^3 fp32), each the best of a few
tries (interference only slows them). For the no-adapter decode step, the decode step with
the run's distinct adapters and the prefill, the report gives bytes moved and FLOPs, the
floor each implies, and the measured step as a fraction of the larger floor ("of floor":
floor / measured, 100% = at the limit). The int8 base multiplies on the integer units,
which run faster than the fp32 peak, so its compute floor can be beaten; the byte floor
cannot. Activations (a few MB) are left out of the bytes.

Measured steps come from the engine runs' timings: the prefill is the time to the last
request's first token (all prompts prefill in one step), a decode step the rest of the run
over the remaining tokens. Both include the engine's own overheads (scheduling, sampling,
detokenizing, streaming), as a user sees them.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch

from benchmarks.common import median
from benchmarks.cpu_mixed.config import GOAL_DECODE_OF_FLOOR, BenchConfig
from benchmarks.cpu_mixed.timings import SystemResult
from benchmarks.roofline import ALL_TARGETS, ModelShape

READ_BYTES = 512 * 2**20
GEMM_N = 2048


def measure_read_bandwidth(nbytes: int = READ_BYTES, tries: int = 5) -> float:
    """Bytes/s of a large streaming read (fp32 sum, torch's threads), best of `tries`."""
    x = torch.ones(nbytes // 4)
    x.sum()
    best = float("inf")
    for _ in range(tries):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


def measure_fp32_peak(n: int = GEMM_N, tries: int = 3) -> float:
    """FLOP/s of a large fp32 GEMM (torch's threads), best of `tries`."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(tries):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def measure_limits() -> dict[str, float]:
    return {"read_bytes_per_s": measure_read_bandwidth(), "fp32_flops_per_s": measure_fp32_peak(),
            "threads": torch.get_num_threads()}


def best_limits(samples: list[dict[str, float]]) -> dict[str, Any]:
    """The machine's limits over several measurements (the best of each), with the samples."""
    return {"read_bytes_per_s": max(s["read_bytes_per_s"] for s in samples),
            "fp32_flops_per_s": max(s["fp32_flops_per_s"] for s in samples), "samples": samples}


@dataclass
class StepCost:
    step: str
    bytes: float
    flops: float
    parts: dict[str, float]

    def floors(self, limits: dict[str, Any]) -> tuple[float, float]:
        """(byte floor, compute floor) in seconds."""
        return self.bytes / limits["read_bytes_per_s"], self.flops / limits["fp32_flops_per_s"]


def shape_of(model: dict[str, Any]) -> ModelShape:
    """A ModelShape from the payload's model description (systems.model_shape)."""
    return ModelShape("bench", model["vocab"], model["hidden"], model["intermediate"], model["layers"],
                      model["heads"], model["kv_heads"], model["tie_word_embeddings"])


def step_costs(shape: ModelShape, cfg: BenchConfig, quantize: str) -> dict[str, StepCost]:
    """Bytes and FLOPs of the workload's steps for an engine storing its base as `quantize`.

    Base weights: int8 is one byte a weight plus 8 bytes a row (scale, row sum), `none` fp32;
    the output projection likewise (int8 keeps its own copy of the tied embedding). Adapters:
    the run's distinct adapters, all seven targets at the run's rank, read as the CPU kernel's int8
    copies (a byte a weight and a 4-byte scale a rank row of A and of B^T) where the base is quantized
    and fp32 otherwise. KV cache fp32, a decode step at the mean context (prompt + half the new tokens).
    """
    wb, lb = (1.0, 1) if quantize != "none" else (4.0, 4)
    rows_extra = 8 if quantize != "none" else 0
    layer_rows = sum(shape.target_shape(t)[0] for t in ALL_TARGETS) * shape.num_layers
    base = shape.linear_params() * wb + layer_rows * rows_extra
    head = shape.vocab_size * shape.hidden_size * wb + shape.vocab_size * rows_extra
    per_adapter = shape.num_layers * sum(cfg.rank * (o + i) for o, i in (shape.target_shape(t) for t in ALL_TARGETS))
    row_scales = shape.num_layers * len(ALL_TARGETS) * cfg.rank * 2 * 4 if quantize != "none" else 0
    lora = cfg.adapters * (per_adapter * lb + row_scales)
    kv_token = 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * 4
    B, P = cfg.requests, cfg.prompt_len
    ctx = P + cfg.new_tokens / 2
    attn_decode = 4 * B * ctx * shape.num_heads * shape.head_dim * shape.num_layers
    attn_prefill = 4 * B * (P * (P + 1) / 2) * shape.num_heads * shape.head_dim * shape.num_layers
    head_flops = 2 * B * shape.vocab_size * shape.hidden_size

    def cost(step: str, rows: int, with_lora: bool, kv_bytes: float, attn: float) -> StepCost:
        parts = {"base_weights": base, "lm_head": head, "lora": lora if with_lora else 0.0, "kv_cache": kv_bytes}
        flops = 2 * rows * shape.linear_params() + head_flops + attn + (2 * rows * per_adapter if with_lora else 0)
        return StepCost(step, sum(parts.values()), flops, parts)

    return {
        "decode, no adapters": cost("decode, no adapters", B, False, B * ctx * kv_token + B * kv_token, attn_decode),
        f"decode, {cfg.adapters} adapters": cost(f"decode, {cfg.adapters} adapters", B, True,
                                                 B * ctx * kv_token + B * kv_token, attn_decode),
        f"prefill, {cfg.adapters} adapters": cost(f"prefill, {cfg.adapters} adapters", B * P, True,
                                                  B * P * kv_token, attn_prefill),
    }


def measured_steps(result: SystemResult, cfg: BenchConfig) -> Optional[dict[str, float]]:
    """(prefill s, decode step s) of an engine system: medians over its runs; None without TTFTs."""
    runs = result.runs
    if not runs or not all(r.ttft_s for r in runs) or cfg.new_tokens < 2:
        return None
    prefill = [max(r.ttft_s) for r in runs]
    decode = [(r.wall_s - max(r.ttft_s)) / (cfg.new_tokens - 1) for r in runs]
    return {"prefill_s": median(prefill), "decode_step_s": median(decode)}


def roofline(results: list[SystemResult], model: dict[str, Any], cfg: BenchConfig,
             limits: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The roofline section of the payload for loraserve (cfg.quantize), None without its systems."""
    by = {r.system: r for r in results}
    lora_m = measured_steps(by["loraserve"], cfg) if "loraserve" in by else None
    base_m = measured_steps(by["loraserve-base"], cfg) if "loraserve-base" in by else None
    if not (lora_m or base_m):
        return None
    costs = step_costs(shape_of(model), cfg, cfg.quantize)
    measured = {"decode, no adapters": base_m and base_m["decode_step_s"],
                f"decode, {cfg.adapters} adapters": lora_m and lora_m["decode_step_s"],
                f"prefill, {cfg.adapters} adapters": lora_m and lora_m["prefill_s"]}
    steps = []
    for name, c in costs.items():
        byte_s, flop_s = c.floors(limits)
        t = measured[name]
        steps.append({**asdict(c), "byte_floor_s": byte_s, "flop_floor_s": flop_s,
                      "floor_s": max(byte_s, flop_s), "measured_s": t,
                      "of_floor": None if not t else max(byte_s, flop_s) / t})
    dec = steps[0]["of_floor"]
    out: dict[str, Any] = {"limits": limits, "steps": steps, "lora_share": None,
                           "decode_goal": {"of_floor": dec, "goal": GOAL_DECODE_OF_FLOOR,
                                           "met": None if dec is None else dec >= GOAL_DECODE_OF_FLOOR}}
    if lora_m and base_m:
        lora_bytes = costs[f"decode, {cfg.adapters} adapters"].parts["lora"]
        extra = lora_m["decode_step_s"] - base_m["decode_step_s"]
        floor = lora_bytes / limits["read_bytes_per_s"]
        out["lora_share"] = {"lora_bytes": lora_bytes, "extra_decode_s": extra, "byte_floor_s": floor,
                             "of_floor": floor / extra if extra > 0 else None}
    return out


def format_roofline(r: dict[str, Any]) -> str:
    lim = r["limits"]
    lines = [f"roofline (measured in this run: read {lim['read_bytes_per_s'] / 1e9:.1f} GB/s, "
             f"fp32 GEMM {lim['fp32_flops_per_s'] / 1e9:.0f} GFLOP/s, {lim['samples'][0]['threads']} threads):",
             f"  {'step':<22} {'MB':>7} {'GFLOP':>7} {'bytes ms':>9} {'flops ms':>9} {'measured ms':>12} {'of floor':>9}"]
    for s in r["steps"]:
        t = "-" if s["measured_s"] is None else f"{1e3 * s['measured_s']:.1f}"
        f = "-" if s["of_floor"] is None else f"{100 * s['of_floor']:.0f}%"
        lines.append(f"  {s['step']:<22} {s['bytes'] / 1e6:>7.0f} {s['flops'] / 1e9:>7.1f} "
                     f"{1e3 * s['byte_floor_s']:>9.1f} {1e3 * s['flop_floor_s']:>9.1f} {t:>12} {f:>9}")
    g = r.get("decode_goal")
    if g and g["of_floor"] is not None:
        lines.append(f"  goal: the no-adapter decode step at >= {100 * g['goal']:.0f}% of its floor: "
                     f"{100 * g['of_floor']:.0f}%, {'met' if g['met'] else 'NOT met'}")
    ls = r.get("lora_share")
    if ls:
        f = "-" if ls["of_floor"] is None else f"{100 * ls['of_floor']:.0f}%"
        lines.append(f"  LoRA's share of a decode step: +{1e3 * ls['extra_decode_s']:.1f} ms against the "
                     f"{1e3 * ls['byte_floor_s']:.1f} ms its {ls['lora_bytes'] / 1e6:.0f} MB take to read ({f} of floor)")
    return "\n".join(lines)
