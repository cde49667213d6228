"""Turn the last-position logits of each scheduled sequence into its next token.

Greedy rows are one batched argmax. Sampled rows use the request's own generator
(seeded from its seed), so the same seed gives the same output whatever else runs.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from server.engine.types import SamplingParams


def make_generator(seed: int) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return g


def _filter(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    logits = logits / p.temperature
    if p.top_k and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the mass before it already reaches top_p; the first always stays.
        drop = (torch.cumsum(probs, dim=-1) - probs) >= p.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(0, order, sorted_logits)
    return logits


def sample(logits: torch.Tensor, params: Sequence[SamplingParams],
           generators: Sequence[Optional[torch.Generator]]) -> list[int]:
    """logits [N, vocab] fp32 (any device) -> N token ids."""
    out = torch.argmax(logits, dim=-1).tolist()
    for i, (p, g) in enumerate(zip(params, generators)):
        if p.temperature > 0.0:
            probs = torch.softmax(_filter(logits[i].float().cpu(), p), dim=-1)
            out[i] = int(torch.multinomial(probs, 1, generator=g).item())
    return out
