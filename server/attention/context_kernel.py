"""Prompt attention on CPU straight from the paged KV cache, for prompts from position 0 and after a cached prefix.

A prompt computes its n new tokens, each attending over its whole context (a cached prefix if it hit the
prefix cache, then the earlier new tokens): n x L scores a head. For a hit, torch's path gathers the
context's K and V out of the pages (index_select), builds a bottom-right causal mask and runs masked SDPA;
measured on SmolLM2's shapes (32 new tokens over 544, 2 threads) that took 0.5 ms a layer, 16 ms of a 46 ms
hit. From position 0, causal SDPA over a 544-token prompt takes 3.4 ms a layer, this kernel 2.0 (AVX-512);
on an AVX2-only Zen 3 (2 threads) the kernel takes 7.4 ms, the 7 hits of a step (32 queries over 544 each) 5-7.

This kernel reads the cache rows in place. For each KV head it first lays the context's keys out
transposed, 16 keys a vector, so a query's scores for 16 keys are one chain of FMAs over the head
width (no horizontal sums); then blocks of QB queries, with the query heads that share the KV head,
share every key and value load. Softmax is exact two-pass, in fp32, with the decode kernel's
polynomial exp (server/attention/decode_kernel.py).

A query's numbers depend only on its own query vector and the keys and values it sees: scores are
summed in the same order whatever the block, its softmax runs over its own keys (those past its
position are -inf, hence exactly 0), and the values past its position, which its block partner may
see, add exact zeros. So a prompt's bits do not depend on its batch, on how many of its tokens were
cached, or on which other prompts share the call: a prompt after a prefix-cache hit gets the bits it
would have had from scratch.
"""
from __future__ import annotations

import ctypes
import functools
import itertools
import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from server.attention.decode_kernel import COMMON_SOURCE, accepts_shapes, load_kernel
from server.core.native import C_GROW_BUFFER, c_source

# The keys of a call's sequences, transposed, live in one buffer kept by the calling thread; calls are split so
# that it stays under this many floats (64 MB), and a sequence needing more goes to torch's path.
MAX_WORKSPACE = 1 << 24

_TEMPLATE = c_source(__file__, "context_kernel.c")


# Queries i0 .. i0+QN-1 of one sequence (n queries, the last n of its L context tokens; query i sees keys
# 0 .. L-n+i) and the G query heads of KV head g. Instantiated with G, C (= hd / 16) and QN as compile-time
# constants for the shapes in SHAPES, so the accumulators are fixed-size arrays the compiler keeps in
# registers (with the sizes as function arguments they are variable-length arrays, kept in memory: 2x slower).
_BLOCK_ARGS = ("int g, int i0, int n, int L, int nh, int nkv, const float* q, long qs, const float* kt, "
               "const float* vc, const int64_t* rw, float scale, float* s, float* out")
_BLOCK_BODY = c_source(__file__, "context_block.c")
SHAPES = ((3, 4), (4, 4), (8, 4), (4, 8), (1, 4), (2, 4))  # (query heads a KV head, head width / 16)


def _source() -> str:
    blocks, cases = [], []
    for G, C in SHAPES:
        for QN in (1, 2):
            blocks.append(f"static void block_{G}_{C}_{QN}({_BLOCK_ARGS}) {{\n"
                          f"  enum {{ G = {G}, C = {C}, QN = {QN} }};\n{_BLOCK_BODY}}}\n")
            cases.append(f"  if (G == {G} && C == {C} && QN == {QN}) "
                         f"{{ block_{G}_{C}_{QN}(g, i0, n, L, nh, nkv, q, qs, kt, vc, rw, scale, s, out); return; }}")
    blocks.append(f"static void block_any(const int G, const int C, const int QN, {_BLOCK_ARGS}) {{\n{_BLOCK_BODY}}}\n")
    body = _TEMPLATE.replace("@BLOCKS@", "\n".join(blocks)).replace("@DISPATCH@", "\n".join(cases))
    return COMMON_SOURCE + C_GROW_BUFFER + body


_SOURCE = _source()


