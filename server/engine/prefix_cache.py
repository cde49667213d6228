"""The adapter-exact prefix cache: full KV blocks of prompts, found again by a hash chain.

Block i of a prompt is named by sha256(base fingerprint, adapter digest or none, the
block's token ids, the name of block i - 1). The KV of a block depends on exactly these:
the base weights, the adapter's weights (the digest is a content digest, so a new version
of an adapter under the same name is a new digest and never sees the old version's
blocks; vLLM keys by adapter name and serves stale KV after a reload), and every token
up to the block's end (the chain). Two requests share a block only when all of that matches.

Only full blocks of the prompt are cached (a block still being filled, or holding decoded
tokens, is private to its sequence). A request reuses its longest cached chain of full
blocks, but never its last prompt token: that token must be computed to give the first
logits. Cached blocks stay after their request ends and are evicted LRU by the allocator
(`BlockAllocator`) when it runs out of empty blocks; a block a running sequence holds is
never evicted. A deleted adapter version's blocks are never matched again (no request can
name a deleted version) and are the first to age out.
"""
from __future__ import annotations

import hashlib
from typing import Mapping, Optional

from server.engine.kv_cache import BlockAllocator

NO_ADAPTER = "base"


class PrefixCache:
    def __init__(self, blocks: BlockAllocator, base_fingerprint: str):
        self.blocks = blocks
        self.base_fingerprint = base_fingerprint
        self._block_of: dict[bytes, int] = {}
        self._hash_of: dict[int, bytes] = {}
        blocks.on_evict = self._evicted
        self.hits = 0           # requests that reused at least one cached block
        self.misses = 0         # requests that found none
        self.tokens_saved = 0   # prompt tokens whose KV was reused instead of computed

    @property
    def num_cached_blocks(self) -> int:
        return len(self._block_of)

    def chain(self, token_ids: list[int], num_prompt: int, adapter_digest: Optional[str]) -> list[bytes]:
        """The names of the prompt's full blocks, in order."""
        bs = self.blocks.block_size
        seed = hashlib.sha256(f"{self.base_fingerprint}\0{adapter_digest or NO_ADAPTER}".encode()).digest()
        out: list[bytes] = []
        prev = seed
        for i in range(num_prompt // bs):
            h = hashlib.sha256(prev)
            h.update(b"".join(t.to_bytes(4, "little") for t in token_ids[i * bs:(i + 1) * bs]))
            prev = h.digest()
            out.append(prev)
        return out

    def match(self, chain: list[bytes], num_tokens: int, pending: Optional[Mapping[bytes, int]] = None) -> list[int]:
        """The blocks of the longest prefix of `chain` that is cached or, by name, in `pending` (blocks being
        written this step), leaving at least the last of `num_tokens` tokens to compute. Nothing is
        reserved: `BlockAllocator.share` them to use them."""
        limit = min(len(chain), (num_tokens - 1) // self.blocks.block_size)
        out: list[int] = []
        for h in chain[:limit]:
            b = self._block_of.get(h)
            if b is None and pending:
                b = pending.get(h)
            if b is None:
                break
            out.append(b)
        return out

    def record(self, num_blocks: int) -> None:
        """Count one admitted request that reused `num_blocks` cached blocks."""
        if num_blocks:
            self.hits += 1
            self.tokens_saved += num_blocks * self.blocks.block_size
        else:
            self.misses += 1

    def insert(self, chain: list[bytes], table: list[int]) -> None:
        """After a prefill wrote them: keep a sequence's full prompt blocks under their names. A name
        already cached keeps its block (the sequence's copy stays private and is freed with it)."""
        for h, b in zip(chain, table):
            if h not in self._block_of and b not in self._hash_of:
                self._block_of[h] = b
                self._hash_of[b] = h
                self.blocks.keep(b)

    def clear(self) -> None:
        """Forget every cached block (the ones in use stay with their sequences)."""
        for b in list(self._hash_of):
            self.blocks.forget(b)
        self._block_of.clear()
        self._hash_of.clear()

    def _evicted(self, block: int) -> None:
        h = self._hash_of.pop(block, None)
        if h is not None:
            del self._block_of[h]
