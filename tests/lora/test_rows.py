"""The rank-row allocator: adjacent rows first, any free rows when none are adjacent, row 0 never handed out."""
from __future__ import annotations

import pytest

from server.lora.rows import RowAllocator, runs


def test_adjacent_rows_first_then_any_free_ones():
    rows = RowAllocator(10)
    assert rows.allocate(4) == [1, 2, 3, 4] and rows.allocate(4) == [5, 6, 7, 8]
    assert rows.num_free == 2 and rows.num_used == 8
    assert rows.allocate(3) is None  # only two free: the pool must evict first
    rows.free([1, 2, 3, 4])
    assert rows.allocate(2) == [1, 2]  # first fit
    rows.free([5, 6, 7, 8])
    assert rows.allocate(5) == [3, 4, 5, 6, 7]  # a run of 5 exists: taken whole
    assert rows.allocate(3) == [8, 9, 10]
    rows.free([1, 2, 5, 6, 9])
    assert rows.allocate(5) == [1, 2, 5, 6, 9]  # no run of 5: the lowest free rows, wherever they are
    assert rows.num_free == 0


def test_bad_frees_and_sizes_are_refused():
    rows = RowAllocator(4)
    got = rows.allocate(2)
    with pytest.raises(ValueError, match="row 0 is not an allocated row"):
        rows.free([0])  # the zero row is never handed out
    with pytest.raises(ValueError, match="row 3 is not an allocated row"):
        rows.free([3])  # not allocated
    rows.free(got)
    with pytest.raises(ValueError, match="is not an allocated row"):
        rows.free(got)  # twice
    assert rows.allocate(0) is None and rows.num_free == 4
    with pytest.raises(ValueError, match="at least one rank row"):
        RowAllocator(0)


def test_runs_split_rows_into_adjacent_stretches():
    assert runs([5, 6, 7, 2, 3, 9]) == [(5, 0, 3), (2, 3, 2), (9, 5, 1)]
    assert runs([]) == []
