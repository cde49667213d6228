"""Greedy sampling picks what argmax picks: the first maximum of a row, a NaN row's first NaN."""
from __future__ import annotations

import torch

from server.engine.sampler import sample
from server.engine.types import SamplingParams


def test_greedy_rows_take_the_first_maximum_like_argmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.randint(-3, 4, (16, 1000), generator=g).float()  # many ties per row
    logits[3, 17] = logits[3, 400] = float("nan")
    logits[5] = float("-inf")
    params = [SamplingParams(max_new_tokens=1)] * 16
    assert sample(logits, params, [None] * 16) == torch.argmax(logits, dim=-1).tolist()
    assert sample(logits, params, [None] * 16)[3] == 17 and sample(logits, params, [None] * 16)[5] == 0
