"""The adapter-exact prefix cache: reused prompt blocks change no output, and never cross adapters or versions.

Every engine here is fp32 with `--quantize none`, so each output must equal PEFT's for its request alone.
"""
from __future__ import annotations

import pytest

from server.engine.kv_cache import BlockAllocator
from server.engine.prefix_cache import PrefixCache
from server.engine.types import Request, SamplingParams
from tests.engine.engine_utils import local_adapter, make_engine
from tests.helpers import peft_greedy

SYSTEM = [(7 * i + 3) % 250 + 2 for i in range(37)]  # 4 full blocks of 8 and a bit


@pytest.fixture(scope="module")
def engine(tiny_dir):
    eng = make_engine(tiny_dir, kv_block_size=8)
    yield eng
    eng.shutdown()


def _ask(eng, prompt, adapter, n_new):
    return eng.submit(Request(list(prompt), SamplingParams(max_new_tokens=n_new, ignore_eos=True), adapter))


def test_shared_prefixes_across_adapters_and_base_match_peft(engine, tiny_dir, tiny_adapters):
    """One system prompt under the base and three adapters, questions one after another and in one batch:
    later requests reuse cached blocks, and every output is PEFT's."""
    names = [None, "all_r8", "qv_r4", "mlp_rs"]
    questions = [[11, 12, 13], list(range(40, 52)), [99] * 5]
    before = engine.stats().prefix
    jobs = []
    for q in questions[:2]:  # one after another: the second finds the first's blocks
        for name in names:
            adapter = local_adapter(engine, name, tiny_adapters.get(name)) if name else None
            out = _ask(engine, SYSTEM + q, adapter, 7).collect()
            jobs.append((name, SYSTEM + q, out.token_ids))
    streams = [(name, SYSTEM + questions[2], _ask(engine, SYSTEM + questions[2],
                                                   local_adapter(engine, name, tiny_adapters.get(name))
                                                   if name else None, 7)) for name in names]
    jobs += [(name, p, s.collect().token_ids) for name, p, s in streams]
    for name, prompt, got in jobs:
        assert got == peft_greedy(tiny_dir, tiny_adapters.get(name), prompt, 7), (name, len(prompt))
    after = engine.stats().prefix
    assert after.enabled
    assert after.hits - before.hits >= 8  # every request after the first of each adapter (or base)
    assert after.tokens_saved - before.tokens_saved >= 8 * 32
    assert after.cached_blocks >= 4 * 4
    assert engine.stats().kv_blocks_used == 0


def test_outputs_identical_with_cache_on_and_off(tiny_dir, tiny_adapters):
    """Same requests, mixed batch, cache on and off: token-identical (and a repeat is a full-prefix hit)."""
    names = [None, "all_r8", "pattern"]
    prompts = [SYSTEM + [5, 6], SYSTEM[:32], SYSTEM[:32] + [9], SYSTEM[:17]]
    results = {}
    for on in (True, False):
        eng = make_engine(tiny_dir, kv_block_size=8, prefix_cache=on)
        try:
            outs = []
            for _ in range(2):  # the second round runs against a warm cache
                streams = [_ask(eng, p, local_adapter(eng, n, tiny_adapters.get(n)) if n else None, 9)
                           for p in prompts for n in names]
                outs.append([s.collect().token_ids for s in streams])
            assert outs[0] == outs[1]
            results[on] = outs[0]
            assert eng.stats().prefix.enabled == on
            assert (eng.stats().prefix.hits > 0) == on
        finally:
            eng.shutdown()
    assert results[True] == results[False]


def test_a_burst_sharing_a_prompt_equals_peft_alone(engine, tiny_dir, tiny_adapters):
    """Requests on one adapter sharing a system prompt, submitted at once (the first computes the prefix and
    the others read its blocks, in its step or after it): each output equals PEFT's for the request alone."""
    adapter = local_adapter(engine, "all_r8", tiny_adapters["all_r8"])
    before = engine.stats().prefix
    prompts = [SYSTEM + [60 + i, 61 + 2 * i] for i in range(6)]
    streams = [_ask(engine, p, adapter, 6) for p in prompts]
    for p, s in zip(prompts, streams):
        assert s.collect().token_ids == peft_greedy(tiny_dir, tiny_adapters["all_r8"], p, 6)
    after = engine.stats().prefix
    assert after.hits - before.hits >= 5 and after.tokens_saved - before.tokens_saved >= 5 * 32


