"""Paged KV-cache bookkeeping: fixed-size blocks handed to sequences, block tables per sequence.

The tensors live in `server.model.llama.KVCache`; this module only decides which
blocks belong to whom. Block b holds cache rows [b * block_size, (b + 1) * block_size).
"""
from __future__ import annotations

import torch


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("KV cache needs at least one block of at least one token")
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise MemoryError(f"asked for {n} KV blocks, {len(self._free)} free")
        out = [self._free.pop() for _ in range(n)]
        return out

    def free(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))
        blocks.clear()

    def rows(self, blocks: list[int], start: int, end: int) -> torch.Tensor:
        """Flat cache rows [end - start] of token positions [start, end) of a sequence with block table `blocks`."""
        pos = torch.arange(start, end)
        table = torch.tensor(blocks[:self.blocks_for(end)], dtype=torch.long)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size