class ContextAttention:
    """softmax(q K^T / sqrt(d)) V for prompt tokens whose context (cached or not) is in the paged cache."""

    def __init__(self, lib: ctypes.CDLL):
        i, lg, p, f = ctypes.c_int, ctypes.c_long, ctypes.c_void_p, ctypes.c_float
        lib.lsq_context_attention.argtypes = [i, p, p, p, p, i, i, i, p, lg, p, p, p, f, p]
        lib.lsq_context_attention.restype = ctypes.c_int
        self._fn = lib.lsq_context_attention

    @staticmethod
    def accepts(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
        return accepts_shapes(q, k_cache)

    @staticmethod
    def workspace(length: int, k_cache: torch.Tensor) -> int:
        """Floats of the transposed-key buffer a context of `length` keys takes."""
        return k_cache.shape[1] * (-(-length // 16) * 16) * k_cache.shape[2]

    def accepts_context(self, length: int, k_cache: torch.Tensor) -> bool:
        return self.workspace(length, k_cache) <= MAX_WORKSPACE

    def plan(self, runs: Sequence[tuple[int, int]], contexts: Sequence[torch.Tensor],
             k_cache: torch.Tensor) -> list["ContextCall"]:
        """The calls for these sequences (`runs` (start, n): query rows of each; `contexts`: int64 cache rows
        of each one's whole context in position order, its own n rows last), split so that each call's
        transposed keys fit MAX_WORKSPACE. The same for every layer of a step: made once a step."""
        calls: list[ContextCall] = []
        group: list[int] = []
        used = 0
        for i, ((_, n), c) in enumerate(zip(runs, contexts)):
            need = self.workspace(c.shape[0], k_cache)
            if c.dtype != torch.int64 or c.dim() != 1 or not n <= c.shape[0] or need > MAX_WORKSPACE:
                raise ValueError(f"a context of {tuple(c.shape)} {c.dtype} rows for {n} queries: 1-D int64 rows that "
                                 f"hold the queries' own and fit the kernel's workspace ({MAX_WORKSPACE} floats)")
            if group and used + need > MAX_WORKSPACE:
                calls.append(ContextCall.of([runs[j] for j in group], [contexts[j] for j in group]))
                group, used = [], 0
            group.append(i)
            used += need
        if group:
            calls.append(ContextCall.of([runs[j] for j in group], [contexts[j] for j in group]))
        return calls

    def run(self, calls: Sequence["ContextCall"], q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
            out: torch.Tensor) -> torch.Tensor:
        """q [T, nh, hd]; caches [R, nkv, hd] (contiguous); writes the planned sequences' rows of `out`
        ([T, nh, hd], contiguous) and returns it."""
        T, nh, hd = q.shape
        if not (q.stride(2) == 1 and q.stride(1) == hd):
            q = q.contiguous()
        if not (k_cache.is_contiguous() and v_cache.is_contiguous() and out.is_contiguous()):
            raise ValueError("context attention takes contiguous caches and output")
        for c in calls:
            rc = self._fn(c.count, c.nq.data_ptr(), c.nctx.data_ptr(), c.q0.data_ptr(), c.r0.data_ptr(), nh,
                          k_cache.shape[1], hd, q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(),
                          c.rows.data_ptr(), hd ** -0.5, out.data_ptr())
            if rc != 0:
                raise MemoryError("context attention: no memory for its workspace")
        return out

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 runs: Sequence[tuple[int, int]], contexts: Sequence[torch.Tensor],
                 out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`plan` and `run` at once (tests, one-off calls); `out` is made when None."""
        if out is None:
            out = torch.empty(q.shape, dtype=q.dtype)
        return self.run(self.plan(runs, contexts, k_cache), q, k_cache, v_cache, out)


@dataclass(frozen=True)
class ContextCall:
    """One kernel call's arguments: per sequence its query count, context length, first query row and
    first context row in `rows` (all of the call's contexts, concatenated)."""

    count: int
    nq: torch.Tensor
    nctx: torch.Tensor
    q0: torch.Tensor
    r0: torch.Tensor
    rows: torch.Tensor

    @classmethod
    def of(cls, runs: Sequence[tuple[int, int]], contexts: Sequence[torch.Tensor]) -> "ContextCall":
        lengths = [c.shape[0] for c in contexts]
        return cls(len(runs), torch.tensor([n for _, n in runs], dtype=torch.int32),
                   torch.tensor(lengths, dtype=torch.int32), torch.tensor([s for s, _ in runs], dtype=torch.int64),
                   torch.tensor([0, *itertools.accumulate(lengths[:-1])], dtype=torch.int64),
                   torch.cat(list(contexts)) if len(contexts) > 1 else contexts[0].contiguous())


@functools.lru_cache(maxsize=None)
def load() -> Optional[ContextAttention]:
    """The kernel, built on first use; None where it cannot be had or LORASERVE_CONTEXT_ATTENTION=sdpa."""
    return load_kernel("context_attention", _SOURCE, ContextAttention, "LORASERVE_CONTEXT_ATTENTION",
                       "prompt attention", logging.getLogger(__name__))
