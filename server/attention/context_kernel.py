"""Prompt attention on CPU straight from the paged KV cache, for prompts from position 0 and after a cached prefix.

A prompt computes its n new tokens, each attending over its whole context (a cached prefix if it hit the
prefix cache, then the earlier new tokens): n x L scores a head. For a hit, torch's path gathers the
context's K and V out of the pages (index_select), builds a bottom-right causal mask and runs masked SDPA;
measured on SmolLM2's shapes (32 new tokens over 544, 2 threads) that took 0.5 ms a layer, 16 ms of a 46 ms
hit. From position 0, causal SDPA over a 544-token prompt takes 3.4 ms a layer, this kernel 2.0.

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
from server.core.native import C_GROW_BUFFER

# The keys of a call's sequences, transposed, live in one buffer kept by the calling thread; calls are split so
# that it stays under this many floats (64 MB), and a sequence needing more goes to torch's path.
MAX_WORKSPACE = 1 << 24

_TEMPLATE = r"""

#define QB 2  /* queries a block: with 3 query heads a KV head, 6 query vectors share each key and value load */

/* Grown, never shrunk, per thread: the transposed keys on the calling thread, the scores on each worker. */
static __thread float* tl_keys; static __thread size_t tl_keys_cap;
static __thread float* tl_scores; static __thread size_t tl_scores_cap;

/* 16 x 16 transpose in registers: at each level b, rows r and r + b (r & b == 0) swap the elements whose
   column has bit b set in one and not the other, so after all four levels (r, c) has moved to (c, r). */
#define LEVEL(b, m0, m1) \
  for (int r = 0; r < 16; r++) if (!(r & b)) { \
    const v16 a = x[r], c = x[r + b]; \
    x[r] = __builtin_shuffle(a, c, (i16)m0); x[r + b] = __builtin_shuffle(a, c, (i16)m1); \
  }
static inline void transpose16(v16 x[16]) {
  LEVEL(8, ((i16){0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23}),
           ((i16){8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31}))
  LEVEL(4, ((i16){0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27}),
           ((i16){4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31}))
  LEVEL(2, ((i16){0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29}),
           ((i16){2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31}))
  LEVEL(1, ((i16){0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30}),
           ((i16){1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31}))
}
#undef LEVEL

/* Keys b*16 .. b*16+15 of KV head g, transposed: kt[c*16 + t] = K[rows[b*16 + t]][g][c] (0 past the end). */
static void transpose_keys(const float* kc, const int64_t* rw, int L, int nkv, int hd, int g, int b, float* kt) {
  static const float zeros[256];
  const float* src[16];
  for (int t = 0; t < 16; t++) src[t] = b * 16 + t < L ? kc + (rw[b * 16 + t] * nkv + g) * hd : zeros;
  for (int c0 = 0; c0 < hd; c0 += 16) {
    v16 x[16];
    for (int t = 0; t < 16; t++) x[t] = load16(src[t] + c0);
    transpose16(x);
    for (int c = 0; c < 16; c++) store16(kt + (c0 + c) * 16, x[c]);
  }
}

/* The blocks' functions, one per (G, C, QN) the models have, then one for any shape: generated below. */
@BLOCKS@

static void dispatch(int G, int C, int QN, int g, int i0, int n, int L, int nh, int nkv, const float* q, long qs,
                     const float* kt, const float* vc, const int64_t* rw, float scale, float* s, float* out) {
@DISPATCH@
  /* Other shapes: arrays sized at run time (slower, the same formula). */
  block_any(G, C, QN, g, i0, n, L, nh, nkv, q, qs, kt, vc, rw, scale, s, out);
}

/* S sequences. Sequence s: its nq[s] queries are rows q0[s] .. of q ([T, nh, hd] rows qs floats apart) and
   of out ([T, nh, hd], contiguous); its nctx[s] context rows are rows[r0[s] ..]: cache rows of its keys
   and values, in position order, the last nq[s] of them its queries' own. Caches: [R, nkv, hd]. hd a
   multiple of 16, at most 256; nh / nkv at most 16. Returns 0, or -1 when memory ran out. */