def test_one_arrival_computes_its_shared_prompt_once_in_one_step(engine, tiny_dir, tiny_adapters):
    """Six questions over one new system prompt, submitted as one arrival (`submit_many`, as an HTTP
    request's choices are): one step answers all six, the prompt's blocks computed once; outputs are PEFT's."""
    adapter = local_adapter(engine, "qv_r4", tiny_adapters["qv_r4"])
    _ask(engine, [3, 4], adapter, 1).collect()  # the adapter in its slot before the arrival
    system = [(11 * i + 5) % 250 + 2 for i in range(37)]  # cached by no other test
    prompts = [system + [70 + i] for i in range(6)]
    before = engine.stats()
    streams = engine.submit_many([Request(p, SamplingParams(max_new_tokens=1, ignore_eos=True), adapter)
                                  for p in prompts])
    outs = [s.collect().token_ids for s in streams]
    after = engine.stats()
    assert after.steps - before.steps == 1
    assert after.prefix.misses - before.prefix.misses == 1
    assert after.prefix.hits - before.prefix.hits == 5
    assert after.prefix.tokens_saved - before.prefix.tokens_saved == 5 * 32
    for p, got in zip(prompts, outs):
        assert got == peft_greedy(tiny_dir, tiny_adapters["qv_r4"], p, 1)


def test_hot_swap_of_a_name_never_serves_the_old_versions_blocks(engine, tiny_dir, tiny_adapters):
    """Same prompt, same adapter name: v1, then v2 (other weights), then v1 again, each equal to its version alone."""
    v1 = local_adapter(engine, "swap", tiny_adapters["all_r8"], version=1)
    v2 = local_adapter(engine, "swap", tiny_adapters["qv_r4"], version=2)
    prompt = SYSTEM + [21, 22, 23]
    want = {1: peft_greedy(tiny_dir, tiny_adapters["all_r8"], prompt, 10),
            2: peft_greedy(tiny_dir, tiny_adapters["qv_r4"], prompt, 10)}
    assert want[1] != want[2]
    for version, adapter in ((1, v1), (2, v2), (1, v1)):
        out = _ask(engine, prompt, adapter, 10).collect()
        assert out.token_ids == want[version], f"v{version}"
        assert out.adapter.version == version


def test_eviction_under_a_small_cache_keeps_outputs_exact(tiny_dir, tiny_adapters):
    """10 blocks of 8: cached blocks are evicted to make room (and preemption still works); outputs stay PEFT's."""
    eng = make_engine(tiny_dir, kv_cache_tokens=80, kv_block_size=8)
    try:
        names = [None, "all_r8", "mlp_rs"]
        jobs = []
        for round_ in range(2):
            streams = [(n, p, _ask(eng, p, local_adapter(eng, n, tiny_adapters.get(n)) if n else None, 20))
                       for i, n in enumerate(names) for p in [SYSTEM[:24 + 4 * i] + [round_ + 1]]]
            jobs += [(n, p, s.collect().token_ids) for n, p, s in streams]
        for n, p, got in jobs:
            assert got == peft_greedy(tiny_dir, tiny_adapters.get(n), p, 20), n
        st = eng.stats()
        assert st.kv_blocks_used == 0 and st.prefix.cached_blocks <= 10
    finally:
        eng.shutdown()


def test_allocator_evicts_idle_cached_blocks_least_recent_first_and_never_shared_ones():
    blocks = BlockAllocator(4, 2)
    cache = PrefixCache(blocks, "base")
    a = cache.chain([1, 2, 3, 4, 5], 5, "digest-a")
    b = cache.chain([1, 2, 3, 4, 5], 5, "digest-b")
    assert len(a) == 2 and not set(a) & set(b)  # one prompt, two adapters: two chains
    assert cache.chain([1, 2, 3, 4, 5], 5, None) != a
    t1 = blocks.allocate(3)
    cache.insert(a, t1)
    assert cache.match(a, 5) == t1[:2]
    assert cache.match(a, 4) == t1[:1]  # the last token is always computed
    assert cache.match(b, 5) == []
    blocks.free(t1)
    assert blocks.num_free == 4 and blocks.num_used == 0 and cache.num_cached_blocks == 2
    held = cache.match(a, 5)[:1]
    blocks.share(held)  # a running sequence uses the first block
    got = blocks.allocate(3)  # the two empty blocks, then the idle second block of the chain
    assert cache.num_cached_blocks == 1 and cache.match(a, 5) == held
    with pytest.raises(MemoryError):
        blocks.allocate(1)  # the shared block is never evicted
    blocks.free(got)
    blocks.free(held)
    cache.clear()
    assert blocks.num_free == 4 and cache.num_cached_blocks == 0


