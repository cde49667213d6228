"""Continuous batching: which sequences run in the next step.

Every step: running sequences get the KV block for their next token (preempting
the newest running sequence, by recompute, when blocks run out); then waiting
sequences are admitted while KV blocks, batch slots, the prefill token budget and
an adapter slot allow. Waiting order is fair across tenants (S-LoRA's virtual
token counter): the tenant that has been served the fewest weighted tokens goes
first, and within a tenant, first come first served. A lone request always fits
(submit refuses anything larger than the whole cache), so nothing deadlocks.

With a prefix cache (server/engine/prefix_cache.py), an admitted sequence starts from its
longest cached prefix: it shares those blocks and its prefill computes only the rest (and
is charged, in budget and fairness, only for that rest). A sequence whose next blocks a sequence
admitted earlier in the same step computes joins that step and reads them (every layer writes the
step's K/V before its attention reads any), so a burst sharing a prompt costs one step, not two.

A step computes at most one *shared* prefix: a prompt block that several waiting sequences
need next and none has cached. The sequences waiting on it join its step, where batching it
with other shared prefixes would make them wait for all of those too (measured on a burst of 4
system prompts x 8 requests, first tokens of the requests that hit: the first prompt's at 0.8 s
instead of 1.9 s, the median 1.5 s instead of 1.9 s, the last 2.0 s instead of 2.2 s, when they
started in the next step; docs/benchmarks.md). Prompts nobody shares are batched as before, a skipped prefix is first in
line for the next step, and without a prefix cache nothing changes.
"""
from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

import torch

from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.kv_cache import BlockAllocator
from server.engine.prefix_cache import PrefixCache
from server.engine.types import Request, RequestStream
from server.core.errors import LoraServeError
from server.lora.pool import AdapterPool

WAITING, RUNNING, FINISHED = "waiting", "running", "finished"
# VTC weights: generated tokens cost more than prompt tokens (S-LoRA uses 1 and 2).
PROMPT_TOKEN_COST, OUTPUT_TOKEN_COST = 1.0, 2.0
# How far down the waiting queue a step looks for prompt blocks several sequences wait on (bounds its cost).
SHARED_PREFIX_SCAN = 256

_order = itertools.count()


@dataclass(eq=False)
class Sequence:
    request: Request
    stream: RequestStream
    detok: IncrementalDetokenizer
    generator: Optional[torch.Generator]
    token_ids: list[int]
    num_prompt: int
    blocks: list[int] = field(default_factory=list)
    num_cached: int = 0  # tokens whose K/V are in the cache (a cached prefix counts before its prefill)
    prefilled: bool = False  # its prompt (and, after a preemption, its output so far) has been run
    prefix_chain: Optional[list[bytes]] = None  # names of its full prompt blocks (prefix cache on)
    adapter_slot: Optional[int] = None  # its adapter's slot in the pool while running (0: no adapter)
    status: str = WAITING
    order: int = field(default_factory=lambda: next(_order))
    first_token_time: Optional[float] = None
    preemptions: int = 0

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt

    @property
    def is_prefill(self) -> bool:
        return not self.prefilled


@dataclass
class StepPlan:
    prefill: list[Sequence]
    decode: list[Sequence]
    failed: list[tuple[Sequence, LoraServeError]]
    preempted: list[Sequence]

    @property
    def empty(self) -> bool:
        return not self.prefill and not self.decode


