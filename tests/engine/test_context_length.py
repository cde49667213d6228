"""The context served is one the KV cache can hold: an explicit --max-model-len it cannot is refused at start-up,
a default one shrinks to it with a warning, and requests past it get a clear error."""
from __future__ import annotations

import logging

import pytest

from server.core.errors import InvalidRequestError
from server.engine.types import Request, SamplingParams
from tests.engine.engine_utils import make_engine


def test_a_max_model_len_the_kv_cache_cannot_hold_is_refused(tiny_dir):
    with pytest.raises(InvalidRequestError) as e:
        make_engine(tiny_dir, max_model_len=256, kv_cache_tokens=128)
    assert e.value.field == "engine.max_model_len"
    assert "--max-model-len 256" in str(e.value) and "128 tokens, --kv-cache-tokens" in str(e.value)


def test_a_max_model_len_past_the_models_positions_is_refused(tiny_dir):
    with pytest.raises(InvalidRequestError) as e:
        make_engine(tiny_dir, max_model_len=100_000)
    assert "max_position_embeddings" in str(e.value) and "--max-model-len 100000" in str(e.value)


def test_a_small_kv_cache_limits_the_default_context_with_a_warning(tiny_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="server.engine.engine"):
        eng = make_engine(tiny_dir, kv_cache_tokens=40, kv_block_size=8)
    try:
        assert eng.max_model_len == 40
        assert any("context limited to 40 tokens" in r.getMessage() for r in caplog.records)
        with pytest.raises(InvalidRequestError) as e:
            eng.submit(Request([1] * 41, SamplingParams(max_new_tokens=1)))
        assert e.value.field == "prompt" and "40" in str(e.value)
        done = eng.generate([1] * 30, SamplingParams(max_new_tokens=4, ignore_eos=True))
        assert len(done.token_ids) == 4
    finally:
        eng.shutdown()


def test_an_explicit_context_within_both_limits_is_served_as_asked(tiny_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="server.engine.engine"):
        eng = make_engine(tiny_dir, max_model_len=64, kv_cache_tokens=128)
    try:
        assert eng.max_model_len == 64
        assert not any("context limited" in r.getMessage() for r in caplog.records)
    finally:
        eng.shutdown()
