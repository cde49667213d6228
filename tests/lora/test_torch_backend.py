"""The torch reference backend: every row of a step gets exactly its own adapter's delta, on every
projection of every layer, whether the step's adapter rows form one run of slots or not, and wherever the
adapters' rank rows lie (adjacent ones are read as views, others gathered)."""
from __future__ import annotations

import pytest
import torch

from server.lora.torch_backend import TorchBackend
from server.model.config import PROJECTIONS
from tests.lora.backend_utils import TINY, check_step, pool_with, random_adapter, scattered_pool_with

ADAPTERS = [random_adapter(TINY, 8, ("q", "k", "v", "o", "gate", "up", "down"), 1),
            random_adapter(TINY, 3, ("q", "v"), 2),
            random_adapter(TINY, 16, ("gate", "up", "down"), 3)]


@pytest.mark.parametrize("scattered", [False, True], ids=["adjacent-rows", "scattered-rows"])
@pytest.mark.parametrize("rows,num_decode", [
    ([1, 2, 3], 3),                                 # decode of distinct adapters: a contiguous run of slots
    ([0, 1, 3, 1, 1, 1, 1, 0, 0, 2, 2, 2], 3),      # decode then prompt rows, the base among them
    ([2, 2, 2, 2, 3, 3], 0),                        # prompts only
])
def test_each_row_gets_its_own_adapters_delta(rows, num_decode, scattered):
    pool, slots = (scattered_pool_with if scattered else pool_with)(ADAPTERS)
    if not scattered:
        assert slots == [1, 2, 3]
    by_slot = dict(zip(slots, ADAPTERS))
    rows = [slots[r - 1] if r else 0 for r in rows]
    step = TorchBackend(pool).prepare(rows, num_decode)
    assert step is not None and step.rank == 16
    torch.manual_seed(0)
    for layer in range(TINY.num_layers):
        for targets in PROJECTIONS:
            check_step(step, rows, by_slot, layer, TINY.projection(targets), where=(layer, targets))
    pool.shutdown()


def test_a_step_without_adapters_is_none():
    pool, _ = pool_with(ADAPTERS[:1])
    assert TorchBackend(pool).prepare([0, 0, 0], 1) is None
    pool.shutdown()


def test_adjacent_rows_of_one_rank_are_read_in_place_and_scattered_ones_gathered():
    same = [random_adapter(TINY, 8, ("q", "k", "v", "o", "gate", "up", "down"), s) for s in (4, 5, 6)]
    for make, in_place in ((pool_with, True), (scattered_pool_with, False)):
        pool, slots = make(same)
        rows = sorted(slots)
        step = TorchBackend(pool).prepare(rows, len(rows))  # decode of distinct adapters
        assert (step.views is not None) == in_place
        by_slot = dict(zip(slots, same))
        torch.manual_seed(1)
        for targets in PROJECTIONS:
            check_step(step, rows, by_slot, 1, TINY.projection(targets), where=(targets, in_place))
        pool.shutdown()


def test_a_mixed_steps_decode_and_prompt_rows_each_take_their_own_way():
    """Decode rows of distinct adapters and a prompt's long segment: each part is a run read in place."""
    same = [random_adapter(TINY, 8, ("q", "v", "down"), s) for s in (7, 8, 9)]
    pool, slots = pool_with(same)
    rows = [1, 2, 3] + [0] * 2 + [2] * 6  # the runner's order: each kind by slot, the base first
    step = TorchBackend(pool).prepare(rows, 3)
    assert len(step.parts) == 2 and all(p.views is not None for p in step.parts)
    by_slot = dict(zip(slots, same))
    torch.manual_seed(2)
    for targets in PROJECTIONS:
        check_step(step, rows, by_slot, 0, TINY.projection(targets), where=targets)
    pool.shutdown()
