"""Log-probabilities the engine returns are PEFT's own: log_softmax of the same adapter's logits, same tokens."""
from __future__ import annotations

import math

import pytest
import torch

from server.core.errors import InvalidRequestError
from server.engine.types import Request, SamplingParams
from tests.engine.engine_utils import local_adapter, make_engine


@pytest.fixture(scope="module")
def engine(tiny_dir):
    eng = make_engine(tiny_dir)  # --quantize none, fp32, CPU
    yield eng
    eng.shutdown()


def _peft_log_softmax(model_dir, adapter_dir, ids: list[int], n_prompt: int) -> torch.Tensor:
    """[generated, vocab]: log_softmax of PEFT's logits at each position that predicted a generated token."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids[:-1]])).logits[0].float()
    return torch.log_softmax(logits[n_prompt - 1:], dim=-1)


@pytest.mark.parametrize("adapter", [None, "all_r8", "mlp_rs"])
def test_greedy_logprobs_equal_peft_log_softmax(engine, tiny_dir, tiny_adapters, adapter):
    prompt = list(range(5, 30))
    a = local_adapter(engine, adapter, tiny_adapters.get(adapter)) if adapter else None
    # Run beside other traffic: a token's log-probabilities must not depend on its batch.
    noise = [engine.submit(Request([9, 8, 7, 6], SamplingParams(max_new_tokens=12, ignore_eos=True, temperature=0.8,
                                                                   seed=i), None)) for i in range(2)]
    out = engine.submit(Request(prompt, SamplingParams(max_new_tokens=10, ignore_eos=True, logprobs=5), a)).collect()
    for n in noise:
        n.collect()
    assert out.logprobs is not None and len(out.logprobs) == len(out.token_ids) == 10
    ref = _peft_log_softmax(tiny_dir, tiny_adapters.get(adapter), prompt + out.token_ids, len(prompt))
    for i, (tok, lp) in enumerate(zip(out.token_ids, out.logprobs)):
        assert lp.token_id == tok
        assert abs(lp.logprob - ref[i, tok].item()) < 1e-4, f"token {i}"
        ref_top = torch.topk(ref[i], 5)
        assert [t for t, _ in lp.top] == ref_top.indices.tolist(), f"token {i}"
        assert max(abs(v - r) for (_, v), r in zip(lp.top, ref_top.values.tolist())) < 1e-4
        assert lp.top[0][0] == tok  # greedy: the chosen token is the most likely one


def test_sampled_logprobs_are_before_temperature(engine):
    """Temperature and top-k change which token is drawn, never the reported distribution."""
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    greedy = engine.generate(prompt, SamplingParams(max_new_tokens=1, logprobs=3))
    hot = engine.generate(prompt, SamplingParams(max_new_tokens=1, logprobs=3, temperature=5.0, top_k=2, seed=7))
    assert [t for t, _ in hot.logprobs[0].top] == [t for t, _ in greedy.logprobs[0].top]
    for (_, a), (_, b) in zip(hot.logprobs[0].top, greedy.logprobs[0].top):
        assert abs(a - b) < 1e-5
    drawn = dict(greedy.logprobs[0].top).get(hot.token_ids[0])
    if drawn is not None:
        assert abs(hot.logprobs[0].logprob - drawn) < 1e-5
    assert all(math.isfinite(lp.logprob) and lp.logprob <= 0 for lp in hot.logprobs)


def test_logprobs_off_zero_and_range(engine):
    prompt = [10, 11, 12]
    assert engine.generate(prompt, SamplingParams(max_new_tokens=3)).logprobs is None
    only_chosen = engine.generate(prompt, SamplingParams(max_new_tokens=3, logprobs=0)).logprobs
    assert len(only_chosen) == 3 and all(lp.top == () for lp in only_chosen)
    for bad in (-1, 21):
        with pytest.raises(InvalidRequestError, match=r"logprobs: is .*allowed range is \[0, 20\]"):
            engine.submit(Request(prompt, SamplingParams(max_new_tokens=3, logprobs=bad)))
