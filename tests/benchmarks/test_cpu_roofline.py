"""The CPU roofline of `make bench`: each step's bytes and FLOPs, the floors, and the steps read off the runs."""
from __future__ import annotations

import pytest

from benchmarks.cpu_mixed.config import BenchConfig
from benchmarks.cpu_mixed.roofline import (
    best_limits, format_roofline, measure_fp32_peak, measure_read_bandwidth, measured_steps, roofline, step_costs,
)
from benchmarks.cpu_mixed.timings import RunTiming, SystemResult
from benchmarks.roofline import ModelShape

SMOLLM2 = ModelShape("smollm2-135m", 49152, 576, 1536, 30, 9, 3, True)
MODEL = {"vocab": 49152, "hidden": 576, "intermediate": 1536, "layers": 30, "heads": 9, "kv_heads": 3,
         "tie_word_embeddings": True}


def test_step_costs_of_the_default_workload():
    cfg = BenchConfig()
    c = step_costs(SMOLLM2, cfg, "int8")
    dec, dec_lora, pre = c["decode, no adapters"], c["decode, 8 adapters"], c["prefill, 8 adapters"]
    # 8 distinct rank-16 adapters on all seven targets: 39.1 MB of int8 weights a step (78 MB as bf16, issue 16),
    # and a 4-byte scale for each of their 2 x 7 x 16 x 30 rank rows.
    assert dec_lora.parts["lora"] == pytest.approx(39.08e6 + 8 * 26880, rel=0.001) and dec.parts["lora"] == 0
    # int8 base: 106M linear weights plus the 28M-weight output projection, a byte each.
    assert dec.parts["base_weights"] + dec.parts["lm_head"] == pytest.approx(135e6, rel=0.02)
    # 512 prompt tokens through 106M weights: about 109 GFLOP, plus attention, LoRA and 8 sampled rows.
    assert 109e9 < pre.flops < 120e9 and 2.0e9 < dec.flops < 2.6e9
    assert step_costs(SMOLLM2, cfg, "none")["decode, no adapters"].parts["base_weights"] == pytest.approx(
        4 * SMOLLM2.linear_params())


def _result(name, walls, ttft):
    runs = [RunTiming(w, 256, [w] * 8, [t] * 8) for w, t in zip(walls, ttft)]
    return SystemResult(name, "", "", "float32", "int8", runs, [])


def test_roofline_reads_the_steps_off_the_runs_and_compares_with_the_floors():
    cfg = BenchConfig()
    lora, base = _result("loraserve", [1.6, 1.7, 1.5], [0.3, 0.3, 0.3]), _result("loraserve-base", [1.3] * 3, [0.2] * 3)
    assert measured_steps(lora, cfg) == pytest.approx({"prefill_s": 0.3, "decode_step_s": 1.3 / 31})
    limits = best_limits([{"read_bytes_per_s": 20e9, "fp32_flops_per_s": 200e9, "threads": 2},
                          {"read_bytes_per_s": 25e9, "fp32_flops_per_s": 150e9, "threads": 2}])
    assert limits["read_bytes_per_s"] == 25e9 and limits["fp32_flops_per_s"] == 200e9
    r = roofline([lora, base], MODEL, cfg, limits)
    steps = {s["step"]: s for s in r["steps"]}
    dec = steps["decode, no adapters"]
    assert dec["measured_s"] == pytest.approx(1.1 / 31)
    assert dec["floor_s"] == max(dec["bytes"] / 25e9, dec["flops"] / 200e9)
    assert dec["of_floor"] == pytest.approx(dec["floor_s"] / dec["measured_s"])
    assert r["decode_goal"]["met"] == (dec["of_floor"] >= 0.5)
    share = r["lora_share"]
    assert share["extra_decode_s"] == pytest.approx(0.2 / 31) and share["byte_floor_s"] == pytest.approx(39.3e6 / 25e9, rel=0.01)
    text = format_roofline(r)
    assert "decode, 8 adapters" in text and "LoRA's share" in text


def test_limits_are_measured():
    assert measure_read_bandwidth(16 * 2**20, tries=2) > 1e8
    assert measure_fp32_peak(256, tries=2) > 1e8
