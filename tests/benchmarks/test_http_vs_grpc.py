"""The HTTP-vs-gRPC benchmark's report: per-round ratios, pooled percentiles, and what it ran on."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from benchmarks import http_vs_grpc


def _summary(tps: float, itl: float) -> dict:
    return {"generated_tokens_per_s": tps, "requests_per_s": tps / 24, "ttft_p50_s": 0.5, "ttft_p99_s": 1.0,
            "itl_p50_s": itl, "itl_p99_s": 2 * itl, "latency_p50_s": 3.0}


def test_report_pairs_rounds_and_names_machine_model_workload(capsys) -> None:
    ns = argparse.Namespace(concurrency=16, requests=32, rounds=3, new_tokens=24, adapters=2, rank=16,
                            serve_args=[], load_before=(1.0, 1.0, 1.0), load_after=(2.0, 2.0, 2.0))
    rounds = [{"round": r, "order": ["grpc", "http"], "grpc": _summary(100.0 * (r + 1), 0.05),
               "http": _summary(97.0 * (r + 1), 0.051)} for r in range(3)]
    payload = http_vs_grpc.report(ns, rounds, Path("/models/smollm2"))
    assert payload["summary"]["http_over_grpc_tokens_per_s"] == pytest.approx(0.97)
    assert payload["summary"]["range"] == pytest.approx([0.97, 0.97])
    rows = {r["protocol"]: r for r in payload["summary"]["rows"]}
    assert rows["grpc"]["tok/s"] == 200 and rows["http"]["ITL p50 ms"] == pytest.approx(51)
    assert payload["machine"]["cpu_cores_usable"] >= 1 and "SmolLM2" in payload["model"]["name"]
    assert payload["workload"]["concurrency"] == 16 and payload["load_average"]["after"] == (2.0, 2.0, 2.0)
    out = capsys.readouterr().out
    assert "HTTP / gRPC tokens/s: 0.970" in out and "ITL p99 ms" in out
