"""The fused step driver: a step through one C call gives the layered path's bits (hidden states and the K/V
it writes), with and without adapters, for all-decode steps and for steps with prompts (from scratch and after a
cached prefix); steps it cannot take stay on the layered path."""
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


def _both_ways(model, kv, steps, lora_for=lambda i: None, prefills_for=lambda i: []):
    """Run the steps fused on kv and layered on a copy; return both hidden states and caches."""
    layered_kv, fused = _clone(kv), model.fused
    got, want = [], []
    for i, decodes in enumerate(steps):
        got.append(_step(model, kv, prefills_for(i), decodes, lora_for(i)))
        model.fused = None
        try:
            want.append(_step(model, layered_kv, prefills_for(i), decodes, lora_for(i)))
        finally:
            model.fused = fused
    return got, want, kv, layered_kv


def _count_driver_steps(monkeypatch) -> list[int]:
    """Rows of every step the driver took (try_run returned an answer), appended as they run."""
    taken: list[int] = []
    real = fused_decode.FusedDecode.try_run

    def counting(self, h, *a):
        out = real(self, h, *a)
        if out is not None:
            taken.append(h.shape[0])
        return out
    monkeypatch.setattr(fused_decode.FusedDecode, "try_run", counting)
    return taken


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
    assert step.native() is not None
    got, want, kv, layered = _both_ways(model, kv, steps, lambda i: step)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert all(torch.equal(a, b) for a, b in zip(kv.k + kv.v, layered.k + layered.v))
    base = _step(model, _primed_cache(model, lengths), [], steps[0])
    changed = (got[0] != base).any(dim=1).tolist()
    assert changed == [r != 0 for r in rows], "adapter rows moved, the base row did not"


def _prompt(seed: int, n: int) -> list[int]:
    return [(13 * seed + 5 * j) % 250 + 1 for j in range(n)]


@pytest.mark.parametrize("with_lora", [False, True], ids=["base", "adapters"])
def test_steps_with_prompts_are_the_layered_bits(model, cpu_lora, with_lora, monkeypatch):
    """Prompts beside decode rows, prompts alone, and a prompt after a cached prefix: the driver takes every such
    step and gives the layered path's bits, hidden states and K/V."""
    backend, slots = cpu_lora
    lengths = [6, 19, 3]
    kv = _primed_cache(model, lengths + [12])  # sequence 3's first 12 tokens are a cached prefix
    taken = _count_driver_steps(monkeypatch)
    # per step: prompts (seq, tokens[, cached]) and their rows' slots, decode rows and theirs
    plan = [([(4, _prompt(4, 37))], [(s, 60 + s, n + 1) for s, n in enumerate(lengths)]),
            ([(4, _prompt(5, 5), 37), (3, _prompt(6, 9), 12)], [(0, 61, 8), (2, 62, 5)]),
            ([(1, _prompt(7, 2), 20)], [])]
    decode_slots = [[slots[0], 0, slots[1]], [slots[2], slots[0]], []]
    prompt_slots = [[slots[1]], [slots[0], slots[2]], [0]]

    def lora_for(i):
        if not with_lora:
            return None
        rows = list(decode_slots[i])
        for (_, toks, *_), s in zip(plan[i][0], prompt_slots[i]):
            rows += [s] * len(toks)
        return backend.prepare(rows, len(plan[i][1]))
    got, want, kv, layered = _both_ways(model, kv, [p[1] for p in plan], lora_for, lambda i: plan[i][0])
    assert taken == [g.shape[0] for g in got], "the driver took every step"
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert all(torch.equal(a, b) for a, b in zip(kv.k + kv.v, layered.k + layered.v)), "the same K/V written"


def test_a_prompt_the_context_kernel_does_not_take_stays_on_the_layered_path(model, monkeypatch):
    """A prompt whose context would overflow the context kernel's workspace goes through torch's attention on
    the layered path, and the step with it: same result to rounding as the kernel's."""
    from server.attention import context_kernel

    kv = _primed_cache(model, [5])
    want = _step(model, _clone(kv), [(1, _prompt(1, 40))], [(0, 7, 6)])
    taken = _count_driver_steps(monkeypatch)
    monkeypatch.setattr(context_kernel, "MAX_WORKSPACE", 16)
    got = _step(model, kv, [(1, _prompt(1, 40))], [(0, 7, 6)])
    assert taken == []
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)


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
    taken = _count_driver_steps(monkeypatch)
    got = _step(model, kv, [], steps[0])
    assert not calls and not taken, "neither the driver nor the kernel ran the long context"
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)


def test_a_cache_row_outside_the_cache_is_refused_before_anything_is_written(model):
    """A slot mapping past the cache (a scheduler bug) must fail the step, as torch's index_copy_ fails it on the
    layered path, not write K/V over whatever memory lies beyond the cache."""
    lengths = [5, 9]
    kv = _primed_cache(model, lengths)
    before = [t.clone() for t in kv.k + kv.v]
    outside = len(lengths) + 1  # the cache holds rows of sequences 0..len(lengths)
    with pytest.raises(IndexError, match="outside the cache"):
        _step(model, kv, [], [(0, 11, lengths[0] + 1), (outside, 12, 1)])
    assert all(torch.equal(a, b) for a, b in zip(kv.k + kv.v, before)), "nothing written"
    assert _step(model, kv, [], [(0, 11, lengths[0] + 1)]).isfinite().all(), "the model still steps"
