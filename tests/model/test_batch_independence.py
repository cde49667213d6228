"""A token's hidden state is the same bits whatever shares its step (int8 base, no adapters).

Sharper than comparing greedy tokens (tests/engine/test_batch_independence.py): any batch-dependent
arithmetic in the base linears, norms, RoPE or attention shows here even when it flips no token. The
model has SmolLM2's widths (576 hidden, 1536 MLP, 9/3 heads) in two layers: at these widths the old
int8 prompt path (dequantized weights through torch's fp32 GEMM) failed this test, because that GEMM
splits its work over the threads by the row count (a 64-row prompt alone and inside a 512-row step
got different bits in down_proj, K=1536).
"""
from __future__ import annotations

import pytest
import torch

from server.model.llama import KVCache, LlamaForCausalLM
from tests.helpers import make_tiny_model_dir
from tests.model.flat_steps import flat_step

BLOCK = 128  # cache rows per sequence in these tests


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = make_tiny_model_dir(tmp_path_factory.mktemp("smol_shaped") / "model", seed=3, std=0.05, hidden_size=576,
                            intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3)
    return LlamaForCausalLM.from_pretrained(d, quantize="int8")


def _prompt(i: int, n: int) -> list[int]:
    return [(17 * i + 5 * j) % 250 + 1 for j in range(n)]


def _step(model, kv, prefills, decodes):
    return flat_step(model, kv, prefills, decodes, BLOCK)


def test_prompt_and_decode_rows_alone_and_batched(model):
    cfg = model.config
    new_kv = lambda: KVCache.allocate(cfg, 8 * BLOCK // 16, 16, torch.float32, torch.device("cpu"))  # noqa: E731
    target = _prompt(0, 40)

    kv = new_kv()
    alone_prefill = _step(model, kv, [(0, target)], [])
    alone_decode = _step(model, kv, [], [(0, 77, 41)])

    # The same prompt among others (rows 3.. of a 4-prompt step), its decode among longer contexts.
    kv = new_kv()
    others = [(s, _prompt(s, n)) for s, n in ((1, 7), (2, 120), (3, 1), (4, 100), (5, 110), (6, 127))]
    h = _step(model, kv, [others[0], (0, target), *others[1:]], [])
    assert torch.equal(h[7:47], alone_prefill)
    h = _step(model, kv, [], [(1, 11, 8), (0, 77, 41), (2, 12, 91), (3, 13, 2)])
    assert torch.equal(h[1], alone_decode[0])

    # Its prefill in a step with decode rows, its decode in a step with a prefill.
    kv = new_kv()
    _step(model, kv, [(1, _prompt(1, 30)), (2, _prompt(2, 3))], [])
    h = _step(model, kv, [(0, target), (3, _prompt(3, 50))], [(1, 21, 31), (2, 22, 4)])
    assert torch.equal(h[2:42], alone_prefill)
    h = _step(model, kv, [(4, _prompt(4, 64))], [(0, 77, 41), (3, 23, 51)])
    assert torch.equal(h[0], alone_decode[0])
