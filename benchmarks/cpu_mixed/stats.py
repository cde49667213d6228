"""From timings to the numbers in the table: per-system rows, paired per-round ratios, goals, agreement."""
from __future__ import annotations

from typing import Any

from benchmarks.common import median
from benchmarks.cpu_mixed.config import GOAL_LORA_OVERHEAD, GOAL_SPEEDUP, REFERENCE
from benchmarks.cpu_mixed.timings import SystemResult


def _agreement(a: list[list[int]], b: list[list[int]]) -> dict[str, Any]:
    """How many requests produced identical tokens, and the mean length of the common prefix."""
    same = sum(x == y for x, y in zip(a, b))
    prefix = []
    for x, y in zip(a, b):
        n = 0
        while n < min(len(x), len(y)) and x[n] == y[n]:
            n += 1
        prefix.append(n)
    return {"identical_requests": same, "requests": len(a), "mean_common_prefix": sum(prefix) / max(len(a), 1)}


def paired(slow: SystemResult, fast: SystemResult) -> list[float]:
    """Round by round, slow's wall time over fast's. Round r of both ran close together (the same
    child back to back for an engine with and without adapters; consecutive children otherwise),
    so a ratio per round cancels the drift that a ratio of two medians, each from different
    rounds, keeps: on the shared 2-core machine whole rounds run up to 30% slower than others."""
    return [a.wall_s / b.wall_s for a, b in zip(slow.runs, fast.runs)]


def summarize(results: list[SystemResult]) -> list[dict[str, Any]]:
    """Rows for the table and JSON. The ratios are medians of per-round ratios (`paired`); the
    ratios of the medians are kept beside them ("_of_medians") for comparison with older runs."""
    by = {r.system: r for r in results}
    ref = by.get(REFERENCE)
    rows = []
    for r in results:
        row: dict[str, Any] = {
            "system": r.system, "description": r.description, "adapters": r.adapters, "dtype": r.dtype,
            "quantize": r.quantize, "tokens_per_run": r.tokens, "wall_s": r.wall_s, "tok_s": r.tok_s,
            "request_latency_s": r.latency_s, "ttft_s": r.ttft_s,
            "runs_wall_s": [t.wall_s for t in r.runs],
            "x_peft_mixed": None, "x_peft_mixed_rounds": None, "x_peft_mixed_of_medians": None,
            "lora_overhead": None, "lora_overhead_rounds": None, "lora_overhead_of_medians": None,
        }
        if ref is not None:
            row["x_peft_mixed_rounds"] = paired(ref, r)
            row["x_peft_mixed"] = median(row["x_peft_mixed_rounds"])
            row["x_peft_mixed_of_medians"] = r.tok_s / ref.tok_s
        base = by.get(r.system + "-base") if r.system.startswith("loraserve") and not r.system.endswith(
            "-base") else None
        if base is not None:
            row["lora_overhead_rounds"] = [x - 1.0 for x in paired(r, base)]
            row["lora_overhead"] = median(row["lora_overhead_rounds"])
            row["lora_overhead_of_medians"] = base.tok_s / r.tok_s - 1.0
        # Same-work check: our adapter runs against PEFT mixed, our base runs against transformers.
        other = by.get("hf-base") if r.adapters == "none" else (ref if r.adapters.endswith("distinct") else None)
        if other is not None and other is not r:
            row["agreement_with"] = other.system
            row["agreement"] = _agreement(r.outputs, other.outputs)
        row.update(r.extra)
        rows.append(row)
    return rows


def goals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per engine with adapters: its ratios against the goals, and how many rounds met each."""
    by = {r["system"]: r for r in rows}
    out: dict[str, Any] = {}
    for name in ("loraserve", "loraserve-none"):
        r = by.get(name)
        if r is None:
            continue
        rounds = r["lora_overhead_rounds"] or []
        out[name] = {
            "rounds_overhead_met": f"{sum(x <= GOAL_LORA_OVERHEAD for x in rounds)}/{len(rounds)}",
            "rounds_speedup_met": f"{sum(x >= GOAL_SPEEDUP for x in r['x_peft_mixed_rounds'] or [])}"
                                  f"/{len(r['x_peft_mixed_rounds'] or [])}",
            "x_peft_mixed": r["x_peft_mixed"],
            "speedup_goal": GOAL_SPEEDUP,
            "speedup_met": None if r["x_peft_mixed"] is None else r["x_peft_mixed"] >= GOAL_SPEEDUP,
            "lora_overhead": r["lora_overhead"],
            "overhead_goal": GOAL_LORA_OVERHEAD,
            "overhead_met": None if r["lora_overhead"] is None else r["lora_overhead"] <= GOAL_LORA_OVERHEAD,
        }
    return out
