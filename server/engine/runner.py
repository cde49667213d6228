"""Build one step's batch tensors and run the model: tokens in, next-token logits out.

Decode rows come first, then prompt rows; within each kind sequences are ordered by
adapter slot so that each adapter's tokens are contiguous (one LoRA segment per adapter
and kind). Prefill runs and decode rows are described to attention by index. A prefill
that starts from a cached prefix runs only its uncached tokens, and attention reads the
cached ones from the KV cache (`AttentionMetadata.prefill_context`).

Two kinds of index meet here: an *adapter slot* (which slot of the LoRA pool a sequence's
adapter sits in, 0 for none) and a *KV row* (a flat row of the paged KV cache, which
attention calls its slot mapping).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from server.attention.sdpa import AttentionMetadata
from server.engine.cuda_graphs import DecodeGraphs
from server.engine.kv_cache import BlockAllocator
from server.engine.scheduler import Sequence
from server.lora.backend import LoraBackend
from server.model.llama import KVCache, LlamaForCausalLM


@dataclass
class StepResult:
    seqs: list[Sequence]   # in the order of the logits rows
    logits: torch.Tensor   # [len(seqs), vocab] fp32


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, kv: KVCache, blocks: BlockAllocator, lora: LoraBackend):
        self.model, self.kv, self.blocks, self.lora = model, kv, blocks, lora
        self.device = model.device
        # Set by the engine when decode steps replay CUDA graphs (server/engine/cuda_graphs.py).
        self.decode_graphs: Optional[DecodeGraphs] = None

    def execute(self, prefill: list[Sequence], decode: list[Sequence]) -> StepResult:
        graphs = self.decode_graphs
        if graphs is not None and graphs.covers(prefill, decode):
            seqs, logits = graphs.run(decode)
            for s in seqs:
                s.num_cached = len(s.token_ids)
            return StepResult(seqs, logits)
        # Decode rows first, then prompt rows (quantized linears treat the two kinds differently,
        # so each kind must be one contiguous block); by adapter slot within each kind.
        seqs = sorted(prefill + decode, key=lambda s: (s.is_prefill, s.adapter_slot or 0, s.order))
        ids: list[int] = []
        pos: list[int] = []
        bs = self.blocks.block_size
        decode_kv_rows: list[int] = []  # per decoding sequence, the KV row its new token is written to
        new_kv_rows: list[torch.Tensor] = []  # per prefilling sequence, the KV rows of its new tokens
        adapter_slots: list[int] = []  # per row (token), its adapter's slot
        prefill_runs: list[tuple[int, int]] = []
        prefill_context: list[torch.Tensor | None] = []  # per run: KV rows of its whole context, if cached
        decode_rows: list[int] = []  # the batch rows of decode tokens
        decode_seqs: list[Sequence] = []
        last_rows: list[int] = []
        for s in seqs:
            start = len(ids)
            if s.is_prefill:
                c, total = s.num_cached, len(s.token_ids)
                n = total - c
                ids.extend(s.token_ids[c:])
                pos.extend(range(c, total))
                prefill_runs.append((start, n))
                context_rows = self.blocks.rows(s.blocks, 0, total)
                prefill_context.append(context_rows.to(self.device) if c else None)
                new_kv_rows.append(context_rows[c:])
            else:
                n = 1
                p = len(s.token_ids) - 1
                ids.append(s.token_ids[-1])
                pos.append(p)
                decode_rows.append(start)
                decode_seqs.append(s)
                # one row, in plain ints (decode rows come first, so they lead the slot mapping)
                decode_kv_rows.append(s.blocks[p // bs] * bs + p % bs)
            adapter_slots.extend([s.adapter_slot or 0] * n)
            last_rows.append(len(ids) - 1)
        num_decode = len(decode_rows)

        dev = self.device
        attn = AttentionMetadata(
            slot_mapping=torch.cat([torch.tensor(decode_kv_rows, dtype=torch.long), *new_kv_rows]).to(dev),
            prefill=tuple(prefill_runs),
            prefill_context=tuple(prefill_context),
            all_decode=not prefill_runs,
            prompt_from=num_decode if prefill_runs else None,
        )
        if decode_seqs:
            ctx = [len(s.token_ids) for s in decode_seqs]
            L = max(ctx)
            # Every sequence's context rows at once: block tables padded to the longest, rows past a
            # sequence's own length zero (read by nothing: the mask and the kernel's lengths stop before).
            mask = torch.arange(L)[None, :] < torch.tensor(ctx)[:, None]
            context_kv_rows = self.blocks.context_rows([s.blocks for s in decode_seqs], L) * mask
            attn.decode_kv = context_kv_rows.to(dev)
            attn.decode_mask = mask[:, None, None, :].to(dev)
            if prefill_runs:
                attn.decode_rows = torch.tensor(decode_rows, dtype=torch.long, device=dev)

        lora = self.lora.prepare(adapter_slots, num_decode)
        hidden = self.model(torch.tensor(ids, dtype=torch.long, device=dev),
                            torch.tensor(pos, dtype=torch.long, device=dev), attn, self.kv, lora)
        logits = self.model.logits(hidden.index_select(0, torch.tensor(last_rows, device=dev)))
        for s in seqs:
            s.num_cached = len(s.token_ids)
        return StepResult(seqs, logits)
