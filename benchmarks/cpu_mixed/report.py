"""The printed report: title, one table row per system, and a verdict line per goal."""
from __future__ import annotations

from typing import Any, Callable, Optional

from benchmarks.common import print_table


def _pct(v: Optional[float]) -> Optional[str]:
    return None if v is None else f"{100 * v:+.1f}%"


def _spread(v: Optional[float], rounds: Optional[list[float]], fmt: Callable[[float], str]) -> Optional[str]:
    return None if v is None else f"{fmt(v)} ({fmt(min(rounds))}..{fmt(max(rounds))})" if rounds else fmt(v)


def print_report(payload: dict[str, Any]) -> str:
    """Print the report of a run's payload; returns its text (the payload keeps it as "table")."""
    w, m = payload["workload"], payload["model"]
    title = (f"cpu_mixed: {w['requests']} concurrent requests, {w['distinct_adapters']} distinct rank-{w['rank']} "
             f"adapters on {'/'.join(w['targets'])}, prompt {w['prompt_len']}, {w['new_tokens']} new tokens, "
             f"greedy, median of {w['repeats']} warm runs; ratios: median of per-round ratios (range)\n"
             f"model: {m.get('name')} ({m.get('layers')} layers, hidden {m.get('hidden')}, "
             f"intermediate {m.get('intermediate')}, {m.get('heads')}/{m.get('kv_heads')} heads, "
             f"vocab {m.get('vocab')})\nmachine: {payload['machine_line']}\n")
    table = []
    for r in payload["results"]:
        ag = r.get("agreement")
        table.append({
            "system": r["system"], "adapters": r["adapters"], "quant": r["quantize"], "dtype": r["dtype"],
            "tok/s": r["tok_s"], "s/run": r["wall_s"], "s/request": r["request_latency_s"],
            "ttft s": r["ttft_s"],
            "x PEFT mixed": _spread(r["x_peft_mixed"], r["x_peft_mixed_rounds"], lambda v: f"{v:.2f}"),
            "LoRA overhead": _spread(r["lora_overhead"], r["lora_overhead_rounds"], lambda v: f"{100 * v:+.1f}%"),
            "same tokens": None if ag is None else f"{ag['identical_requests']}/{ag['requests']} vs {r['agreement_with']}",
        })
    cols = ["system", "adapters", "quant", "dtype", "tok/s", "s/run", "s/request", "ttft s", "x PEFT mixed",
            "LoRA overhead", "same tokens"]
    print(title, end="")
    text = title + print_table(table, cols)
    lines = []
    for name, g in payload["goals"].items():
        def verdict(met: Optional[bool]) -> str:
            return "n/a" if met is None else ("met" if met else "NOT met")

        x = "n/a" if g["x_peft_mixed"] is None else f"{g['x_peft_mixed']:.2f}x"
        lines.append(f"goal {name}: {x} PEFT mixed (goal >= {g['speedup_goal']:g}x: {verdict(g['speedup_met'])}), "
                     f"LoRA overhead {_pct(g['lora_overhead']) or 'n/a'} "
                     f"(goal <= {100 * g['overhead_goal']:.0f}%: {verdict(g['overhead_met'])}); "
                     f"rounds meeting each: {g['rounds_speedup_met']}, {g['rounds_overhead_met']}")
    if lines:
        print("\n".join(lines))
        text += "\n" + "\n".join(lines)
    return text
