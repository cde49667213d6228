"""CUDA graphs for decode-only steps: one graph per (batch bucket, context bucket), replayed in place.

A decode step of a small model on a GPU is dominated by launch overhead (hundreds of
small kernels per step); replaying a captured graph launches them all at once. A graph
freezes every shape and address, so a decode step is padded to fixed sizes and its
inputs are copied into static buffers the graph reads:

  batch      padded up to the next of `batch_buckets` (1, 2, 4, 8, 16, 24, ... up to the
             engine's max batch); a padding row decodes token 0 at position 0 with no
             adapter (slot 0), writes its K/V into the engine's scratch KV row (one spare
             block beyond the allocator's range) and attends to that row alone, so it never
             touches a real sequence's cache and real rows never see it;
  context    the decode attention's [B, L] table of KV rows is padded up to the next of
             `context_buckets` (powers of two from 256 tokens up to the context served), masked;
  LoRA       the Triton backend's BGMV kernels (their grid depends only on the row count)
             at the pool's max rank (zero-padded ranks add nothing), per-row slots in a static
             [B] buffer; the slot stacks themselves are static already (loads write in place).
             A step with no adapter in it replays a second graph captured without LoRA: in the
             first, every projection's kernels would still launch for rows that all return at
             once (about a hundred launches, a large share of a small model's GPU step).

Prefill and mixed steps run eagerly. `capture_all` captures every bucket pair at start-up,
before the engine loop runs and before any adapter loads (which copy on a side stream from
other threads, not allowed while a capture is under way): largest first, each warmed up on
a side stream and then captured into one private memory pool shared by all of them, so
smaller graphs reuse the larger ones' memory. A pair not captured yet is captured on first use.
The bucket choice and padding are plain functions, and `DecodeGraphs(capture=False)`
runs the same padded inputs eagerly: CPU tests check that padding never changes tokens.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from server.attention.sdpa import AttentionMetadata
from server.engine.kv_cache import BlockAllocator
from server.engine.scheduler import Sequence
from server.lora.backend import LoraBackend, LoraStep, StepRows
from server.lora.segments import LoraSegments
from server.model.llama import KVCache, LlamaForCausalLM

log = logging.getLogger(__name__)

MIN_CONTEXT_BUCKET = 256
PAD_TOKEN = 0


def batch_buckets(max_batch_size: int) -> tuple[int, ...]:
    """1, 2, 4, 8, then every multiple of 8, up to and including max_batch_size."""
    if max_batch_size < 1:
        raise ValueError("max_batch_size must be at least 1")
    out = [b for b in (1, 2, 4) if b < max_batch_size]
    b = 8
    while b < max_batch_size:
        out.append(b)
        b += 8
    out.append(max_batch_size)
    return tuple(sorted(set(out)))


def context_buckets(max_len: int, block_size: int, smallest: int = MIN_CONTEXT_BUCKET) -> tuple[int, ...]:
    """Powers of two from `smallest` up to max_len (the last one max_len itself), multiples of block_size."""
    if max_len < 1 or block_size < 1:
        raise ValueError("max_len and block_size must be at least 1")
    round_up = lambda n: -(-n // block_size) * block_size  # noqa: E731
    top = round_up(max_len)
    out, b = [], round_up(min(smallest, top))
    while b < top:
        out.append(b)
        b = round_up(b * 2)
    out.append(top)
    return tuple(out)


def bucket_for(n: int, buckets: tuple[int, ...]) -> Optional[int]:
    """The smallest bucket holding n, or None when n is larger than them all."""
    for b in buckets:
        if b >= n:
            return b
    return None


@dataclass
class DecodeInputs:
    """One decode step's model inputs padded to (batch, context) buckets, on the host.

    Rows [0, num_real) are the real sequences in the runner's order, the rest padding."""

    token_ids: torch.Tensor      # [B] int64
    positions: torch.Tensor      # [B] int64
    slot_mapping: torch.Tensor   # [B] int64: the KV row each row's new K/V is written to
    decode_kv: torch.Tensor      # [B, L] int64: KV rows of each row's context
    decode_mask: torch.Tensor    # [B, 1, 1, L] bool: True where decode_kv is real context
    adapter_slots: torch.Tensor  # [B] int64, 0 = no adapter
    num_real: int


