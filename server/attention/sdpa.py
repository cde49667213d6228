"""Attention over a flat mixed batch with a paged KV cache.

On CPU (fp32) every prefilling sequence's prompt tokens read their context's K/V in place from the paged
cache, whether the sequence starts at position 0 (its context: its own just-written rows) or after a cached
prefix (the cached rows, then its own): one call of `server.attention.context_kernel` for the step's
prefills. A token's bits then depend only on its query and the keys it sees, so a prompt computed after a
prefix-cache hit is bit-identical to the same prompt computed from scratch. Elsewhere (or where the kernel
does not serve) torch SDPA does: a sequence from position 0 needs only its own new tokens, one causal SDPA
call each; one after a cached prefix gathers its whole context for one SDPA call with a bottom-right causal
mask (query i, at position c + i, sees keys 0..c + i).
Decoding sequences read their whole context from the paged cache: on CPU (fp32) in place,
by `server.attention.decode_kernel`, elsewhere gathered and padded for one batched, masked
SDPA call. On CUDA, `server.attention.xformers_probe` may swap in xformers for the
from-scratch prefills.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from server.attention import context_kernel, decode_kernel


DECODE_KV_ALIGN = 64  # decode contexts are padded to a multiple of this (AttentionMetadata.padded_decode)


@dataclass(frozen=True)
class InPlacePrefills:
    """Which prefill runs (indices into `AttentionMetadata.prefill`) the context kernel serves, and its calls."""

    kernel: Optional[context_kernel.ContextAttention]
    runs: frozenset[int]
    calls: list[context_kernel.ContextCall]


@dataclass
class AttentionMetadata:
    """Where each token's K/V goes and what each query may read.

    slot_mapping: [T] flat cache row of each new token (None: no cache, e.g. scoring).
    prefill: (start, length) of every prefilling sequence's token run in the batch.
    prefill_context: per prefill run (empty: none has any), None when the run starts at position 0,
        else [c + length] flat cache rows of its whole context, the c cached tokens first.
    decode_rows: [D] batch rows of decoding tokens (None when there are none).
    decode_kv: [D, L] flat cache rows of each decoding sequence's context, padded.
    decode_mask: [D, 1, 1, L] True where a cache row is real context.
    all_decode: every token is a decode token, in row order (no gather/scatter needed).
    prompt_from: rows from here on are prompt tokens, the rows before it decode tokens (the
        runner orders them so); None when the step has no prompt tokens. torch's weight-only int8
        kernels multiply prompt rows and decode rows differently (server/model/quant.py); the
        dynamic int8 kernel, the CPU default, treats every row alike.
    """

    slot_mapping: Optional[torch.Tensor]
    prefill: tuple[tuple[int, int], ...]
    prefill_context: tuple[Optional[torch.Tensor], ...] = ()
    decode_rows: Optional[torch.Tensor] = None
    decode_kv: Optional[torch.Tensor] = None
    decode_mask: Optional[torch.Tensor] = None
    all_decode: bool = False
    prompt_from: Optional[int] = None
    _decode_padded: Optional[tuple[torch.Tensor, torch.Tensor]] = field(default=None, repr=False, compare=False)
    _decode_lengths: Optional[torch.Tensor] = field(default=None, repr=False, compare=False)
    _in_place: Optional[InPlacePrefills] = field(default=None, repr=False, compare=False)

    def in_place_prefills(self, q: torch.Tensor, kv: Optional[tuple[torch.Tensor, torch.Tensor]]) -> InPlacePrefills:
        """The prefills the CPU context kernel computes, and its planned calls: the same for every layer,
        so made once a step."""
        if self._in_place is None:
            kern = context_kernel.load() if q.device.type == "cpu" else None
            if kern is None or kv is None or not kern.accepts(q, kv[0]):
                self._in_place = InPlacePrefills(None, frozenset(), [])
            else:
                contexts = [self.context_rows(i) for i in range(len(self.prefill))]
                runs = [i for i, ctx in enumerate(contexts)
                        if ctx is not None and kern.accepts_context(ctx.shape[0], kv[0])]
                calls = kern.plan([self.prefill[i] for i in runs], [contexts[i] for i in runs], kv[0])
                self._in_place = InPlacePrefills(kern, frozenset(runs), calls)
        return self._in_place

    def context_rows(self, i: int) -> Optional[torch.Tensor]:
        """Prefill run i's whole context as flat cache rows: its cached prefix's, then its own (a run from
        position 0: its own slot-mapping rows, written before attention reads them); None without a cache."""
        ctx = self.prefill_context[i] if self.prefill_context else None
        if ctx is None and self.slot_mapping is not None:
            start, n = self.prefill[i]
            ctx = self.slot_mapping[start:start + n]
        return ctx

    def decode_lengths(self) -> torch.Tensor:
        """int32 [D]: each decoding sequence's context length (its mask's true prefix). Once a step."""
        if self._decode_lengths is None:
            assert self.decode_kv is not None and self.decode_mask is not None
            D, L = self.decode_kv.shape
            self._decode_lengths = self.decode_mask.reshape(D, L).sum(1, dtype=torch.int32)
        return self._decode_lengths

    def padded_decode(self) -> tuple[torch.Tensor, torch.Tensor]:
        """decode_kv and decode_mask with the context padded (masked) to a multiple of DECODE_KV_ALIGN.

        The padded length is the longest context in the batch, and torch's CPU attention sums a row's
        softmax in whole vectors plus a scalar tail: a position inside the tail for one batch and inside
        a vector for another gets different bits (measured: a decode token's hidden state changed with
        the other sequences' lengths). With the length a multiple of the widest vector, every real
        position is always in a whole vector and the padding adds exact zeros. Computed once a step.
        """
        if self._decode_padded is None:
            assert self.decode_kv is not None and self.decode_mask is not None
            pad = -self.decode_kv.shape[1] % DECODE_KV_ALIGN
            kv, mask = self.decode_kv, self.decode_mask
            if pad:
                kv = F.pad(kv, (0, pad))  # row 0 of the cache, masked out
                mask = F.pad(mask, (0, pad), value=False)
            self._decode_padded = (kv, mask)
        return self._decode_padded

    @classmethod
    def prefill_only(cls, lengths: list[int], device: torch.device,
                     slot_mapping: Optional[torch.Tensor] = None) -> "AttentionMetadata":
        runs, start = [], 0
        for n in lengths:
            runs.append((start, n))
            start += n
        return cls(slot_mapping=slot_mapping, prefill=tuple(runs), prompt_from=0)


# Swappable prefill kernel (xformers on CUDA): fn(q [n, nh, hd], k [n, nkv, hd], v) -> [n, nh, hd].
PrefillFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def sdpa_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
        is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
    return out[0].transpose(0, 1)


_prefill_fn: PrefillFn = sdpa_causal


def set_prefill_backend(fn: PrefillFn) -> None:
    global _prefill_fn  # noqa: PLW0603 (one process-wide backend, chosen once at start-up)
    _prefill_fn = fn


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn: AttentionMetadata,
                    kv: Optional[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """q [T, nh, hd], k/v [T, nkv, hd] for the new tokens; returns [T, nh, hd]."""
    if kv is not None and attn.slot_mapping is not None:
        kv[0].index_copy_(0, attn.slot_mapping, k)
        kv[1].index_copy_(0, attn.slot_mapping, v)
    if attn.all_decode:
        return _decode(q, attn, kv)
    out = torch.empty_like(q)
    in_place = attn.in_place_prefills(q, kv)
    for i, (start, n) in enumerate(attn.prefill):
        if i in in_place.runs:
            continue
        context = attn.prefill_context[i] if attn.prefill_context else None
        if context is None:
            out[start:start + n] = _prefill_fn(q[start:start + n], k[start:start + n], v[start:start + n])
        else:
            assert kv is not None, "a prefill after a cached prefix needs the KV cache"
            out[start:start + n] = _prefill_after_prefix(q[start:start + n], kv, context)
    if in_place.calls:
        assert kv is not None and in_place.kernel is not None
        in_place.kernel.run(in_place.calls, q, kv[0], kv[1], out)
    if attn.decode_rows is not None:
        out.index_copy_(0, attn.decode_rows, _decode(q.index_select(0, attn.decode_rows), attn, kv))
    return out


def _prefill_after_prefix(q: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], rows: torch.Tensor
                          ) -> torch.Tensor:
    """torch's path: q [n, nh, hd] of the last n of L context tokens whose K/V are at cache `rows` [L]."""
    n, L = q.shape[0], rows.shape[0]
    kc = kv[0].index_select(0, rows).transpose(0, 1)[None]  # [1, nkv, L, hd]
    vc = kv[1].index_select(0, rows).transpose(0, 1)[None]
    mask = torch.ones(n, L, dtype=torch.bool, device=q.device).tril(diagonal=L - n)
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], kc, vc, attn_mask=mask,
                                         enable_gqa=q.shape[1] != kc.shape[1])
    return out[0].transpose(0, 1)


