"""A request's tokens do not depend on what else is in its batches (int8, the engine's default).

The int8 base runs integer products with per-token scales (server/model/int8_dynamic.py), the LoRA
kernels keep each token's sums its own (tokens of one adapter share only the converted weights), attention
runs sequence by sequence: so a request decoded alone, inside a
batch that starts with it, arriving while others decode, or with others arriving while it decodes,
must produce the same greedy tokens. A flat-logit tiny model (small init) makes greedy choices
sensitive to the last bit of the logits, so any batch-dependent arithmetic shows up as a token flip.
"""
from __future__ import annotations

import pytest

from server.engine.types import Request, SamplingParams
from tests.engine.engine_utils import local_adapter, make_engine
from tests.helpers import make_tiny_model_dir

NEW = 24


@pytest.fixture(scope="module")
def flat_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("flat") / "model", seed=5, std=0.02)


@pytest.fixture(scope="module")
def engine(flat_dir):
    eng = make_engine(flat_dir, quantize="int8")
    yield eng
    eng.shutdown()


def _req(engine, adapters, prompt, name, n=NEW):
    adapter = local_adapter(engine, name, adapters[name]) if name else None
    return Request(prompt, SamplingParams(max_new_tokens=n, ignore_eos=True), adapter)


def _others(k):
    return [([(7 * i + j) % 250 + 1 for j in range(5 + 9 * i)], name)
            for i, name in zip(range(k), [None, "all_r8", "qv_r4", "mlp_rs", "all_r8", None, "pattern"] * 3)]


@pytest.mark.parametrize("adapter", [None, "all_r8"])
def test_same_tokens_alone_and_in_any_batch(engine, tiny_adapters, adapter):
    assert all(m.kernel == "dynamic" for m in engine.model.modules() if hasattr(m, "kernel") and m.kernel != "dense")
    prompt = [(31 * j) % 250 + 1 for j in range(40)]
    alone = engine.submit(_req(engine, tiny_adapters, prompt, adapter)).collect().token_ids
    assert len(alone) == NEW

    # In one batch with others of other lengths and adapters, submitted together.
    streams = [engine.submit(_req(engine, tiny_adapters, p, n)) for p, n in _others(5)]
    together = engine.submit(_req(engine, tiny_adapters, prompt, adapter))
    assert together.collect().token_ids == alone
    [s.collect() for s in streams]

    # Arriving while others decode: its prefill shares steps with their decode rows.
    streams = [engine.submit(_req(engine, tiny_adapters, p, n, n=60)) for p, n in _others(7)]
    next(iter(streams[0]))
    late = engine.submit(_req(engine, tiny_adapters, prompt, adapter))
    assert late.collect().token_ids == alone
    [s.collect() for s in streams]

    # Others arriving while it decodes: its decode steps change size (and padded context) under it.
    first = engine.submit(_req(engine, tiny_adapters, prompt, adapter))
    it = iter(first)
    got = list(next(it).token_ids)
    streams = [engine.submit(_req(engine, tiny_adapters, p, n, n=8)) for p, n in _others(3)]
    got += [t for d in it for t in d.token_ids]
    assert got == alone
    [s.collect() for s in streams]
