"""benchmarks/lora_row_bits.py: its row formats round as their names say, and a run scores them in order."""
from __future__ import annotations

import json

import pytest
import torch

from benchmarks import lora_row_bits
from server.lora.stacks import quantize_rows


def test_formats_round_rows_as_named():
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(6, 128, generator=g)
    assert torch.equal(lora_row_bits.round_rows(rows, 0, 0), rows)
    q, scale = quantize_rows(rows)
    assert torch.equal(lora_row_bits.round_rows(rows, 8, 0), q.float() * scale[:, None])  # what the kernels serve
    for bits, group in ((6, 0), (5, 64), (4, 0), (4, 32)):
        got = lora_row_bits.round_rows(rows, bits, group)
        parts = rows.view(6, -1, group or 128)
        step = parts.abs().amax(-1, keepdim=True) / (2 ** (bits - 1) - 1)
        assert ((got.view_as(parts) - parts).abs() <= step / 2 + 1e-6).all()  # within half a step of its scale
        levels = (got.view_as(parts) / step).round().unique()
        assert levels.numel() <= 2 ** bits - 1
    assert lora_row_bits.bits_per_weight(8, 0, 576) == pytest.approx(8 + 32 / 576)
    assert lora_row_bits.bits_per_weight(4, 32, 576) == 5.0


@pytest.mark.slow
def test_a_run_ranks_the_formats_by_their_bits(tmp_path):
    """One adapter, 64 tokens: fp32 rows are the reference (no error), and fewer bits change more of the
    adapter's effect (int8 rows a small share of it, int4 rows several times more)."""
    out = tmp_path / "bits.json"
    assert lora_row_bits.main(["--adapters", "1", "--tokens", "64", "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    runs = {name: r[0] for name, r in got["runs"].items()}
    assert runs["fp32"]["delta_error"] == 0 and runs["fp32"]["top1"] == 1
    assert 0 < runs["bf16"]["delta_error"] < runs["int8/row"]["delta_error"] < 0.05
    assert runs["int8/row"]["delta_error"] * 4 < runs["int4/row"]["delta_error"]
    assert got["adapter_kl_vs_base"] > 100 * runs["int8/row"]["kl"]
    assert [f["format"] for f in got["formats"]] == list(lora_row_bits.FORMATS)
