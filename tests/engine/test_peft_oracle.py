"""Greedy output of mixed-adapter batches equals PEFT's output for each request alone (fp32, CPU)."""
from __future__ import annotations

import time

import pytest

from server.engine.types import Request, SamplingParams
from tests.engine.engine_utils import local_adapter, make_engine
from tests.helpers import peft_greedy


@pytest.fixture(scope="module")
def engine(tiny_dir):
    eng = make_engine(tiny_dir)
    yield eng
    eng.shutdown()


def _prompts():
    return [list(range(3, 23)), [65, 66, 67], list(range(100, 161)), [7] * 9]


def test_mixed_batch_matches_peft_alone(engine, tiny_dir, tiny_adapters):
    """Base + four adapters (ranks 2-16, target subsets, alphas, rsLoRA, patterns), prompts 3-61 tokens."""
    names = [None, *tiny_adapters]
    jobs = []
    for i, prompt in enumerate(_prompts()):
        for j, name in enumerate(names):
            n_new = 6 + (i * 5 + j * 3) % 14
            adapter = local_adapter(engine, name, tiny_adapters.get(name)) if name else None
            req = Request(prompt, SamplingParams(max_new_tokens=n_new, ignore_eos=True), adapter)
            jobs.append((name, prompt, n_new, engine.submit(req)))
    for name, prompt, n_new, stream in jobs:
        out = stream.collect()
        expected = peft_greedy(tiny_dir, tiny_adapters.get(name), prompt, n_new)
        assert out.token_ids == expected, f"adapter {name}, prompt of {len(prompt)} tokens"
        assert out.finish_reason == "length"
        assert (out.adapter.name if out.adapter else "") == (name or "")


def test_requests_arriving_while_others_decode(engine, tiny_dir, tiny_adapters):
    names = list(tiny_adapters)
    first = [(n, p, engine.submit(Request(p, SamplingParams(max_new_tokens=40, ignore_eos=True),
                                          local_adapter(engine, n, tiny_adapters[n]))))
             for n, p in zip(names[:2], _prompts()[:2])]
    it = iter(first[0][2])
    next(it)  # the first batch is decoding now
    late = [(n, p, engine.submit(Request(p, SamplingParams(max_new_tokens=12, ignore_eos=True),
                                         local_adapter(engine, n, tiny_adapters[n]) if n else None)))
            for n, p in zip([None, *names[2:]], _prompts()[2:] + [[11, 12]])]
    rest = list(it)
    first_ids = [t for d in rest for t in d.token_ids]
    assert len(first_ids) == 39
    for n, p, st in late:
        assert st.collect().token_ids == peft_greedy(tiny_dir, tiny_adapters.get(n), p, 12)
    for n, p, st in first[1:]:
        assert st.collect().token_ids == peft_greedy(tiny_dir, tiny_adapters[n], p, 40)


def test_eos_stops_like_hf(engine, tiny_dir, tiny_adapters):
    """Without ignore_eos, generation ends at EOS exactly where Hugging Face's does."""
    eos = engine.model_config.eos_token_ids[0]
    for name in (None, "all_r8"):
        prompt = [1, 2, 3, 4]
        out = engine.generate(prompt, SamplingParams(max_new_tokens=60),
                              local_adapter(engine, name, tiny_adapters.get(name)) if name else None)
        ref = peft_greedy(tiny_dir, tiny_adapters.get(name), prompt, 60, eos_token_id=eos)
        assert out.token_ids == ref
        assert out.finish_reason == ("stop" if ref[-1] == eos else "length")


@pytest.mark.slow
def test_real_smollm2_matches_peft(default_model_dir, tmp_path):
    """The real default model, a few chat prompts, two adapters and the base in one batch."""
    from tests.helpers import make_peft_adapter

    a1 = make_peft_adapter(default_model_dir, tmp_path / "a1", r=8, alpha=16, std=0.02,
                           targets=("q_proj", "v_proj", "down_proj"), seed=11)
    a2 = make_peft_adapter(default_model_dir, tmp_path / "a2", r=16, alpha=16, use_rslora=True, std=0.02,
                           targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                           seed=12)
    eng = make_engine(default_model_dir, max_rank=16)
    try:
        tok = eng.tokenizer
        prompts = [list(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                return_dict=True)["input_ids"])
                   for q in ("What is the capital of France?", "Write a haiku about rain.")]
        adapters = {None: None, "a1": a1, "a2": a2}
        t0 = time.perf_counter()
        jobs = [(n, p, eng.submit(Request(p, SamplingParams(max_new_tokens=12, ignore_eos=True),
                                          local_adapter(eng, n, a) if n else None)))
                for p in prompts for n, a in adapters.items()]
        outs = [(n, p, s.collect()) for n, p, s in jobs]
        assert time.perf_counter() - t0 < 120
        for n, p, out in outs:
            assert out.token_ids == peft_greedy(default_model_dir, adapters[n], p, 12), n
        base_text = [o.text for n, _, o in outs if n is None]
        assert "Paris" in base_text[0]
    finally:
        eng.shutdown()