def pad_decode_inputs(seqs: list[Sequence], blocks: BlockAllocator, batch: int, context: int,
                      scratch_kv_row: int) -> DecodeInputs:
    """The decode step of `seqs` (already in row order) padded to `batch` rows and `context` KV columns."""
    n = len(seqs)
    if n > batch:
        raise ValueError(f"{n} sequences do not fit a bucket of {batch}")
    pad = batch - n
    lengths = [len(s.token_ids) for s in seqs]
    if lengths and max(lengths) > context:
        raise ValueError(f"a context of {max(lengths)} tokens does not fit a bucket of {context}")
    # Built in a few whole-tensor ops from plain lists (a Python loop of tensor writes per row cost about 3 ms a
    # step at batch 64, several times a GPU decode step); padding rows attend to the scratch row alone.
    ids = torch.tensor([s.token_ids[-1] for s in seqs] + [PAD_TOKEN] * pad, dtype=torch.long)
    lens = torch.tensor(lengths + [1] * pad, dtype=torch.long)
    slots = torch.tensor([s.adapter_slot or 0 for s in seqs] + [0] * pad, dtype=torch.long)
    mask = torch.arange(context)[None, :] < lens[:, None]
    kv_rows = torch.full((batch, context), scratch_kv_row, dtype=torch.long)
    if n:
        kv_rows[:n] = torch.where(mask[:n], blocks.context_rows([s.blocks for s in seqs], context), scratch_kv_row)
    new_rows = kv_rows.gather(1, (lens - 1)[:, None])[:, 0]
    return DecodeInputs(ids, lens - 1, new_rows, kv_rows, mask[:, None, None, :], slots, n)


_INPUT_FIELDS = ("token_ids", "positions", "slot_mapping", "decode_kv", "decode_mask", "adapter_slots")


class _Graph:
    """A captured decode step and what it reads and writes: the static buffers, and the LoRA step whose
    device tensors (segment tables) the kernels read, kept alive as long as the graph."""

    def __init__(self, inputs: DecodeInputs, lora: Optional[LoraStep], logits: torch.Tensor,
                 graph: "torch.cuda.CUDAGraph"):
        self.inputs, self.lora, self.logits, self.graph = inputs, lora, logits, graph

    def replay(self, new: DecodeInputs) -> torch.Tensor:
        st = self.inputs
        for name in _INPUT_FIELDS:
            getattr(st, name).copy_(getattr(new, name), non_blocking=True)
        self.graph.replay()
        return self.logits[:new.num_real].clone()  # the next replay overwrites the static logits