def _decode(q: torch.Tensor, attn: AttentionMetadata,
            kv: Optional[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    assert kv is not None and attn.decode_kv is not None, "decoding needs the KV cache"
    kern = decode_kernel.load() if q.device.type == "cpu" else None
    if kern is not None and kern.accepts(q, kv[0]) and kern.accepts_context(attn.decode_kv.shape[1]):
        return kern(q, kv[0], kv[1], attn.decode_kv, attn.decode_lengths())
    decode_kv, mask = attn.padded_decode()
    D, L = decode_kv.shape
    rows = decode_kv.reshape(-1)
    # index_select copies whole cache rows (3-6x faster than 2-D advanced indexing on CPU).
    kc = kv[0].index_select(0, rows).view(D, L, *kv[0].shape[1:]).permute(0, 2, 1, 3)  # [D, nkv, L, hd]
    vc = kv[1].index_select(0, rows).view(D, L, *kv[1].shape[1:]).permute(0, 2, 1, 3)
    if q.is_cuda:
        return grouped_decode_sdpa(q, kc, vc, mask)
    out = F.scaled_dot_product_attention(q[:, :, None, :], kc, vc, attn_mask=mask,
                                         enable_gqa=q.shape[1] != kc.shape[1])
    return out[:, :, 0, :]


def grouped_decode_sdpa(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Decode attention with each KV head's query heads as that head's query rows: q [D, nh, hd], kc/vc
    [D, nkv, L, hd], mask [D, 1, 1, L] -> [D, nh, hd]. The CUDA form: with a mask, flash attention is out and
    the memory-efficient kernel takes no enable_gqa, so the GQA form fell back to the math kernel (fp32 scores,
    K/V repeated per query head); this one, without enable_gqa, the memory-efficient kernel takes."""
    D, nh, hd = q.shape
    nkv = kc.shape[1]
    out = F.scaled_dot_product_attention(q.view(D, nkv, nh // nkv, hd), kc, vc, attn_mask=mask)
    return out.reshape(D, nh, hd)
