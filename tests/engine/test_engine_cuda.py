"""The engine on CUDA against PEFT on CUDA, on a random-weight Llama with adapters that differ in every way.

fp32: token-exact (the Triton kernels use IEEE fp32 dots, no TF32). bf16: tokens cannot be exact
(bf16 rounding flips near-ties), so the stated tolerance is on what the engine picks: every token of
the bf16 engine's greedy continuation, scored teacher-forced by PEFT in fp32, is within
BF16_GAP of that step's fp32 argmax, as a fraction of the step's logit range (max - min).
Needs CUDA (marked gpu); `python -m benchmarks.gpu_suite` runs these.
"""
from __future__ import annotations

import pytest
import torch

from server.engine.types import Request, SamplingParams
from tests.engine.engine_utils import local_adapter, make_engine

BF16_GAP = 0.03
NEW_TOKENS = 16

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _prompts() -> list[list[int]]:
    return [list(range(3, 23)), [65, 66, 67], list(range(100, 161)), [7] * 9, [11, 12]]


def _peft(tiny_dir, adapter_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).to("cuda").eval()
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir).to("cuda").eval()
    return model


def _run_engine(tiny_dir, tiny_adapters, dtype: str, quantize: str = "none") -> list[tuple]:
    """One mixed batch: every prompt with the base and with each adapter. (name, prompt, tokens) each."""
    eng = make_engine(tiny_dir, device="cuda", dtype=dtype, quantize=quantize, max_batch_size=32)
    try:
        assert eng.lora_backend.name == "triton"
        jobs = []
        for prompt in _prompts():
            for name in [None, *tiny_adapters]:
                adapter = local_adapter(eng, name, tiny_adapters.get(name)) if name else None
                jobs.append((name, prompt, eng.submit(
                    Request(prompt, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True), adapter))))
        return [(name, prompt, s.collect().token_ids) for name, prompt, s in jobs]
    finally:
        eng.shutdown()


def test_gpu_fp32_engine_is_token_exact_with_peft(tiny_dir, tiny_adapters):
    got = _run_engine(tiny_dir, tiny_adapters, "float32")
    for name in [None, *tiny_adapters]:
        model = _peft(tiny_dir, tiny_adapters.get(name))
        for n, prompt, tokens in got:
            if n != name:
                continue
            ids = torch.tensor([prompt], device="cuda")
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, pad_token_id=3)
            assert tokens == out[0, len(prompt):].tolist(), f"adapter {name}, prompt of {len(prompt)} tokens"


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_gpu_bf16_engine_picks_near_argmax_tokens_of_fp32_peft(tiny_dir, tiny_adapters, quantize):
    got = _run_engine(tiny_dir, tiny_adapters, "bfloat16", quantize)
    # int8 rounds the base weights too: the same rule, a wider gap.
    gap_allowed = BF16_GAP if quantize == "none" else 2 * BF16_GAP
    for name in [None, *tiny_adapters]:
        model = _peft(tiny_dir, tiny_adapters.get(name))
        for n, prompt, tokens in got:
            if n != name:
                continue
            assert len(tokens) == NEW_TOKENS
            ids = torch.tensor([prompt + tokens], device="cuda")
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float()  # [NEW_TOKENS, vocab]
            picked = logits.gather(1, torch.tensor(tokens, device="cuda")[:, None])[:, 0]
            top, bottom = logits.max(1).values, logits.min(1).values
            gap = ((top - picked) / (top - bottom)).max().item()
            assert gap <= gap_allowed, f"adapter {name}, prompt of {len(prompt)}: worst gap {gap:.3f}"
