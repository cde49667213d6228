"""CUDA graphs for decode: buckets, padding, and that padded rows never change a real request's tokens.

The padding and bucket logic run on CPU (`DecodeGraphs(capture=False)` feeds the same padded
inputs to the eager model); capture and replay themselves need CUDA (marked gpu).
"""
from __future__ import annotations

import argparse

import pytest
import torch

from server.core import config as config_mod
from server.core.engine_config import EngineConfig
from server.attention.sdpa import DECODE_KV_ALIGN
from server.engine.cuda_graphs import (_INPUT_FIELDS, DecodeGraphs, batch_buckets, bucket_for, context_buckets,
                                       pad_decode_inputs)
from server.engine.kv_cache import BlockAllocator
from server.engine.types import Request, SamplingParams
from server.model.llama import KVCache
from tests.engine.engine_utils import local_adapter, make_engine
from tests.helpers import peft_greedy


def test_batch_buckets_cover_every_batch_size():
    assert batch_buckets(1) == (1,)
    assert batch_buckets(32) == (1, 2, 4, 8, 16, 24, 32)
    assert batch_buckets(20) == (1, 2, 4, 8, 16, 20)
    for max_b in (1, 3, 8, 20, 64):
        buckets = batch_buckets(max_b)
        assert buckets[-1] == max_b
        for n in range(1, max_b + 1):
            b = bucket_for(n, buckets)
            assert b is not None and n <= b <= max_b
    assert bucket_for(33, batch_buckets(32)) is None


def test_context_buckets_are_block_multiples_up_to_the_context():
    assert context_buckets(8192, 16) == (256, 512, 1024, 2048, 4096, 8192)
    assert context_buckets(1000, 16) == (256, 512, 1008)
    assert context_buckets(100, 16) == (112,)
    for b in context_buckets(3000, 32):
        assert b % 32 == 0


def test_padding_rows_touch_only_the_scratch_row():
    blocks = BlockAllocator(8, 4)

    class Seq:  # the fields pad_decode_inputs reads
        def __init__(self, tokens, slot):
            self.token_ids, self.adapter_slot = tokens, slot
            self.blocks = blocks.allocate(blocks.blocks_for(len(tokens)))

    a, b = Seq([5, 6, 7, 8, 9], 2), Seq([1, 2], None)
    scratch = blocks.num_blocks * blocks.block_size
    x = pad_decode_inputs([a, b], blocks, batch=4, context=8, scratch_kv_row=scratch)
    assert x.num_real == 2
    assert x.token_ids.tolist() == [9, 2, 0, 0] and x.positions.tolist() == [4, 1, 0, 0]
    assert x.adapter_slots.tolist() == [2, 0, 0, 0]
    assert x.slot_mapping[:2].tolist() == [blocks.rows(a.blocks, 4, 5).item(), blocks.rows(b.blocks, 1, 2).item()]
    assert x.slot_mapping[2:].tolist() == [scratch, scratch]
    assert x.decode_kv[0, :5].tolist() == blocks.rows(a.blocks, 0, 5).tolist()
    assert x.decode_mask[:, 0, 0, :].sum(1).tolist() == [5, 2, 1, 1]  # padding attends to one (scratch) row
    assert (x.decode_kv[2:] == scratch).all()
    assert (x.decode_kv[~x.decode_mask[:, 0, 0, :]] == scratch).all()  # masked columns read the scratch row
    with pytest.raises(ValueError, match="2 sequences do not fit a bucket of 1"):
        pad_decode_inputs([a, b], blocks, batch=1, context=8, scratch_kv_row=scratch)
    with pytest.raises(ValueError, match="does not fit a bucket of 4"):
        pad_decode_inputs([a], blocks, batch=2, context=4, scratch_kv_row=scratch)


def test_knob_defaults_on_and_has_a_no_flag():
    assert EngineConfig().cuda_graphs is True
    parser = argparse.ArgumentParser()
    config_mod.add_flags(parser)
    assert config_mod.from_args(parser.parse_args(["--no-cuda-graphs"]))["engine"]["cuda_graphs"] is False


def test_capture_refuses_cpu(tiny_dir):
    eng = make_engine(tiny_dir)
    try:
        with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
            DecodeGraphs(eng.model, eng.kv, eng.blocks, eng.lora_backend, 4, eng.max_model_len,
                         eng.blocks.num_blocks * eng.blocks.block_size, capture=True)
        assert eng.runner.decode_graphs is None  # the knob is ignored on CPU
    finally:
        eng.shutdown()