class FairWaitQueue:
    """Per-tenant FIFO queues served lowest virtual counter first."""

    def __init__(self) -> None:
        self._queues: dict[str, deque[Sequence]] = {}
        self.counters: dict[str, float] = {}

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def push(self, seq: Sequence, front: bool = False) -> None:
        t = seq.request.tenant
        if t not in self._queues or not self._queues[t]:
            # A tenant that was idle starts at the least-served active tenant's level, so
            # idling earns no credit to burst past everyone later (VTC's lift).
            active = [self.counters[k] for k, q in self._queues.items() if q and k != t]
            floor = min(active) if active else 0.0
            self.counters[t] = max(self.counters.get(t, 0.0), floor)
        q = self._queues.setdefault(t, deque())
        if front:
            q.appendleft(seq)
        else:
            q.append(seq)

    def charge(self, tenant: str, tokens: float) -> None:
        self.counters[tenant] = self.counters.get(tenant, 0.0) + tokens

    def in_order(self) -> list[Sequence]:
        """All waiting sequences, tenants interleaved by counter then arrival."""
        tenants = sorted((t for t, q in self._queues.items() if q), key=lambda t: (self.counters.get(t, 0.0), t))
        out: list[Sequence] = []
        iters = [iter(self._queues[t]) for t in tenants]
        for group in itertools.zip_longest(*iters):
            out.extend(s for s in group if s is not None)
        return out

    def remove(self, seq: Sequence) -> None:
        q = self._queues.get(seq.request.tenant)
        if q is not None:
            try:
                q.remove(seq)
            except ValueError:
                pass

    def find(self, request_id: str) -> Optional[Sequence]:
        for q in self._queues.values():
            for s in q:
                if s.request_id == request_id:
                    return s
        return None


