"""The fused decode driver: an all-decode step through one C call gives the layered path's bits (hidden
states and the K/V it writes), with and without adapters, and only all-decode steps take it."""
from __future__ import annotations

import shutil

import pytest
import torch

from server.core.identity import AdapterVersion
from server.core.paths import resolve_kernel_cache
from server.lora import cpu_kernel
from server.lora.cpu_backend import CpuKernelBackend
from server.lora.pool import AdapterPool
from server.model import fused_decode
from server.model.llama import KVCache, LlamaForCausalLM
from tests.helpers import make_tiny_model_dir
from tests.model.flat_steps import flat_step
from tests.lora.backend_utils import random_adapter

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None,
                                reason="no C compiler: the layered torch path serves (tested elsewhere)")

BLOCK = 64  # cache rows per sequence
ALL = ("q", "k", "v", "o", "gate", "up", "down")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = make_tiny_model_dir(tmp_path_factory.mktemp("fused") / "model", seed=5, std=0.05, hidden_size=128,
                            intermediate_size=352, num_attention_heads=4, num_key_value_heads=2,
                            num_hidden_layers=3)
    m = LlamaForCausalLM.from_pretrained(d, quantize="int8")
    assert m.fused is not None, "int8 on CPU with a compiler: the driver applies"
    return m


def _step(model, kv, prefills, decodes, lora=None):
    return flat_step(model, kv, prefills, decodes, BLOCK, lora)


def _primed_cache(model, lengths):
    """Prompts of these lengths prefilled, room for one sequence more."""
    kv = KVCache.allocate(model.config, (len(lengths) + 1) * BLOCK // 16, 16, torch.float32, torch.device("cpu"))
    _step(model, kv, [(s, [(7 * s + 3 * j) % 250 + 1 for j in range(n)]) for s, n in enumerate(lengths)], [])
    return kv


def _clone(kv: KVCache) -> KVCache:
    return KVCache([k.clone() for k in kv.k], [v.clone() for v in kv.v], kv.block_size)


def _both_ways(model, kv, steps, lora_for=lambda i: None):
    """Run the decode steps fused on kv and layered on a copy; return both hidden states and caches."""
    layered_kv, fused = _clone(kv), model.fused
    got, want = [], []
    for i, decodes in enumerate(steps):
        got.append(_step(model, kv, [], decodes, lora_for(i)))
        model.fused = None
        try:
            want.append(_step(model, layered_kv, [], decodes, lora_for(i)))
        finally:
            model.fused = fused
    return got, want, kv, layered_kv


def test_fused_decode_steps_are_the_layered_bits(model):
    lengths = [5, 17, 40, 1]
    kv = _primed_cache(model, lengths)
    steps = [[(s, 11 + s, n + 1) for s, n in enumerate(lengths)],
             [(s, 21 + s, n + 2) for s, n in enumerate(lengths)],
             [(2, 31, lengths[2] + 3)]]  # one sequence alone
    got, want, kv, layered = _both_ways(model, kv, steps)
    for g, w in zip(got, want):
        assert g.shape == w.shape and torch.equal(g, w)
    assert all(torch.equal(a, b) for a, b in zip(kv.k + kv.v, layered.k + layered.v)), "the same K/V written"


@pytest.fixture(scope="module", params=[torch.bfloat16, torch.int8], ids=["bf16-rows", "int8-rows"])
def cpu_lora(model, request):
    kernel = cpu_kernel.load(resolve_kernel_cache())
    assert kernel is not None
    pool = AdapterPool(model.config, num_slots=4, max_rank=16, device=torch.device("cpu"), dtype=torch.float32,
                       kernel_copies=request.param)
    adapters = [random_adapter(model.config, 8, ALL, 1, bf16_exact=True),
                random_adapter(model.config, 16, ("q", "v", "down"), 2, bf16_exact=True),
                random_adapter(model.config, 4, ("gate", "up"), 3, bf16_exact=True)]
    slots = [pool.load(AdapterVersion("default", f"a{i}", 1, f"a{i}", lambda w=w: w)) for i, w in enumerate(adapters)]
    yield CpuKernelBackend(pool, kernel), slots
    pool.shutdown()


def test_fused_decode_with_adapters_is_the_layered_bits(model, cpu_lora):
    backend, slots = cpu_lora
    lengths = [9, 30, 2, 14, 21]
    rows = [slots[0], 0, slots[1], slots[0], slots[2]]  # sorted by slot is not required of decode rows
    kv = _primed_cache(model, lengths)
    steps = [[(s, 40 + s, n + 1) for s, n in enumerate(lengths)], [(s, 50 + s, n + 2) for s, n in enumerate(lengths)]]
    step = backend.prepare(rows, len(rows))
    assert step.native_decode() is not None
    got, want, kv, layered = _both_ways(model, kv, steps, lambda i: step)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert all(torch.equal(a, b) for a, b in zip(kv.k + kv.v, layered.k + layered.v))
    base = _step(model, _primed_cache(model, lengths), [], steps[0])
    changed = (got[0] != base).any(dim=1).tolist()
    assert changed == [r != 0 for r in rows], "adapter rows moved, the base row did not"


def test_only_all_decode_steps_take_the_driver(model, cpu_lora, monkeypatch):
    backend, slots = cpu_lora
    calls = []
    real = fused_decode.FusedDecode.run
    monkeypatch.setattr(fused_decode.FusedDecode, "run", lambda self, *a: calls.append(a[0].shape[0]) or real(self, *a))
    kv = _primed_cache(model, [4, 6])
    _step(model, kv, [], [(0, 9, 5), (1, 9, 7)])
    _step(model, kv, [(2, [1, 2, 3])], [(0, 9, 6), (1, 9, 8)])  # a prompt in the step: the layers
    assert backend.prepare([slots[0], 0, slots[1]], 2).native_decode() is None  # nor a LoRA step with one
    _step(model, kv, [], [(0, 9, 7), (1, 9, 9)], backend.prepare([slots[0], slots[1]], 2))
    assert calls == [2, 2]


def test_the_driver_applies_only_to_the_int8_cpu_model(model, tmp_path, monkeypatch):
    d = make_tiny_model_dir(tmp_path / "m", seed=1)
    assert LlamaForCausalLM.from_pretrained(d, quantize="none").fused is None  # the PEFT-exact path stays torch's
    monkeypatch.setenv("LORASERVE_FUSED_DECODE", "0")
    assert LlamaForCausalLM.from_pretrained(d, quantize="int8").fused is None


def test_a_context_past_the_attention_kernels_reach_decodes_on_torchs_attention(model, monkeypatch):
    """The kernel keeps a context's scores on the stack: past MAX_CONTEXT neither the driver nor the kernel takes
    the step; torch's SDPA does, with the same result to rounding (here the bound is lowered to 20 tokens)."""
    from server.attention import decode_kernel

    lengths = [30, 10]
    steps = [[(0, 5, 31), (1, 6, 11)]]
    kv = _primed_cache(model, lengths)
    want = _step(model, _clone(kv), [], steps[0])
    calls = []
    real = decode_kernel.DecodeAttention.__call__
    monkeypatch.setattr(decode_kernel, "MAX_CONTEXT", 20)
    monkeypatch.setattr(decode_kernel.DecodeAttention, "__call__", lambda *a: calls.append(1) or real(*a))
    fused = fused_decode.FusedDecode.run
    monkeypatch.setattr(fused_decode.FusedDecode, "run", lambda *a: calls.append(2) or fused(*a))
    got = _step(model, kv, [], steps[0])
    assert not calls, "neither the driver nor the kernel ran the long context"
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)