class DecodeGraphs:
    """Decode-only steps through padded inputs: replayed CUDA graphs (capture=True, CUDA) or the same
    padded inputs run eagerly (capture=False, any device; what the CPU tests exercise)."""

    def __init__(self, model: LlamaForCausalLM, kv: KVCache, blocks: BlockAllocator, lora: LoraBackend,
                 max_batch_size: int, max_len: int, scratch_kv_row: int, capture: bool):
        if capture and (model.device.type != "cuda" or lora.name != "triton"):
            raise ValueError("CUDA graphs need a CUDA device and the Triton LoRA backend (the torch and cpu "
                             "backends read host-side segment lists each step, which a graph would freeze)")
        self.model, self.kv, self.blocks, self.lora = model, kv, blocks, lora
        self.device = model.device
        self.scratch_kv_row = scratch_kv_row
        self.capture = capture
        self.batch_buckets = batch_buckets(max_batch_size)
        self.context_buckets = context_buckets(max_len, blocks.block_size)
        self._graphs: dict[tuple[int, int, bool], _Graph] = {}  # (batch, context, with LoRA)
        self.replays = 0  # decode steps run through a captured graph
        self._pool = torch.cuda.graph_pool_handle() if capture else None
        self._flat: Optional[dict[str, torch.Tensor]] = None  # static input buffers, shared by all graphs

    @property
    def num_captured(self) -> int:
        return len(self._graphs)

    def covers(self, prefill: list[Sequence], decode: list[Sequence]) -> bool:
        """True for a decode-only step that fits the largest buckets."""
        if prefill or not decode or len(decode) > self.batch_buckets[-1]:
            return False
        return max(len(s.token_ids) for s in decode) <= self.context_buckets[-1]

    def run(self, decode: list[Sequence]) -> tuple[list[Sequence], torch.Tensor]:
        """(the sequences in row order, their next-token logits [n, vocab] fp32)."""
        seqs = sorted(decode, key=lambda s: (s.adapter_slot or 0, s.order))
        B = bucket_for(len(seqs), self.batch_buckets)
        L = bucket_for(max(len(s.token_ids) for s in seqs), self.context_buckets)
        assert B is not None and L is not None, "covers() was not asked first"
        inputs = pad_decode_inputs(seqs, self.blocks, B, L, self.scratch_kv_row)
        if not self.capture:
            return seqs, self._eager(inputs)
        key = (B, L, any(s.adapter_slot for s in seqs))
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._graphs[key] = self._capture(*key)
        self.replays += 1
        return seqs, graph.replay(inputs)

    def capture_all(self) -> float:
        """Capture every (batch, context) bucket pair with and without LoRA, largest first; returns the seconds
        it took."""
        import time

        t0 = time.perf_counter()
        for B in reversed(self.batch_buckets):
            for L in reversed(self.context_buckets):
                for with_lora in (True, False):
                    if (B, L, with_lora) not in self._graphs:
                        self._graphs[(B, L, with_lora)] = self._capture(B, L, with_lora)
        torch.cuda.synchronize(self.device)
        took = time.perf_counter() - t0
        log.info("captured %d CUDA graphs for decode (batch buckets %s, context buckets %s, with and without LoRA) "
                 "in %.1fs",
                 len(self._graphs), self.batch_buckets, self.context_buckets, took)
        return took

    # ---- eager (padded) ---------------------------------------------------------------------------
    def _eager(self, inputs: DecodeInputs) -> torch.Tensor:
        dev = self.device
        attn = self._attention(inputs.slot_mapping.to(dev), inputs.decode_kv.to(dev), inputs.decode_mask.to(dev))
        lora = self.lora.prepare(inputs.adapter_slots.tolist(), len(inputs.adapter_slots))
        hidden = self.model(inputs.token_ids.to(dev), inputs.positions.to(dev), attn, self.kv, lora)
        return self.model.logits(hidden[:inputs.num_real])

    @staticmethod
    def _attention(slot_mapping: torch.Tensor, decode_kv: torch.Tensor, decode_mask: torch.Tensor
                   ) -> AttentionMetadata:
        attn = AttentionMetadata(slot_mapping=slot_mapping, prefill=(), all_decode=True, prompt_from=None)
        attn.decode_kv, attn.decode_mask = decode_kv, decode_mask
        return attn

    # ---- capture (CUDA) -----------------------------------------------------------------------------
    def _static_inputs(self, B: int, L: int) -> DecodeInputs:
        """Views [B], [B, L] over one set of flat buffers sized for the largest buckets, contiguous (the first
        B or B * L elements), so all graphs share a few MB of inputs; replays are sequential, and each copies
        its own inputs in first."""
        if self._flat is None:
            n, nl = self.batch_buckets[-1], self.batch_buckets[-1] * self.context_buckets[-1]
            long = lambda k: torch.zeros(k, dtype=torch.long, device=self.device)  # noqa: E731
            self._flat = {"token_ids": long(n), "positions": long(n), "slot_mapping": long(n),
                          "adapter_slots": long(n), "decode_kv": long(nl),
                          "decode_mask": torch.zeros(nl, dtype=torch.bool, device=self.device)}
        f = self._flat
        return DecodeInputs(f["token_ids"][:B], f["positions"][:B], f["slot_mapping"][:B],
                            f["decode_kv"][:B * L].view(B, L), f["decode_mask"][:B * L].view(B, 1, 1, L),
                            f["adapter_slots"][:B], num_real=0)

    def _static_lora(self, token_slots: torch.Tensor) -> LoraStep:
        """A Triton step that reads per-row slots from `token_slots` and always launches BGMV at max rank.

        Its host-side segment lists claim one adapter segment over every row, so the kernels are always
        launched (and captured); BGMV reads only token_slots and skips slot-0 rows itself."""
        B, dev = token_slots.shape[0], token_slots.device
        seg = LoraSegments(token_slots=token_slots, starts=(0,), ends=(B,), slots=(1,),
                           seg_starts=torch.tensor([0, B], dtype=torch.int32, device=dev),
                           seg_slots=torch.tensor([1], dtype=torch.int32, device=dev))
        step = self.lora.prepare_rows(StepRows([1] * B, B, seg, self.lora.pool.max_rank))
        step.mode = "bgmv"  # type: ignore[attr-defined]  (the Triton step's kernel choice, fixed for capture)
        return step

    def _step_fn(self, st: DecodeInputs, lora: Optional[LoraStep]) -> Callable[[], torch.Tensor]:
        """The padded decode step on the static buffers `st`, logits of every row: what a graph captures.

        The attention metadata is made anew on every call: it caches what it derives from the buffers (the
        decode table padded to DECODE_KV_ALIGN, the lengths), and one made once would hand the capture the
        warm-up's copies, stale and freed, instead of ops that read the buffers."""
        def step() -> torch.Tensor:
            attn = self._attention(st.slot_mapping, st.decode_kv, st.decode_mask)
            hidden = self.model(st.token_ids, st.positions, attn, self.kv, lora)
            return self.model.logits(hidden)

        return step

    def _capture(self, B: int, L: int, with_lora: bool) -> _Graph:
        dev = self.device
        host = pad_decode_inputs([], self.blocks, B, L, self.scratch_kv_row)  # all padding: scratch row only
        st = self._static_inputs(B, L)
        for f in _INPUT_FIELDS:
            getattr(st, f).copy_(getattr(host, f))
        lora = self._static_lora(st.adapter_slots) if with_lora else None
        step = self._step_fn(st, lora)

        # Warm up on a side stream (Triton compiles, cuBLAS picks algorithms, the allocator settles):
        # none of that may happen during capture.
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(2):
                step()
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph, pool=self._pool):
            logits = step()
        log.debug("captured a CUDA graph for decode: batch %d, context %d, %s LoRA", B, L,
                  "with" if with_lora else "without")
        return _Graph(st, lora, logits, graph)