def test_prefix_cache_knob_from_flag_env_and_toml(tmp_path):
    import argparse

    from server.core import config

    def load(*argv, env=None):
        p = argparse.ArgumentParser()
        config.add_flags(p)
        return config.load(p.parse_args(list(argv)), env=env or {}).engine.prefix_cache

    toml = tmp_path / "c.toml"
    toml.write_text("[engine]\nprefix_cache = false\n")
    assert load() is True
    assert load("--no-prefix-cache") is False
    assert load("--config", str(toml)) is False
    assert load("--config", str(toml), "--prefix-cache") is True
    assert load(env={"LORASERVE_PREFIX_CACHE": "false"}) is False


def test_a_step_computes_one_shared_prefix_and_its_waiters_join_it():
    """A burst of 3 system prompts x 3 requests and one unshared prompt: each step computes one shared
    prefix (the unshared prompt rides along), and the requests waiting on that prefix join the same step,
    reading the blocks its first request writes; the other prefixes wait their turn."""
    from server.engine.scheduler import Scheduler, Sequence
    from server.engine.types import RequestStream

    blocks = BlockAllocator(64, 4)
    sched = Scheduler(blocks, pool=None, max_batch_size=16, max_batch_tokens=1000, prefix=PrefixCache(blocks, "b"))
    systems = [[100 + 10 * i + j for j in range(8)] for i in range(3)]  # two full blocks each

    def seq(name, prompt):
        s = Sequence(request=Request(prompt, SamplingParams(max_new_tokens=4), request_id=name),
                     stream=RequestStream(name), detok=None, generator=None, token_ids=list(prompt),
                     num_prompt=len(prompt))
        sched.add(s)
        return s

    for q in range(3):
        for i in range(3):
            seq(f"s{i}q{q}", systems[i] + [200 + 3 * q + i])
        if q == 0:
            seq("lone", list(range(50, 59)))  # shares nothing with anyone

    def step():
        plan = sched.schedule()
        sched.prefilled(plan.prefill)
        return [(s.request_id, s.num_cached) for s in plan.prefill]

    first = step()
    assert first == [("s0q0", 0), ("lone", 0), ("s0q1", 8), ("s0q2", 8)]  # s0's waiters join its blocks
    s0 = [s for s in sched.running if s.request_id.startswith("s0")]
    assert s0[1].blocks[:2] == s0[0].blocks[:2] == s0[2].blocks[:2]  # the same two blocks, shared
    assert step() == [("s1q0", 0), ("s1q1", 8), ("s1q2", 8)]
    assert step() == [("s2q0", 0), ("s2q1", 8), ("s2q2", 8)]
    assert sched.prefix.hits == 6 and sched.prefix.misses == 4
    assert not sched.waiting


def test_int8_hits_have_the_bits_of_the_same_prompts_without_the_cache(tiny_dir, tiny_adapters):
    """Under the CPU int8 default, a prompt computed after a cached prefix gets the numbers it gets from scratch
    (one attention kernel for both, every other op row by row): every token and its logprob equal, bit for bit."""
    names = [None, "all_r8", "mlp_rs"]
    prompts = [SYSTEM + [5, 6], SYSTEM + list(range(60, 75)), SYSTEM[:24] + [9]]
    params = SamplingParams(max_new_tokens=6, ignore_eos=True, logprobs=2)
    results = {}
    for on in (False, True):
        eng = make_engine(tiny_dir, kv_block_size=8, prefix_cache=on, quantize="int8")
        try:
            outs = []
            for _ in range(2):  # the second round hits blocks cached by the first (cache on)
                streams = [eng.submit(Request(list(p), params, local_adapter(eng, n, tiny_adapters.get(n))
                                              if n else None)) for p in prompts for n in names]
                outs.append([(o.token_ids, [(lp.logprob, lp.top) for lp in o.logprobs])
                             for o in (s.collect() for s in streams)])
            assert (eng.stats().prefix.hits > 0) == on
            results[on] = outs
        finally:
            eng.shutdown()
    assert results[True] == results[False]
    assert results[False][0] == results[False][1]
