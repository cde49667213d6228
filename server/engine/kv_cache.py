"""Paged KV-cache bookkeeping: fixed-size blocks handed to sequences, block tables per sequence.

The tensors live in `server.model.llama.KVCache`; this module only decides which
blocks belong to whom. Block b holds cache rows [b * block_size, (b + 1) * block_size).

A block may be shared (the prefix cache hands one cached block to several sequences),
so each block counts its users. A block whose last user releases it goes back to the
free list, unless the prefix cache keeps it: then it waits in an LRU of idle cached
blocks, still counted as free, and is evicted (its content forgotten, `on_evict`) only
when an allocation finds the free list empty.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("KV cache needs at least one block of at least one token")
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._refs = [0] * num_blocks
        self._kept: set[int] = set()                       # blocks the prefix cache keeps after use
        self._idle: "OrderedDict[int, None]" = OrderedDict()  # kept blocks nobody uses, least recent first
        self.on_evict: Callable[[int], None] = lambda block: None

    @property
    def num_free(self) -> int:
        """Blocks an allocation may take: empty ones and idle cached ones."""
        return len(self._free) + len(self._idle)

    @property
    def num_used(self) -> int:
        """Blocks some sequence holds (idle cached blocks are not in use)."""
        return self.num_blocks - self.num_free

    @property
    def num_idle_cached(self) -> int:
        return len(self._idle)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def is_idle(self, block: int) -> bool:
        return block in self._idle

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise MemoryError(f"asked for {n} KV blocks, {self.num_free} free")
        out = []
        for _ in range(n):
            if self._free:
                b = self._free.pop()
            else:
                b, _ = self._idle.popitem(last=False)
                self._kept.discard(b)
                self.on_evict(b)
            self._refs[b] = 1
            out.append(b)
        return out

    def share(self, blocks: list[int]) -> None:
        """One more user for each of these (cached) blocks; an idle one leaves the LRU."""
        for b in blocks:
            self._refs[b] += 1
            self._idle.pop(b, None)

    def free(self, blocks: list[int]) -> None:
        """Drop one user of each block; the table is emptied. The tail goes first, so a kept chain's
        last blocks are the least recent and are evicted before its head."""
        for b in reversed(blocks):
            self._refs[b] -= 1
            if self._refs[b] == 0:
                if b in self._kept:
                    self._idle[b] = None
                else:
                    self._free.append(b)
        blocks.clear()

    def keep(self, block: int) -> None:
        """The prefix cache keeps this block's content after its users are gone."""
        self._kept.add(block)

    def forget(self, block: int) -> None:
        """The prefix cache no longer keeps this block; an idle one becomes plain free."""
        self._kept.discard(block)
        if block in self._idle:
            del self._idle[block]
            self._free.append(block)

    def context_rows(self, tables: list[list[int]], length: int) -> torch.Tensor:
        """[len(tables), length] flat cache rows of positions 0..length-1 of each sequence, in one tensor op: block
        tables cut or padded to the blocks `length` needs, so positions past a sequence's own blocks read block 0's
        rows (the caller masks them)."""
        nb = self.blocks_for(length)
        table = torch.tensor([t[:nb] + [0] * (nb - min(nb, len(t))) for t in tables], dtype=torch.long)
        positions = torch.arange(length)
        return table.view(len(tables), nb)[:, positions // self.block_size] * self.block_size \
            + positions % self.block_size

    def rows(self, blocks: list[int], start: int, end: int) -> torch.Tensor:
        """Flat cache rows [end - start] of token positions [start, end) of a sequence with block table `blocks`."""
        pos = torch.arange(start, end)
        table = torch.tensor(blocks[:self.blocks_for(end)], dtype=torch.long)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size