int lsq_context_attention(int S, const int32_t* nq, const int32_t* nctx, const int64_t* q0, const int64_t* r0,
                          int nh, int nkv, int hd, const float* q, long qs, const float* kc, const float* vc,
                          const int64_t* rows, float scale, float* out) {
  const int G = nh / nkv, C = hd / 16;
  long kofs[S + 1], tofs[S + 1], qofs[S + 1];  /* per sequence: transposed-key floats, key blocks, query blocks */
  kofs[0] = tofs[0] = qofs[0] = 0;
  for (int s = 0; s < S; s++) {
    const long nb = (nctx[s] + 15) / 16;
    kofs[s + 1] = kofs[s] + nkv * nb * hd * 16;
    tofs[s + 1] = tofs[s] + nkv * nb;
    qofs[s + 1] = qofs[s] + nkv * (long)((nq[s] + QB - 1) / QB);
  }
  float* kt = grow(&tl_keys, &tl_keys_cap, (size_t)kofs[S]);
  if (!kt) return -1;
  int failed = 0;
  #pragma omp parallel
  {
    int s = 0;
    #pragma omp for schedule(static)
    for (long w = 0; w < tofs[S]; w++) {
      while (w >= tofs[s + 1]) s++;
      const long nb = (nctx[s] + 15) / 16, k = w - tofs[s];
      const int g = (int)(k / nb), b = (int)(k % nb);
      transpose_keys(kc, rows + r0[s], nctx[s], nkv, hd, g, b, kt + kofs[s] + (g * nb + b) * hd * 16);
    }
    s = 0;
    /* Round robin: a from-scratch prompt's later queries see more keys. */
    #pragma omp for schedule(static, 1)
    for (long w = 0; w < qofs[S]; w++) {
      while (w >= qofs[s + 1]) s++;
      const long nqb = (nq[s] + QB - 1) / QB, k = w - qofs[s];
      const int g = (int)(k / nqb), i0 = (int)(k % nqb) * QB;
      const int QN = nq[s] - i0 < QB ? nq[s] - i0 : QB;
      const long nb = (nctx[s] + 15) / 16;
      float* sc = grow(&tl_scores, &tl_scores_cap, (size_t)G * QB * nb * 16);
      if (!sc) { failed = 1; continue; }
      dispatch(G, C, QN, g, i0, nq[s], nctx[s], nh, nkv, q + q0[s] * qs, qs, kt + kofs[s] + (long)g * nb * hd * 16,
               vc, rows + r0[s], scale, sc, out + q0[s] * nh * hd);
    }
  }
  return failed ? -1 : 0;
}
"""


# Queries i0 .. i0+QN-1 of one sequence (n queries, the last n of its L context tokens; query i sees keys
# 0 .. L-n+i) and the G query heads of KV head g. Instantiated with G, C (= hd / 16) and QN as compile-time
# constants for the shapes in SHAPES, so the accumulators are fixed-size arrays the compiler keeps in
# registers (with the sizes as function arguments they are variable-length arrays, kept in memory: 2x slower).
_BLOCK_ARGS = ("int g, int i0, int n, int L, int nh, int nkv, const float* q, long qs, const float* kt, "
               "const float* vc, const int64_t* rw, float scale, float* s, float* out")
_BLOCK_BODY = r"""  const int hd = 16 * C, nv = G * QN;
  int len[QB];
  for (int qi = 0; qi < QN; qi++) len[qi] = L - n + i0 + qi + 1;
  const int nbm = (len[QN - 1] + 15) / 16;  /* s: [nv][nbm * 16] */
  const float* qp[G * QN];
  for (int qi = 0; qi < QN; qi++)
    for (int h = 0; h < G; h++) qp[qi * G + h] = q + (long)(i0 + qi) * qs + (long)(g * G + h) * hd;
  const i16 lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  /* Scores, 16 keys a vector: s[v][j] = scale * q_v . K_j, summed over the head width in order. */
  for (int b = 0; b < nbm; b++) {
    const float* kb = kt + (long)b * hd * 16;
    v16 acc[G * QN];
    for (int v = 0; v < nv; v++) acc[v] = (v16){0};
    for (int c = 0; c < hd; c++) {
      const v16 kv = load16(kb + c * 16);
      for (int v = 0; v < nv; v++) acc[v] += qp[v][c] * kv;
    }
    const i16 key = lane + b * 16;
    for (int qi = 0; qi < QN; qi++) {
      const i16 seen = key < len[qi];
      for (int h = 0; h < G; h++) {
        const int v = qi * G + h;
        const v16 sc = acc[v] * scale;
        store16(s + ((long)v * nbm + b) * 16, (v16)((seen & (i16)sc) | (~seen & (i16)((v16){0} - INFINITY))));
      }
    }
  }
  /* Softmax over each query's own keys; the blocks past them (its partner's) are zeros. */
  float den[G * QN];
  for (int qi = 0; qi < QN; qi++) {
    const int nb = (len[qi] + 15) / 16;
    for (int h = 0; h < G; h++) {
      float* sv = s + (long)(qi * G + h) * nbm * 16;
      v16 mv = load16(sv);  /* the masked lanes are -inf; a maximum is exact in any order */
      for (int b = 1; b < nb; b++) {
        const v16 x = load16(sv + 16 * b);
        const i16 gt = x > mv;
        mv = (v16)((gt & (i16)x) | (~gt & (i16)mv));
      }
      float m = mv[0];
      for (int t = 1; t < 16; t++) m = mv[t] > m ? mv[t] : m;
      v16 sum = {0};
      for (int b = 0; b < nb; b++) {
        const v16 e = vexp(load16(sv + 16 * b) - m);
        store16(sv + 16 * b, e);
        sum += e;
      }
      for (int b = nb; b < nbm; b++) store16(sv + 16 * b, (v16){0});
      den[qi * G + h] = hsum(sum);
    }
  }
  /* Values: each row read once for the block's query vectors, in key order. */
  v16 acc[G * QN][C];
  for (int v = 0; v < nv; v++)
    for (int c = 0; c < C; c++) acc[v][c] = (v16){0};
  const int lmax = len[QN - 1];
  for (int j = 0; j < lmax; j++) {
    if (j + PF < lmax) prefetch_row(vc + (rw[j + PF] * nkv + g) * hd, hd);
    const float* vr = vc + (rw[j] * nkv + g) * hd;
    v16 vv[C];
    for (int c = 0; c < C; c++) vv[c] = load16(vr + 16 * c);
    for (int v = 0; v < nv; v++) {
      const float p = s[(long)v * nbm * 16 + j];
      for (int c = 0; c < C; c++) acc[v][c] += p * vv[c];
    }
  }
  for (int qi = 0; qi < QN; qi++)
    for (int h = 0; h < G; h++)
      for (int c = 0; c < C; c++)
        store16(out + ((long)(i0 + qi) * nh + g * G + h) * hd + 16 * c, acc[qi * G + h][c] / den[qi * G + h]);
"""
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
