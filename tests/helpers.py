"""Builders shared by the tests: tiny random Llama checkpoints, a byte-level tokenizer, PEFT adapters."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rope_theta=10000.0, tie_word_embeddings=True,
            bos_token_id=256, eos_token_id=257, pad_token_id=258)


def byte_tokenizer():
    """A real (fast, byte-level) tokenizer with 256 byte tokens and three specials: ids 256-258."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>", "<pad>"])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}<s>assistant: {% endif %}")
    return fast


def make_tiny_model_dir(path: Path, seed: int = 0, std: float = 0.08, **overrides) -> Path:
    """Save a random-weight Llama with its tokenizer in Hugging Face format.

    A larger init std than transformers' default makes the logits peaked, so greedy
    decoding is not decided by float noise between two near-equal tokens.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**{**TINY, **overrides})
    cfg.initializer_range = std
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True)
    byte_tokenizer().save_pretrained(path)
    return path


def make_peft_adapter(model_dir: Path, out_dir: Path, *, r: int = 8, alpha: float = 16,
                      targets: Sequence[str] = ("q_proj", "v_proj"), use_rslora: bool = False,
                      rank_pattern: Optional[dict] = None, alpha_pattern: Optional[dict] = None,
                      seed: int = 0, std: float = 0.05) -> Path:
    """A PEFT LoRA adapter with random (non-zero) A and B, saved as safetensors."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), use_rslora=use_rslora,
                     rank_pattern=rank_pattern or {}, alpha_pattern=alpha_pattern or {}, lora_dropout=0.0,
                     init_lora_weights=False)
    model = get_peft_model(base, cfg)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * std)
    model.save_pretrained(out_dir, safe_serialization=True)
    return Path(out_dir)


def peft_greedy(model_dir: Path, adapter_dir: Optional[Path], prompt: Sequence[int], max_new_tokens: int,
                eos_token_id: Optional[int] = None) -> list[int]:
    """The oracle: Hugging Face (+ PEFT) greedy generation for one request alone, fp32 on CPU."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir).eval()
    ids = torch.tensor([list(prompt)])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=eos_token_id, pad_token_id=eos_token_id)
    return out[0, ids.shape[1]:].tolist()


@contextmanager
def small_filesystem(path: Path, size: str = "2m") -> Iterator[Path]:
    """A size-limited tmpfs mounted at `path` for the block (disk-full tests); skips when mounting is not allowed.

    Needs root with CAP_SYS_ADMIN (a container may lack it): the skip says so, never silently.
    """
    import subprocess

    import pytest

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a {size} tmpfs at {path} here (needs root with CAP_SYS_ADMIN): "
                    f"{(proc.stderr or proc.stdout).strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill_filesystem(path: Path, leave: int = 0) -> Path:
    """Write a filler file under `path` until fewer than `leave` + 4096 bytes are free; returns the filler."""
    import os

    filler = Path(path) / "filler"
    with open(filler, "wb") as f:
        while True:
            st = os.statvfs(path)
            free = st.f_bavail * st.f_frsize
            if free <= leave + 4096:
                break
            try:
                f.write(b"\0" * min(free - leave, 1 << 20))
                f.flush()
            except OSError:
                break
    return filler


def interpreter_child_cases(namespace: dict) -> int:
    """How many interpreter-only cases (marked interpreter_child, parametrizations counted) a test module defines."""
    n_all = 0
    for name, fn in list(namespace.items()):
        marks = getattr(fn, "pytestmark", [])
        if name.startswith("test_") and any(m.name == "interpreter_child" for m in marks):
            n = 1
            for m in marks:
                if m.name == "parametrize":
                    n *= len(m.args[1])
            n_all += n
    return n_all


def run_under_triton_interpreter(test_file: str, expected_cases: int) -> None:
    """Run `test_file`'s non-GPU tests in a child pytest with TRITON_INTERPRET=1 and no CUDA (Triton's interpreter
    must be chosen before triton is first imported, so it cannot run in this process) and assert that the child
    passed at least `expected_cases` tests and failed none."""
    import os
    import re
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not gpu",
                           str(Path(test_file).resolve())], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0 and " failed" not in proc.stdout, tail
    passed = re.search(r"(\d+) passed", proc.stdout)
    assert passed is not None and int(passed.group(1)) >= expected_cases, tail
