"""The loraserve-vs-llama-server benchmark: what each server is asked, how rounds become ratios, the skip."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from benchmarks import llama_server
from benchmarks.llama_cpp import LlamaCpp, NotBuilt


def test_both_servers_get_the_same_request_and_name_the_adapter_their_own_way() -> None:
    lora = llama_server.Target("loraserve", "http://x", 1, ["a0", "a1"])
    llama = llama_server.Target("llama-server", "http://y", 2)
    prompt = list(range(100, 164))
    lb, cb = lora.body(prompt, 1, 32, False), llama.body(prompt, 1, 32, False)
    common = {"prompt": prompt, "max_tokens": 32, "temperature": 0, "ignore_eos": True, "stream": False}
    assert common.items() <= lb.items() and common.items() <= cb.items()
    assert lb["model"] == "a1" and "lora" not in lb
    assert cb["lora"] == [{"id": 1, "scale": 1.0}] and "model" not in cb
    assert lora.body(prompt, None, 32, True)["model"] == "default" and "lora" not in llama.body(prompt, None, 32, True)
    assert llama.body(prompt, None, 32, True)["stream_options"] == {"include_usage": True}


def test_rows_put_requests_on_the_adapters_the_issue_names() -> None:
    rows = {r.name: r for r in llama_server.ROWS}
    assert [rows["8 distinct adapters"].adapter_of(i) for i in range(8)] == list(range(8))
    assert {rows["one adapter x 8"].adapter_of(i) for i in range(8)} == {0}
    assert rows["base"].adapter_of(3) is None and rows["base, streamed"].stream


def test_llama_server_context_holds_every_slot_and_no_adapter_applies_by_default() -> None:
    ns = argparse.Namespace(requests=8, prompt_len=64, new_tokens=32, threads=2, llama_args=[])
    args = llama_server.llama_server_args(Path("m.gguf"), [Path("a0.gguf"), Path("a1.gguf")], ns)
    ctx = int(args[args.index("-c") + 1])
    assert args[args.index("-np") + 1] == "8" and ctx >= 8 * (64 + 32) and ctx % (8 * 256) == 0
    assert args[args.index("-t") + 1] == "2" and args[args.index("-tb") + 1] == "2"
    # Loaded at scale 0: a request without a `lora` field (the base rows) runs no adapter.
    assert [args[i + 1] for i, a in enumerate(args) if a == "--lora-scaled"] == ["a0.gguf:0", "a1.gguf:0"]


def _round(r: int, llama: list[float], lora: list[float]) -> dict:
    return {"round": r, "rows": {row.name: {"llama-server": {"tokens_per_s": a}, "loraserve": {"tokens_per_s": b}}
                                 for row, a, b in zip(llama_server.ROWS, llama, lora)}}


def test_ratios_are_medians_of_per_round_ratios_with_their_range(capsys) -> None:
    rounds = [_round(0, [100, 50, 80, 100], [120, 90, 100, 90]),
              _round(1, [100, 40, 80, 100], [110, 100, 70, 95]),
              _round(2, [50, 50, 80, 100], [60, 120, 75, 99])]
    ns = argparse.Namespace(requests=8, prompt_len=64, new_tokens=32, rank=16, seed=0)
    payload = llama_server.report(ns, rounds, {"dir": "/m"}, {}, {}, {"before": (1.0, 1, 1), "after": (2.0, 2, 2)})
    rows = {r["row"]: r for r in payload["summary"]["rows"]}
    assert rows["base"]["ratio"] == pytest.approx(1.2) and rows["base"]["met"]
    assert rows["8 distinct adapters"]["per_round"] == pytest.approx([1.8, 2.5, 2.4])
    assert rows["8 distinct adapters"]["ratio"] == pytest.approx(2.4) and rows["8 distinct adapters"]["met"]
    assert rows["one adapter x 8"]["ratio min"] == pytest.approx(0.875) and not rows["one adapter x 8"]["met"]
    assert rows["base, streamed"]["ratio"] == pytest.approx(0.95) and not payload["summary"]["all_goals_met"]
    assert rows["base"]["llama-server tok/s"] == 100 and rows["base"]["loraserve tok/s"] == 110
    assert payload["machine"]["cpu_cores_usable"] >= 1 and payload["workload"]["ignore_eos"]
    out = capsys.readouterr().out
    assert "2.40x (1.80-2.50)" in out and "NOT met" in out


def test_an_unbuilt_llama_cpp_is_reported_with_how_to_build_it(tmp_path) -> None:
    with pytest.raises(NotBuilt, match="make llama-server"):
        LlamaCpp(root=tmp_path).check()
