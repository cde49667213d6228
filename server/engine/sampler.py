"""Turn the last-position logits of each scheduled sequence into its next token.

Greedy rows are one batched argmax. Sampled rows use the request's own generator
(seeded from its seed), so the same seed gives the same output whatever else runs.
Log-probabilities, for the rows that ask, come from the same logits before any sampling
transform (temperature, top-k, top-p): the model's own distribution, as vLLM reports it.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from server.engine.types import SamplingParams, TokenLogprob


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
    # max's indices are argmax's (the first maximum; a NaN wins), at a third of its time on CPU.
    out = logits.max(dim=-1).indices.tolist()
    for i, (p, g) in enumerate(zip(params, generators)):
        if p.temperature > 0.0:
            probs = torch.softmax(_filter(logits[i].float().cpu(), p), dim=-1)
            out[i] = int(torch.multinomial(probs, 1, generator=g).item())
    return out


def token_logprobs(logits: torch.Tensor, params: Sequence[SamplingParams],
                   tokens: Sequence[int]) -> list[Optional[TokenLogprob]]:
    """Per row: the chosen token's log-probability and the `params.logprobs` most likely alternatives.

    None for rows that did not ask. One log_softmax and one top-k over the rows that did,
    in fp32, before temperature/top-k/top-p (so identical for greedy and sampled requests).
    """
    out: list[Optional[TokenLogprob]] = [None] * len(params)
    rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    if not rows:
        return out
    index = torch.tensor(rows, device=logits.device)
    lp = torch.log_softmax(logits.index_select(0, index).float(), dim=-1)
    chosen_ids = torch.tensor([tokens[i] for i in rows], device=lp.device)
    chosen = lp.gather(1, chosen_ids[:, None])[:, 0].tolist()
    k = max(params[i].logprobs or 0 for i in rows)
    top_vals: list[list[float]] = [[] for _ in rows]
    top_ids: list[list[int]] = [[] for _ in rows]
    if k:
        vals, ids = lp.topk(min(k, lp.shape[-1]), dim=-1)
        top_vals, top_ids = vals.tolist(), ids.tolist()
    for j, i in enumerate(rows):
        n = params[i].logprobs or 0
        out[i] = TokenLogprob(int(tokens[i]), float(chosen[j]), tuple(zip(top_ids[j][:n], top_vals[j][:n])))
    return out
