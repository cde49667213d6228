"""The workload generator's statistics, the roofline arithmetic, and CPU smoke runs of the GPU scripts."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import roofline
from benchmarks.workload import (MIXES, WorkloadConfig, percentiles, prompt_ids, punica_mix, slora_requests,
                                 summarize)

ROOT = Path(__file__).resolve().parents[2]


def test_slora_trace_is_reproducible_and_in_range():
    cfg = WorkloadConfig(num_adapters=50, alpha=0.5, rate=3.0, cv=1.0, num_requests=300,
                         input_range=(8, 64), output_range=(4, 16), seed=7)
    a, b = slora_requests(cfg), slora_requests(cfg)
    assert a == b
    assert slora_requests(WorkloadConfig(**{**cfg.to_dict(), "seed": 8})) != a
    assert [r.index for r in a] == list(range(300))
    arr = [r.arrival_s for r in a]
    assert all(x < y for x, y in zip(arr, arr[1:])) and arr[0] > 0
    assert all(0 <= r.adapter < 50 and 8 <= r.prompt_len < 64 and 4 <= r.output_len < 16 for r in a)


def test_arrival_rate_and_burstiness_follow_rate_and_cv():
    for cv in (1.0, 3.0):
        trace = slora_requests(WorkloadConfig(rate=5.0, cv=cv, num_requests=20000, seed=1))
        gaps = np.diff([0.0] + [r.arrival_s for r in trace])
        assert gaps.mean() == pytest.approx(1 / 5.0, rel=0.05)
        assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.08)


def test_power_law_popularity():
    """numpy power(alpha): alpha = 1 spreads evenly, alpha < 1 piles onto the first adapters."""
    even = slora_requests(WorkloadConfig(num_adapters=100, alpha=1.0, num_requests=20000, seed=2))
    skew = slora_requests(WorkloadConfig(num_adapters=100, alpha=0.1, num_requests=20000, seed=2))
    share_first10 = lambda t: sum(r.adapter < 10 for r in t) / len(t)  # noqa: E731
    assert share_first10(even) == pytest.approx(0.10, abs=0.015)
    # P(p < 0.1) = 0.1 ** alpha = 0.79 for alpha 0.1
    assert share_first10(skew) == pytest.approx(0.1 ** 0.1, abs=0.02)
    assert summarize(skew)["top_adapter_share"] > 5 * summarize(even)["top_adapter_share"]
    assert summarize(even)["distinct_adapters"] == 100


def test_punica_mixes():
    assert punica_mix("distinct", 8) == list(range(8))
    assert punica_mix("identical", 8) == [0] * 8
    uni = punica_mix("uniform", 64, seed=3)
    assert sorted(set(uni)) == list(range(8)) and all(uni.count(i) == 8 for i in range(8))
    sk = punica_mix("skewed", 64, seed=3)
    counts = [sk.count(i) for i in range(max(sk) + 1)]
    assert counts == sorted(counts, reverse=True) and counts[0] > 64 / len(counts)
    assert punica_mix("skewed", 64, seed=3) == sk
    for m in MIXES:
        assert len(punica_mix(m, 5)) == 5
    with pytest.raises(ValueError, match="unknown mix"):
        punica_mix("zipfian", 4)


def test_bad_configs_are_refused():
    for bad, words in ((dict(num_adapters=0), "num_adapters is 0"), (dict(alpha=0), "alpha is 0"),
                       (dict(rate=0), "must both be > 0"), (dict(cv=-1), "must both be > 0"),
                       (dict(input_range=(5, 5)), "input_range is"), (dict(output_range=(0, 4)), "output_range is")):
        with pytest.raises(ValueError, match=words):
            slora_requests(WorkloadConfig(**bad))


def test_helpers():
    p = prompt_ids(16, 1000, seed=4)
    assert p == prompt_ids(16, 1000, seed=4) and len(p) == 16 and all(10 <= t < 1000 for t in p)
    q = percentiles([1.0, 2.0, 3.0, 4.0, 100.0])
    assert q["p50"] == 3.0 and q["mean"] == 22.0 and 90 < q["p99"] <= 100
    assert np.isnan(percentiles([])["p50"])


def test_roofline_bytes():
    s = roofline.SHAPES["1b"]
    # Llama 3.2 1B: 0.97 B parameters in the 7 per-layer linears, 16 layers.
    assert s.linear_params() == 16 * (2048 * 2048 * 2 + 2048 * 512 * 2 + 3 * 2048 * 8192)
    none = roofline.decode_step_bytes(s, 32, 192, adapters=32, rank=16, quantize="none")
    int8 = roofline.decode_step_bytes(s, 32, 192, adapters=32, rank=16, quantize="int8")
    assert int8["base_linears"] * 2 == none["base_linears"]
    assert none["lora"] == 32 * 16 * 16 * (2048 + 2048 + 2 * (512 + 2048) + 2048 + 2048 + 3 * (8192 + 2048)) * 2
    assert none["kv_read"] == 32 * 192 * 16 * 2 * 8 * 64 * 2
    assert none["total"] == pytest.approx(sum(v for k, v in none.items() if k != "total"))
    # Identical adapters in the batch cost one adapter's weights; distinct ones scale with B.
    one = roofline.decode_step_bytes(s, 32, 192, adapters=1, rank=16)
    assert one["lora"] * 32 == none["lora"]
    tps = roofline.roofline_tokens_per_s(none["total"], 32, 3.35e12)
    assert tps == pytest.approx(32 * 3.35e12 / none["total"])
    with pytest.raises(ValueError, match="quantize must be none, int8 or int4, not 'fp8'"):
        roofline.weight_bytes_per_param("fp8", 2)


# ----------------------------------------------------------------------------- the GPU scripts on CPU


def test_scripts_refuse_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from benchmarks import gpu_coldload, gpu_e2e, gpu_kernels, gpu_slora

    for mod in (gpu_kernels, gpu_e2e, gpu_slora, gpu_coldload):
        with pytest.raises(SystemExit) as e:
            mod.main(["--out", "/nonexistent/x.json"])
        assert e.value.code == 2, mod.__name__


def _check_outputs(out: Path, benchmark: str) -> dict:
    data = json.loads(out.read_text())
    assert data["benchmark"] == benchmark
    assert data["machine"]["torch"] and data["machine"]["date"] and data["shape"]["name"] == "tiny"
    png = out.with_suffix(".png")
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return data


@pytest.mark.slow
def test_engine_scripts_dry_run(tmp_path, capsys):
    """gpu_e2e, gpu_slora and gpu_coldload end to end on a tiny random model, in this process."""
    from benchmarks import gpu_coldload, gpu_e2e, gpu_slora

    work = str(tmp_path / "work")
    assert gpu_e2e.main(["--dry-run", "--out", str(tmp_path / "e2e.json"), "--workdir", work]) == 0
    e2e = _check_outputs(tmp_path / "e2e.json", "gpu_e2e")
    systems = {r["system"] for r in e2e["results"]}
    assert systems == {"loraserve", "loraserve_identical", "loraserve_base", "peft_mixed", "roofline"}
    assert all(r["complete"] for r in e2e["results"] if "complete" in r)
    assert {d["quantize"] for d in e2e["derived"]} == {"none", "int8"}

    assert gpu_slora.main(["--dry-run", "--out", str(tmp_path / "slora.json"), "--workdir", work]) == 0
    sl = _check_outputs(tmp_path / "slora.json", "gpu_slora")["results"][0]
    assert sl["failed"] == 0 and sl["requests"] == 12 and sl["adapter_loads"] >= 3
    assert sl["ttft_s"]["p50"] <= sl["e2e_s"]["p50"]

    assert gpu_coldload.main(["--dry-run", "--out", str(tmp_path / "cold.json"), "--workdir", work]) == 0
    cold = _check_outputs(tmp_path / "cold.json", "gpu_coldload")["results"][0]
    assert len(cold["cold_loads"]) == 2 and all(x["seconds"] > 0 for x in cold["cold_loads"])
    assert len(cold["host_loads"]) == 2 and cold["itl_host_p99_ratio"] > 0
    assert "loraserve_identical" in capsys.readouterr().out


@pytest.mark.slow
def test_kernel_script_dry_run(tmp_path):
    """gpu_kernels under the Triton interpreter, in a child (the interpreter is chosen at triton's import)."""
    pytest.importorskip("triton")
    out = tmp_path / "k.json"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1")
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_kernels", "--dry-run", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = _check_outputs(out, "gpu_kernels")
    methods = {r["method"] for r in data["per_target"]}
    assert {"triton", "triton_sgmv", "triton_bgmv", "torch_ref"} <= methods
    assert data["max_rel_err"] < 1e-4