class Scheduler:
    def __init__(self, blocks: BlockAllocator, pool: AdapterPool, max_batch_size: int, max_batch_tokens: int,
                 prefix: Optional[PrefixCache] = None):
        self.blocks, self.pool, self.prefix = blocks, pool, prefix
        self.max_batch_size, self.max_batch_tokens = max_batch_size, max_batch_tokens
        self.waiting = FairWaitQueue()
        self.running: list[Sequence] = []
        self.preemptions = 0

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.push(seq)

    def find(self, request_id: str) -> Optional[Sequence]:
        for s in self.running:
            if s.request_id == request_id:
                return s
        return self.waiting.find(request_id)

    def finish(self, seq: Sequence) -> None:
        """Release everything a sequence holds (KV blocks, adapter slot reference)."""
        if seq.status == RUNNING:
            self.running.remove(seq)
        elif seq.status == WAITING:
            self.waiting.remove(seq)
        self._release(seq)
        seq.status = FINISHED

    def _release(self, seq: Sequence) -> None:
        self.blocks.free(seq.blocks)
        if seq.adapter_slot is not None:
            self.pool.release(seq.adapter_slot)
            seq.adapter_slot = None

    def _preempt(self, seq: Sequence) -> None:
        """Drop a running sequence's cache; it re-enters waiting at the front and recomputes."""
        self.running.remove(seq)
        self._release(seq)
        seq.num_cached = 0
        seq.prefilled = False
        seq.status = WAITING
        seq.preemptions += 1
        self.preemptions += 1
        self.waiting.push(seq, front=True)

    def schedule(self) -> StepPlan:
        plan = StepPlan([], [], [], [])
        # 1. Room for each running sequence's next token, oldest first; the newest yield.
        for seq in sorted(self.running, key=lambda s: s.order):
            if seq.status != RUNNING:
                continue
            need = self.blocks.blocks_for(len(seq.token_ids)) - len(seq.blocks)
            while need > self.blocks.num_free:
                victim = max((s for s in self.running if s.status == RUNNING), key=lambda s: s.order)
                self._preempt(victim)
                plan.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status == RUNNING:
                if need > 0:
                    seq.blocks.extend(self.blocks.allocate(need))
                plan.decode.append(seq)
        # 2. Admit waiting sequences while blocks, batch slots, token budget and adapter slots allow.
        budget = self.max_batch_tokens - len(plan.decode)
        computing: dict[bytes, int] = {}  # prompt blocks this step's admitted prefills compute: name -> block
        waiting = self.waiting.in_order()
        shared = self._shared_next_blocks(waiting)
        shared_started = False
        for seq in waiting:
            if len(self.running) >= self.max_batch_size:
                break
            # Again: an admission above may have evicted idle cached blocks, or be computing this one's next ones.
            hit = self._cached_prefix(seq, computing)
            nxt = _next_block(seq, hit)
            if nxt in shared and shared_started:
                continue  # one shared prefix a step: this one is first in line for the next
            n = len(seq.token_ids)
            new_tokens = n - len(hit) * self.blocks.block_size
            if new_tokens > budget and (plan.prefill or plan.decode):
                break  # keep order: this one goes first next step
            need = self.blocks.blocks_for(n) - len(hit)
            if need > self.blocks.num_free - sum(self.blocks.is_idle(b) for b in hit):
                break
            adapter_slot = 0
            if seq.request.adapter is not None:
                try:
                    got = self.pool.acquire(seq.request.adapter)
                except LoraServeError as e:
                    self.waiting.remove(seq)
                    plan.failed.append((seq, e))
                    continue
                if got is None:
                    continue  # loading off-thread; the rest of the queue is not held up
                adapter_slot = got
            self.waiting.remove(seq)
            seq.adapter_slot = adapter_slot
            self.blocks.share(hit)
            seq.blocks = hit + self.blocks.allocate(need)
            seq.num_cached = len(hit) * self.blocks.block_size
            if self.prefix is not None and seq.prefix_chain is not None:
                self.prefix.record(len(hit))
                computing.update(zip(seq.prefix_chain[len(hit):], seq.blocks[len(hit):]))
            shared_started = shared_started or nxt in shared
            seq.status = RUNNING
            self.running.append(seq)
            plan.prefill.append(seq)
            budget -= new_tokens
            self.waiting.charge(seq.request.tenant, PROMPT_TOKEN_COST * new_tokens)
        for seq in plan.decode:
            self.waiting.charge(seq.request.tenant, OUTPUT_TOKEN_COST)
        return plan

    def _shared_next_blocks(self, waiting: list[Sequence]) -> set[bytes]:
        """Prompt blocks that two or more of the first waiting sequences need next and none has cached."""
        if self.prefix is None:
            return set()
        seen: set[bytes] = set()
        shared: set[bytes] = set()
        for seq in waiting[:SHARED_PREFIX_SCAN]:
            nxt = _next_block(seq, self._cached_prefix(seq))
            if nxt is not None:
                (shared if nxt in seen else seen).add(nxt)
        return shared

    def _cached_prefix(self, seq: Sequence, computing: Optional[dict[bytes, int]] = None) -> list[int]:
        """The cached blocks a waiting sequence may start from (none without a prefix cache), and after them
        the blocks `computing` names, which a prefill admitted earlier in this step computes: the sequence
        reads those in the same step (every layer writes all of a step's K/V before any of its attention
        reads, `paged_attention`, so they hold the values a later step would find cached)."""
        if self.prefix is None:
            return []
        if seq.prefix_chain is None:
            adapter = seq.request.adapter
            seq.prefix_chain = self.prefix.chain(seq.token_ids, seq.num_prompt,
                                                 adapter.digest if adapter is not None else None)
        return self.prefix.match(seq.prefix_chain, len(seq.token_ids), computing)

    def prefilled(self, seqs: list[Sequence]) -> None:
        """After a step ran them: their prompts' full blocks go into the prefix cache."""
        for seq in seqs:
            seq.prefilled = True
            if self.prefix is not None and seq.prefix_chain is not None and seq.status == RUNNING:
                self.prefix.insert(seq.prefix_chain, seq.blocks)


def _next_block(seq: Sequence, hit: list[int]) -> Optional[bytes]:
    """The name of the first prompt block a sequence must compute after its cached `hit` (None: no full
    block left to compute, or no prefix cache)."""
    chain = seq.prefix_chain
    return chain[len(hit)] if chain is not None and len(hit) < len(chain) else None
