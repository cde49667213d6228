"""Which rank rows of adapter memory are free: the pool's allocator (`server/lora/pool.py`).

Adapter memory is paged by rank row (`server/lora/stacks.py`): an adapter of rank r holds r rows, and its
slot's page table names them, so any r free rows serve it. There is therefore no external fragmentation to
manage (no compaction, no buddy blocks): eviction frees rows and the next load takes whichever are free.
Adjacent rows are still preferred (first fit of a run, else the lowest free rows), because an adapter whose
rows are adjacent is written with one copy per tensor and, with its neighbours of the same rank, read by the
torch backend as a view instead of a gather. Row 0 is the all-zero row the page tables point to past an
adapter's rank; it is never handed out.
"""
from __future__ import annotations

from typing import Optional


class RowAllocator:
    def __init__(self, num_rows: int):
        """Rows 1..num_rows can be handed out (row 0 is the zero row)."""
        if num_rows < 1:
            raise ValueError("adapter memory needs at least one rank row")
        self.num_rows = num_rows
        self._free = bytearray(b"\x01") * (num_rows + 1)
        self._free[0] = 0
        self.num_free = num_rows

    @property
    def num_used(self) -> int:
        return self.num_rows - self.num_free

    def allocate(self, n: int) -> Optional[list[int]]:
        """n rows (the first run of n adjacent free rows, else the n lowest free ones), or None if fewer are free."""
        if n < 1 or n > self.num_free:
            return None
        start = self._free.find(b"\x01" * n)
        rows = list(range(start, start + n)) if start >= 0 else self._lowest_free(n)
        for r in rows:
            self._free[r] = 0
        self.num_free -= n
        return rows

    def free(self, rows: list[int]) -> None:
        for r in rows:
            if not 1 <= r <= self.num_rows or self._free[r]:
                raise ValueError(f"row {r} is not an allocated row")
            self._free[r] = 1
        self.num_free += len(rows)

    def _lowest_free(self, n: int) -> list[int]:
        out: list[int] = []
        i = self._free.find(1)
        while len(out) < n:
            out.append(i)
            i = self._free.find(1, i + 1)
        return out


def runs(rows: list[int]) -> list[tuple[int, int, int]]:
    """(first row, position of that row in `rows`, length) of each stretch of adjacent rows, in order."""
    out: list[tuple[int, int, int]] = []
    for j, r in enumerate(rows):
        if out and out[-1][0] + out[-1][2] == r:
            first, at, n = out[-1]
            out[-1] = (first, at, n + 1)
        else:
            out.append((r, j, 1))
    return out
