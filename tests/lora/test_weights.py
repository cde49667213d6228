"""PEFT adapters load exactly, and what cannot be served exactly is refused by name."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from server.core.errors import AdapterRejectedError
from server.lora.weights import load_peft_adapter
from server.model.config import ModelConfig


@pytest.fixture(scope="module")
def mcfg(tiny_dir):
    return ModelConfig.from_file(tiny_dir / "config.json")


def _copy(src, dst, edit_cfg=None, edit_tensors=None):
    shutil.copytree(src, dst)
    if edit_cfg:
        cfg = json.loads((dst / "adapter_config.json").read_text())
        edit_cfg(cfg)
        (dst / "adapter_config.json").write_text(json.dumps(cfg))
    if edit_tensors:
        t = load_file(str(dst / "adapter_model.safetensors"))
        edit_tensors(t)
        save_file(t, str(dst / "adapter_model.safetensors"))
    return dst


def test_scales_ranks_and_patterns(mcfg, tiny_adapters):
    w = load_peft_adapter(tiny_adapters["all_r8"], mcfg, 16)
    assert w.rank == 8 and w.targets == ("q", "k", "v", "o", "gate", "up", "down")
    assert all(m.scale == 2.0 for m in w.modules.values())
    rs = load_peft_adapter(tiny_adapters["mlp_rs"], mcfg, 16)
    assert rs.targets == ("gate", "up", "down")
    assert rs.modules[(0, "up")].scale == pytest.approx(8 / math.sqrt(16))
    p = load_peft_adapter(tiny_adapters["pattern"], mcfg, 16)
    assert p.modules[(1, "down")].rank == 6 and p.modules[(1, "down")].scale == pytest.approx(3 / 6)
    assert p.modules[(0, "o")].scale == pytest.approx(11 / 2)
    assert p.modules[(0, "k")].scale == pytest.approx(3 / 2)


@pytest.mark.parametrize("edit, words", [
    (lambda c: c.update(use_dora=True), "DoRA"),
    (lambda c: c.update(bias="lora_only"), "bias"),
    (lambda c: c.update(bias="all"), "bias"),
    (lambda c: c.update(modules_to_save=["lm_head"]), "modules_to_save"),
    (lambda c: c.update(peft_type="IA3"), "IA3"),
    (lambda c: c.update(r=5), "rank"),
])
def test_unsupported_config_is_refused_by_name(mcfg, tiny_adapters, tmp_path, edit, words):
    d = _copy(tiny_adapters["qv_r4"], tmp_path / "x", edit_cfg=edit)
    with pytest.raises(AdapterRejectedError, match=words):
        load_peft_adapter(d, mcfg, 16)


def test_rank_over_max_is_refused(mcfg, tiny_adapters):
    with pytest.raises(AdapterRejectedError, match="max rank 8"):
        load_peft_adapter(tiny_adapters["mlp_rs"], mcfg, 8)


@pytest.mark.parametrize("edit, words", [
    (lambda t: t.update({"base_model.model.lm_head.lora_A.weight": torch.zeros(4, 64)}), "lm_head"),
    (lambda t: t.update({"base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(4, 300)}), "embedding"),
    (lambda t: t.update({"base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": torch.zeros(64)}),
     "DoRA"),
    (lambda t: t.pop(next(k for k in list(t) if "lora_B" in k)), "both"),
    (lambda t: t.update({k: torch.full_like(v, float("nan")) for k, v in list(t.items())[:1]}), "NaN"),
    (lambda t: t.update({k: v[:, :-1].contiguous() for k, v in list(t.items()) if "lora_A" in k}), "base"),
    (lambda t: t.update({"base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight": torch.zeros(4, 64)}),
     "layer 9"),
])
def test_bad_tensors_are_refused(mcfg, tiny_adapters, tmp_path, edit, words):
    d = _copy(tiny_adapters["qv_r4"], tmp_path / "x", edit_tensors=edit)
    with pytest.raises(AdapterRejectedError, match=words):
        load_peft_adapter(d, mcfg, 16)


def test_pickle_bin_is_refused_with_conversion_hint(mcfg, tiny_adapters, tmp_path):
    d = _copy(tiny_adapters["qv_r4"], tmp_path / "x")
    (d / "adapter_model.safetensors").rename(d / "adapter_model.bin")
    with pytest.raises(AdapterRejectedError, match="pickle.*safetensors"):
        load_peft_adapter(d, mcfg, 16)


def test_truncated_file_is_refused(mcfg, tiny_adapters, tmp_path):
    d = _copy(tiny_adapters["qv_r4"], tmp_path / "x")
    f = d / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(AdapterRejectedError, match="safetensors"):
        load_peft_adapter(d, mcfg, 16)