def test_captured_step_reads_its_buffers_on_every_call(tiny_dir):
    """The step a graph captures, run twice over different contents of its static buffers, gives what a fresh
    eager step gives each time, at a context bucket that is not a multiple of DECODE_KV_ALIGN (where attention
    pads a copy of the decode table, which must be made from the buffers on every call, not once)."""
    eng = make_engine(tiny_dir)
    try:
        bs = eng.blocks.block_size
        blocks = BlockAllocator(16, bs)
        kv = KVCache.allocate(eng.model_config, blocks.num_blocks + 1, bs, eng.dtype, eng.device)
        g = torch.Generator().manual_seed(0)
        for t in kv.k + kv.v:
            t.copy_(torch.randn(t.shape, generator=g))
        scratch = blocks.num_blocks * bs
        graphs = DecodeGraphs(eng.model, kv, blocks, eng.lora_backend, 4, 1000, scratch, capture=False)
        B, L = 4, graphs.context_buckets[-1]
        assert L % DECODE_KV_ALIGN

        class Seq:  # the fields pad_decode_inputs reads
            def __init__(self, n):
                self.token_ids, self.adapter_slot = list(range(3, 3 + n)), None
                self.blocks = blocks.allocate(blocks.blocks_for(n))

        st = graphs._static_inputs(B, L)
        step = graphs._step_fn(st, None)
        for seqs in ([Seq(30), Seq(7)], [Seq(12), Seq(41), Seq(3)]):
            x = pad_decode_inputs(seqs, blocks, B, L, scratch)
            for f in _INPUT_FIELDS:
                getattr(st, f).copy_(getattr(x, f))
            got = step()[:x.num_real]
            # Not bit-equal: the step's logits matmul has B rows, the eager one only the real rows.
            torch.testing.assert_close(got, graphs._eager(x), rtol=0, atol=1e-5)
    finally:
        eng.shutdown()


def _requests(engine, tiny_adapters):
    """Five requests of different lengths (the batch shrinks 5 -> 4 -> ... -> 1 across buckets)."""
    names = [None, *tiny_adapters]
    prompts = [list(range(3, 15)), [65, 66, 67], list(range(100, 140)), [7] * 9, [11, 12]]
    out = []
    for i, (name, prompt) in enumerate(zip(names, prompts)):
        adapter = local_adapter(engine, name, tiny_adapters.get(name)) if name else None
        out.append((name, prompt, 4 + 3 * i, adapter))
    return out


def test_padded_decode_gives_peft_tokens(tiny_dir, tiny_adapters):
    """Every decode step through padded buckets (eagerly, on CPU): tokens still equal PEFT's, alone."""
    eng = make_engine(tiny_dir, max_batch_size=8)
    try:
        graphs = DecodeGraphs(eng.model, eng.kv, eng.blocks, eng.lora_backend, 8, eng.max_model_len,
                              eng.blocks.num_blocks * eng.blocks.block_size, capture=False)
        ran = []
        real_run = graphs.run
        graphs.run = lambda decode: ran.append(len(decode)) or real_run(decode)
        eng.runner.decode_graphs = graphs
        jobs = [(name, prompt, n, eng.submit(Request(prompt, SamplingParams(max_new_tokens=n, ignore_eos=True),
                                                     adapter)))
                for name, prompt, n, adapter in _requests(eng, tiny_adapters)]
        for name, prompt, n, stream in jobs:
            assert stream.collect().token_ids == peft_greedy(tiny_dir, tiny_adapters.get(name), prompt, n), name
        assert ran and any(bucket_for(n, graphs.batch_buckets) != n for n in ran)  # some steps were padded
    finally:
        eng.shutdown()


_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@_cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gpu_graphs_on_and_off_give_identical_tokens(tiny_dir, tiny_adapters, dtype):
    outputs = {}
    for graphs_on in (True, False):
        # A context of 200 makes one context bucket, 208: not a multiple of DECODE_KV_ALIGN, so the captured
        # attention pads the static decode table itself on every replay.
        eng = make_engine(tiny_dir, device="cuda", dtype=dtype, cuda_graphs=graphs_on, max_batch_size=8,
                          max_model_len=200)
        try:
            assert (eng.runner.decode_graphs is not None) == graphs_on
            jobs = [eng.submit(Request(prompt, SamplingParams(max_new_tokens=n, ignore_eos=True), adapter))
                    for _, prompt, n, adapter in _requests(eng, tiny_adapters)]
            outputs[graphs_on] = [j.collect().token_ids for j in jobs]
            if graphs_on:  # every (batch, context) bucket pair, captured at start-up
                g = eng.runner.decode_graphs
                assert g.context_buckets == (208,)
                assert g.num_captured == 2 * len(g.batch_buckets) * len(g.context_buckets)  # with and without LoRA
                assert g.replays > 0
        finally:
            eng.shutdown()
    if dtype == "float32":
        assert outputs[True] == outputs[False]
    else:
        # bf16: the graphs run BGMV at the pool's max rank over a padded batch, eager steps their own rank and
        # rows, so logits differ in the last bits, enough to flip a near tie (greedy decoding then diverges).
        # Prefill runs eagerly in both, so first tokens agree; all requests but at most one agree throughout.
        on, off = outputs[True], outputs[False]
        assert [t[0] for t in on] == [t[0] for t in off]
        assert sum(a == b for a, b in zip(on, off)) >= len(on) - 1
