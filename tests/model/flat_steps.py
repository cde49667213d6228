"""One flat model step built by hand, as the runner would build it: what the model tests drive the model with."""
from __future__ import annotations

from typing import Optional

import torch

from server.attention.sdpa import AttentionMetadata


def flat_step(model, kv, prefills: list[tuple], decodes: list[tuple[int, int, int]], block: int,
              lora: Optional[object] = None) -> torch.Tensor:
    """Decode rows first, then prompt rows (the runner's order). prefills: [(seq, tokens)] from position 0, or
    [(seq, tokens, cached)] after `cached` tokens already in the cache (a prefix-cache hit); decodes: [(seq,
    token, context length)]; sequence s owns cache rows s*block... Returns the model's hidden states."""
    ids, pos, slots, runs, contexts = [], [], [], [], []
    for s, tok, ctx in decodes:
        ids.append(tok); pos.append(ctx - 1); slots.append(s * block + ctx - 1)
    for s, toks, *cached in prefills:
        c = cached[0] if cached else 0
        runs.append((len(ids), len(toks)))
        contexts.append(torch.arange(s * block, s * block + c + len(toks)) if c else None)
        ids += toks; pos += range(c, c + len(toks)); slots += [s * block + c + j for j in range(len(toks))]
    attn = AttentionMetadata(slot_mapping=torch.tensor(slots), prefill=tuple(runs), prefill_context=tuple(contexts),
                             all_decode=not prefills, prompt_from=len(decodes) if prefills else None)
    if decodes:
        L = max(ctx for _, _, ctx in decodes)
        attn.decode_kv = torch.stack([torch.arange(s * block, s * block + L) for s, _, _ in decodes])
        attn.decode_mask = (torch.arange(L)[None, :] < torch.tensor([c for _, _, c in decodes])[:, None]
                            )[:, None, None, :]
        if prefills:
            attn.decode_rows = torch.arange(len(decodes))
    return model(torch.tensor(ids), torch.tensor(pos), attn, kv, lora)
