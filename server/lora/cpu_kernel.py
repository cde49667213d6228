"""Small C kernels for CPU LoRA where the base is quantized, reading bf16 or int8 copies of the adapters' rank rows.

A decode step of distinct adapters reads every adapter in the batch: 157 MB of fp32 LoRA
weights per step for 8 rank-16 adapters on SmolLM2, more than the int8 base itself. The
torch reference streams them with one bmm per slot group at about one core's bandwidth.
The decode kernel reads bf16 copies (half the bytes), accumulates in fp32, does shrink,
scale and expand of every decode token in one call per group of linears that read the same
x (q/k/v, gate/up: 4 calls a layer instead of 7, on `KernelPlan`s packed once at start-up so
a call costs about 6 us of Python), and splits the tokens over the engine thread's OpenMP
team. Measured in an A/B of 20-30 alternating SmolLM2 int8 decode steps, 8 distinct rank-16
adapters: +8-10 ms over the no-adapter step, against +15-17 ms for the fp32 torch path (an
fp32 version of this kernel gained nothing in the model: the bytes are the cost, not the calls).

The prompt kernel takes prompt rows in blocks of up to PROMPT_BLOCK (32) tokens of one adapter, a thread a span
of consecutive blocks of one adapter at a time (up to PROMPT_SPAN, 128 rows): it converts the adapter's rank
rows to fp32 once for the span (once a block before: 8 x 64 rows 68.8-71.8 against 77.6-85.9 ms, a 544-row
prompt 59.0-69.1 against 73.3-73.8 ms, alternating in one process on a slow host, the same bits; built for
AVX2 alone, 75.1 against 76.9 and 98.0 against 105.7 ms), then multiplies in register tiles of 4 tokens x 4 ranks
(shrink) or 4 tokens x 4 vectors of output columns (expand), AVX-512's 16 lanes where the CPU has them (2 and
8 on AVX2), so every weight loaded serves 4 tokens and every x 4 ranks. Measured on SmolLM2's shapes (8
adapters of rank 16, 8 x 64 prompt rows, 30 layers, int8 rows, 2 threads): 39.8-41.7 ms against 54.6-59.0 ms
for the previous kernel (blocks of 4 tokens, 8 lanes, a weight converted per use); bf16 rows 38.6-41.2
against 54.9-55.3 ms. With AVX-512 a token's four rank sums of a tile are reduced together (horizontal adds
across the four accumulators): the kernel alone 27.5-28.6 against 30.1-30.4 ms over 30 layers (rows in cache),
LoRA's share of that prefill in the engine 33.5 / 34.7 against 37.5 / 37.9 ms (rank 8: 19.8 against 23.7 ms).
Of the rest: gate/up's expand runs at about 95 G MAC/s where q/k/v's reaches 220; an order keeping B^T's
columns in L1 changed nothing, so its y traffic (6 MB read and written for 512 rows) is the likely bound; the
shrink runs at about 40% of the FMA peak (ranks outer, tokens inner measured no better). Every row of every
step takes one of the two kernels, by kind, and a token's arithmetic never depends on the rest of its batch
(tested: the same numbers alone and batched).

Where the CPU has AMX (bf16 tiles) and the shapes fit (in a multiple of 32, every target's out of 16), prompt
rows go through tiles instead: a block's x rounded to bf16 once for all its targets, the slot's A^T and B^T
laid out as the tiles read them (the weights exact in bf16), shrink and expand as tile products with fp32 sums,
the expand's tiles loaded from y and stored back. Measured (8 x 64 prompt rows on 8 rank-16 adapters, SmolLM2
int8, 2 threads): the kernel alone over 30 layers 14.9-15.2 ms against 24.8-25.1 ms for the vector kernel, the
LoRA share of that prefill in the engine 18.1 against 30.9 ms, of 8 x 544 rows 149 against 295 ms. What is
left is y: every tile of output is read and written once (gate/up: 12.6 MB a layer at 512 rows), at about the
rate the caches give; x and the rank values rounded to bf16 move a delta by about 0.2% (int8 rows' own
rounding: about 1%). Laying a slot's rows out for the tiles was 16-27% of the kernel's time when it was done
for every block of 32 rows; it is done once a span of up to PROMPT_SPAN (128) rows of one slot, the same bits:
8 x 64 rows 32.1-38.0 ms against 35.4-41.0 ms (the two kernels alternating in one process, a slow host that
day), one 544-row prompt 33.8-37.5 against 40.2-44.2 ms, 16 x 32 rows unchanged. `set_prompt_amx(False)` keeps
the vector kernel (tests use it).

Both read an adapter's ranks through the pool's page table (`server/lora/stacks.py`): rank j of slot
s is row pages[s, j], one pointer per row of in or out values, so an adapter's rows may lie anywhere in
adapter memory; entries past a slot's own rank (row 0, zeros) are skipped, so a rank-8 adapter costs
rank-8 reads in a step whose largest rank is 32.

Rounding adapter weights to bf16 (8 mantissa bits) is what GPU servers do when the model
runs in bf16; here it is used only where the base is already quantized
(`EngineConfig.lora_decode_dtype = "auto"`), never in the PEFT-exact `--quantize none` setting.
`--lora-decode-dtype int8` halves the bytes again: each rank row of A and of B^T as int8 with one fp32
scale (max |value| / 127, `stacks.quantize_rows`), folded into the rank's intermediate value, so the
kernels are the bf16 ones with another element type (one C template, two instances; the bf16 instance
multiplies by a constant 1, so its bits are unchanged).

Built once per machine by `server/core/native.py` (gcc or cc, `-O3 -march=native -fopenmp`) into `kernels/` under the
engine's home (`--home`) and loaded with ctypes after torch, so its OpenMP calls bind to
torch's own libgomp (checked: a second OpenMP runtime would fight torch's threads). Without a
compiler, or when any check fails, `load()` returns None and the torch reference serves.
`server/lora/cpu_backend.py` is the backend that runs these kernels; `--lora-backend` chooses it.
"""
from __future__ import annotations

import ctypes
import functools
import logging
from pathlib import Path
from typing import Optional

import torch

from server.core.native import C_AMX_TILES, C_GROW_BUFFER, NATIVE_FLAGS, NativeBuildError, build_and_load
from server.lora.segments import LoraSegments

log = logging.getLogger(__name__)

_HEADER = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
static inline float bf(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }

/* One targeted linear of a group that reads the same x (q/k/v, gate/up, or one alone): its rank rows
   A: row p at a + p * a_row (in values), B^T: row p at bt + p * bt_row (out values), bf16 or int8; scale:
   [slots] fp32; its output columns are y[:, y_off : y_off + out]. Slot s's rank j is row pages[s * R + j].
   int8 rows carry one fp32 scale each (a_sc[p], bt_sc[p]; NULL for bf16 rows). */
typedef struct {
  const void* a; long a_row;
  const void* bt; long bt_row;
  const float* scale;
  long out; long y_off;
  const float* a_sc; const float* bt_sc;
} lora_target;

/* A slot's rank in this step: r, less the page-table entries past its own rank (row 0, the zero row,
   which adds nothing; only a slot's last entries are 0). */
static inline int slot_rank(const int32_t* pg, int r) { while (r > 0 && pg[r - 1] == 0) r--; return r; }

static inline void prefetch_bytes(const void* row, long bytes) {
  for (long l = 0; l < bytes; l += 64) __builtin_prefetch((const char*)row + l);
}
typedef float v8f __attribute__((vector_size(32)));

static inline float hsum8(v8f v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }

/* 8 int8 weights as 8 floats: sign-extend and convert (two instructions with AVX2). */
#if defined(__AVX2__)
#include <immintrin.h>
static inline v8f i8x8(const int8_t* p) {
  const __m256 f = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
  v8f w;
  memcpy(&w, &f, sizeof w);
  return w;
}
#else
static inline v8f i8x8(const int8_t* p) { v8f w; for (int e = 0; e < 8; e++) w[e] = (float)p[e]; return w; }
#endif

#if defined(__AVX512F__)
/* 16 int8 weights as 16 floats (two instructions). */
static inline __m512 i8x16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
}

/* One row of x against one int8 weight row, four accumulators of 16 (an FMA's latency hidden). */
static inline float dot1_i8(const int8_t* row, int in, const float* x) {
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
  int i = 0;
  for (; i + 64 <= in; i += 64) {
    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i), i8x16(row + i), a0);
    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i + 16), i8x16(row + i + 16), a1);
    a2 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i + 32), i8x16(row + i + 32), a2);
    a3 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i + 48), i8x16(row + i + 48), a3);
  }
  for (; i + 16 <= in; i += 16) a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i), i8x16(row + i), a0);
  float t = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
  for (; i < in; i++) t += x[i] * (float)row[i];
  return t;
}

/* y[0..out) += v * row, 16 int8 weights at a time. */
static inline void axpy_i8(float* y, float v, const int8_t* row, int out) {
  const __m512 vv = _mm512_set1_ps(v);
  int o = 0;
  for (; o + 16 <= out; o += 16) _mm512_storeu_ps(y + o, _mm512_fmadd_ps(vv, i8x16(row + o), _mm512_loadu_ps(y + o)));
  for (; o < out; o++) y[o] += v * (float)row[o];
}
#else
/* One row of x against one int8 weight row, two accumulators of 8. */
static inline float dot1_i8(const int8_t* row, int in, const float* x) {
  v8f a0 = {0}, a1 = {0}, xv;
  int i = 0;
  for (; i + 16 <= in; i += 16) {
    memcpy(&xv, x + i, 32); a0 += xv * i8x8(row + i);
    memcpy(&xv, x + i + 8, 32); a1 += xv * i8x8(row + i + 8);
  }
  for (; i + 8 <= in; i += 8) { memcpy(&xv, x + i, 32); a0 += xv * i8x8(row + i); }
  float t = hsum8(a0 + a1);
  for (; i < in; i++) t += x[i] * (float)row[i];
  return t;
}

/* y[0..out) += v * row, 8 int8 weights at a time. */
static inline void axpy_i8(float* y, float v, const int8_t* row, int out) {
  int o = 0;
  for (; o + 8 <= out; o += 8) {
    v8f yv;
    memcpy(&yv, y + o, 32);
    yv += v * i8x8(row + o);
    memcpy(y + o, &yv, 32);
  }
  for (; o < out; o++) y[o] += v * (float)row[o];
}

#endif

/* The prompt kernel's register tiles: vectors of VW floats, TT tokens x TR ranks or TR vectors of output
   columns (16 + 4 vectors in flight of AVX-512's 32 registers, 8 + 2 of AVX2's 16). */
#if defined(__AVX512F__)
#define VW 16
#define TR 4
#else
#define VW 8
#define TR 2
#endif
#define TT 4
#define PROMPT_BLOCK @PROMPT_BLOCK@
/* Prompt rows of one slot a thread takes at a time (a span: whole blocks on consecutive rows, up to PROMPT_SPAN
   rows): the slot's rank rows are converted (vector path) or laid out for the tiles (AMX) once a span and target,
   not once a block. */
#define PROMPT_SPAN @PROMPT_SPAN@

/* A prompt kernel's blocks (see loraserve_prompt_*) gathered into spans, the same (row, rows, slot) triples, slot 0
   left out: a block joins the span before it when it has the same slot, starts where that span ends, that span
   holds whole blocks and the two fit in PROMPT_SPAN rows; returns how many spans. A row keeps its place within
   its block, so its numbers are those of the block alone. */
static int prompt_spans(int nb, const int64_t* blocks, int64_t* spans) {
  int ns = 0;
  for (int b = 0; b < nb; b++) {
    const int64_t row = blocks[3 * b], m = blocks[3 * b + 1], s = blocks[3 * b + 2];
    if (s == 0) continue;
    int64_t* last = spans + 3 * (ns - 1);
    if (ns && last[2] == s && last[0] + last[1] == row && last[1] % PROMPT_BLOCK == 0 && last[1] + m <= PROMPT_SPAN) {
      last[1] += m;
    } else {
      spans[3 * ns] = row;
      spans[3 * ns + 1] = m;
      spans[3 * ns + 2] = s;
      ns++;
    }
  }
  return ns;
}
#define MAX_RANK_C @MAX_RANK@
typedef float vf __attribute__((vector_size(VW * 4)));
typedef float vfu __attribute__((vector_size(VW * 4), aligned(4), may_alias));  /* a vf anywhere in a float array */
#define LDU(p) (*(const vfu*)(p))
#define STU(p, v) (*(vfu*)(p) = (v))
/* The tiles spelled out (an array of vector accumulators stays in memory): k a token, q a rank or a vector of
   output columns. Shrink: acc_kq = sum over i of x_k[i] * A_q[i]; expand: c_kq += v_k[j] * B^T_j[q's columns]. */
#if TR == 4
#define PER_Q(M) M(0) M(1) M(2) M(3)
#define PER_KQ(M, k) M(k, 0) M(k, 1) M(k, 2) M(k, 3)
#else
#define PER_Q(M) M(0) M(1)
#define PER_KQ(M, k) M(k, 0) M(k, 1)
#endif
#define PER_K(M) M(0) M(1) M(2) M(3)
#define PER_TILE(M) PER_KQ(M, 0) PER_KQ(M, 1) PER_KQ(M, 2) PER_KQ(M, 3)
#define SH_DECL(k, q) vf acc##k##q = {0};
#define SH_W(q) const vf w##q = LDU(af + (long)(j0 + q) * in + i);
#define SH_X(k) const vf x##k = LDU(xr[k] + i);
#define SH_FMA(k, q) acc##k##q += x##k * w##q;
/* A rank value from its lanes' sum: the columns past the last full vector added, then scaled. */
#define SH_FINISH(k, q, sum) { const float* a_ = af + (long)(j0 + q) * in; \
    float t_ = (sum); \
    for (int i = iv; i < in; i++) t_ += xr[k][i] * a_[i]; \
    v[(long)(t0 + k) * rp + j0 + q] = t_ * fr[j0 + q]; }
#define SH_OUT(k, q) if (t0 + k < m) SH_FINISH(k, q, hsumv(acc##k##q))
#define EX_LOAD(k, q) vf c##k##q = LDU(yr[k] + o + q * VW);
#define EX_W(q) const vf w##q = LDU(bf_ + (long)j * out + o + q * VW);
#define EX_V(k) const float v##k = vr[k][j];
#define EX_FMA(k, q) c##k##q += v##k * w##q;
#define EX_STORE(k, q) if (t0 + k < m) STU(yr[k] + o + q * VW, c##k##q);
#define EX1_LOAD(k) vf c##k = LDU(yr[k] + o);
#define EX1_FMA(k) c##k += vr[k][j] * w;
#define EX1_STORE(k) if (t0 + k < m) STU(yr[k] + o, c##k);

#if VW == 16 && TR == 4
/* One token's four rank sums at once (a tile row): halves added, then three horizontal adds across the four
   accumulators, instead of four separate reductions (a third of the shrink's instructions went to them). */
static inline void hsum4v(vf a, vf b, vf c, vf d, float* s) {
#define HALVES_(v) _mm256_add_ps(_mm512_castps512_ps256((__m512)(v)), \
                                 _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd((__m512)(v)), 1)))
  const __m256 ab = _mm256_hadd_ps(HALVES_(a), HALVES_(b)), cd = _mm256_hadd_ps(HALVES_(c), HALVES_(d));
  const __m256 abcd = _mm256_hadd_ps(ab, cd);
  _mm_storeu_ps(s, _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1)));
#undef HALVES_
}
#define SH_PUT(k, q) SH_FINISH(k, q, s##k[q])
#define SH_OUTK(k) if (t0 + k < m) { float s##k[4]; hsum4v(acc##k##0, acc##k##1, acc##k##2, acc##k##3, s##k); \
    PER_KQ(SH_PUT, k) }
#define SH_OUT_TILE PER_K(SH_OUTK)
#else
#define SH_OUT_TILE PER_TILE(SH_OUT)
#endif

static inline float hsumv(vf a) {  /* element access, so the sums stay in registers */
#if VW == 16
  const v8f h = {a[0] + a[8], a[1] + a[9], a[2] + a[10], a[3] + a[11], a[4] + a[12], a[5] + a[13], a[6] + a[14],
                 a[7] + a[15]};
  return hsum8(h);
#else
  return hsum8(a);
#endif
}

/* A thread's fp32 copy of one slot's rank rows and its tokens' rank values (grow: C_GROW_BUFFER). */
static __thread float* ws_buf;
static __thread size_t ws_cap;

/* Prompt rows on AMX (bf16 tiles, fp32 sums) where the CPU has it: see amx_layout_* and amx_rows_*. */
#if defined(__AMX_BF16__) && defined(__AMX_TILE__) && defined(__AVX512BF16__)
@AMX_TILES@
#define HAVE_AMX_BF16 1
static int amx_granted = 0, amx_on = 0;

int loraserve_amx_init(void) {
  amx_granted = amx_request();
  amx_on = amx_granted;
  return amx_granted;
}

/* Tiles 0-1: C, 16 tokens x 16 fp32 (rank values, or output columns read from y); 2-3: 16 tokens x 32 bf16
   of x; 4: 16 pairs of in values x 16 ranks (A^T, VNNI); 5-6: 16 tokens x 16 bf16 rank values; 7: 8 pairs of
   ranks x 16 output columns (B^T, VNNI). */
static void amx_prompt_tiles(void) {
  static const uint8_t rows[8] = {16, 16, 16, 16, 16, 16, 16, 8};
  static const uint16_t colsb[8] = {64, 64, 64, 64, 64, 32, 32, 64};
  amx_load_tiles(rows, colsb);
}

/* 16 rows of 16 dwords in registers, transposed in place (r[q] becomes column q). */
static inline void transpose16(__m512i* r) {
  __m512i t[16], u[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  /* u[i + c], lane L: rows i..i+3 of column 4L + c */
    u[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    u[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    u[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    u[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int c = 0; c < 4; c++) {
    const __m512i abl = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x44), abh = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xEE);
    const __m512i cdl = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x44);
    const __m512i cdh = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xEE);
    r[c] = _mm512_shuffle_i32x4(abl, cdl, 0x88);
    r[4 + c] = _mm512_shuffle_i32x4(abl, cdl, 0xDD);
    r[8 + c] = _mm512_shuffle_i32x4(abh, cdh, 0x88);
    r[12 + c] = _mm512_shuffle_i32x4(abh, cdh, 0xDD);
  }
}

/* Bytes of the AMX path's workspace, 64-byte aligned parts (see amx_layout_* and amx_rows_*). */
#define AMX_X_BYTES(in) ((long)PROMPT_SPAN * (in) * 2)
static inline long amx_ws_bytes(int in, int rp16, long out_max) {
  return AMX_X_BYTES(in) + (long)rp16 * in * 2 + (long)rp16 * out_max * 2 + 32L * rp16 * 4 + 32L * rp16 * 2
         + 16 * 16 * 4 * 2 + (long)rp16 * 4 + 6 * 64;
}
static inline char* align64(char* p) { return (char*)(((uintptr_t)p + 63) & ~(uintptr_t)63); }

/* The AMX path's workspace after x (ws from amx_layout_* on, 64-byte aligned parts): A^T and B^T of one slot and
   target as the tiles read them, the rank values of 32 tokens in fp32 and bf16, two partial output tiles, and
   each rank's scale. */
typedef struct { uint32_t* at; uint32_t* bv; float* v; uint16_t* vb; float* tmp; float* fr; } amx_ws;
static inline amx_ws amx_parts(char* ws, int rp, int in, long out) {
  amx_ws w;
  w.at = (uint32_t*)ws;                                                        /* [rp/16][in/2][16] */
  w.bv = (uint32_t*)align64((char*)(w.at + (long)rp / 16 * (in / 2) * 16));   /* [rp/2][out] */
  w.v = (float*)align64((char*)(w.bv + (long)rp / 2 * out));                   /* [32][rp] */
  w.vb = (uint16_t*)align64((char*)(w.v + 32L * rp));                          /* [32][rp] */
  w.tmp = (float*)align64((char*)(w.vb + 32L * rp));                           /* [2][16][16] */
  w.fr = (float*)align64((char*)(w.tmp + 2 * 16 * 16));                        /* [rp] */
  return w;
}

/* x rows t0..t0+m (m <= 32) as bf16 (round to nearest even), the rows past m up to the tiles' 16 or 32 zero;
   in a multiple of 32. */
static void amx_x_rows(int m, const float* x, long xs, int in, uint16_t* xb) {
  for (int t = 0; t < (m > 16 ? 32 : 16); t++) {
    uint16_t* d = xb + (long)t * in;
    if (t >= m) { memset(d, 0, (size_t)in * 2); continue; }
    const float* r = x + (long)t * xs;
    for (int i = 0; i < in; i += 32)
      _mm512_storeu_si512(d + i, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(r + i + 16), _mm512_loadu_ps(r + i)));
  }
}
#else
#define HAVE_AMX_BF16 0
int loraserve_amx_init(void) { return 0; }
static const int amx_on = 0;
#endif

/* Tests: the vector path for prompt rows on an AMX machine too (it stays the path elsewhere). */
void loraserve_set_prompt_amx(int on) {
#if HAVE_AMX_BF16
  amx_on = on && amx_granted;
#else
  (void)on;
#endif
}
int loraserve_prompt_amx(void) { return amx_on; }
"""

# The kernels, written once for a weight type: WT (the element), W(h) (an element as a float), RS_A / RS_B (a
# row's scale: 1 for bf16, so the bf16 bits are those of the kernels before int8 rows existed).
_KERNELS = r"""
/* v[j] = sc * x . A[pg[j]] and y[o] += sum_j v[j] * B^T[pg[j]][o], a row at a time. Blocking four
   rows per pass (four accumulator chains, one pass over y) measured slower here: 4.6 ms a
   SmolLM2 step against 3.7 ms, the loop is bound by streaming the rows, not by FMA latency.
   Each row asks for the one PF_ROWS further on in the order they are read (A's rank rows, then B^T's, then the
   next target's A rows, asked for during an expand): an adapter's rows are short streams (1-3 KB) the hardware
   prefetcher picks up late; measured on SmolLM2 decode steps of 8 distinct rank-16 adapters, one row ahead took
   the kernel's time a step from 6.6-6.8 ms to 5.2 ms (bf16 rows), and PF_ROWS rows ahead keep more of them in
   flight (see PF_ROWS). */
static void shrink_@SUF@(const float* x, const lora_target* T, const int32_t* pg, int r, int in, float sc, float* v) {
  const WT* A = (const WT*)T->a;
  const WT* BT = (const WT*)T->bt;
  for (int j = 0; j < r; j++) {
    const WT* row = A + (long)pg[j] * T->a_row;
    if (j + PF_ROWS < r) prefetch_bytes(A + (long)pg[j + PF_ROWS] * T->a_row, in * (long)sizeof(WT));
    else if (j + PF_ROWS - r < r) prefetch_bytes(BT + (long)pg[j + PF_ROWS - r] * T->bt_row, T->out * (long)sizeof(WT));
    float acc = 0.f;
    DOT1(row, in, x, acc);
    v[j] = acc * sc * RS_A(T, pg[j]);
  }
}

static void expand_@SUF@(const float* v, const lora_target* T, const int32_t* pg, int r, float* y) {
  const WT* BT = (const WT*)T->bt;
  const int out = (int)T->out;
  for (int j = 0; j < r; j++) {
    const WT* row = BT + (long)pg[j] * T->bt_row;
    if (j + PF_ROWS < r) prefetch_bytes(BT + (long)pg[j + PF_ROWS] * T->bt_row, out * (long)sizeof(WT));
    const float vj = v[j] * RS_B(T, pg[j]);
    AXPY(y, vj, row, out);
  }
}

/* For each of n decode tokens t with slot s = slots[t] != 0 and each target g:
   y[t, g.y_off:][:g.out] += scale_g[s] * (x[t] . A_g,s^T) . B_g,s^T over the first r ranks. */
void loraserve_decode_@SUF@(int n, const int64_t* slots, const int32_t* pages, int pages_stride, int r, int in,
                            const float* x, long x_stride, float* y, long y_stride, int nt, const lora_target* tg) {
  #pragma omp parallel for schedule(static) if(n > 1)
  for (int t = 0; t < n; t++) {
    const long s = slots[t];
    if (s == 0) continue;
    const int32_t* pg = pages + s * pages_stride;
    const int rs = slot_rank(pg, r);
    float v[1024];
    const float* xs = x + t * x_stride;
    float* ys = y + t * y_stride;
    for (int g = 0; g < nt; g++) {
      const lora_target* T = tg + g;
      shrink_@SUF@(xs, T, pg, rs, in, T->scale[s], v);
      /* while this target expands, the next one's first A rows (or the next token's) come in */
      for (int k = 0; k < PF_ROWS && k < rs; k++) {
        if (g + 1 < nt) prefetch_bytes((const WT*)tg[g + 1].a + (long)pg[k] * tg[g + 1].a_row, in * (long)sizeof(WT));
        else if (t + 1 < n && slots[t + 1] != 0)
          prefetch_bytes((const WT*)tg[0].a + (long)pages[slots[t + 1] * pages_stride + k] * tg[0].a_row,
                         in * (long)sizeof(WT));
      }
      expand_@SUF@(v, T, pg, rs, ys + T->y_off);
    }
  }
}

/* Prompt rows of one slot, m <= PROMPT_SPAN of them, for one target: the slot's rank rows are converted
   to fp32 once for the span (A: [rp][in], B^T: [r][out] in the thread's workspace), then tiles of TT tokens
   x TR ranks (shrink) or TT tokens x TR vectors of output columns (expand) keep their sums in vector
   registers, so every weight loaded serves TT tokens and every x loaded TR ranks. A token's sums run in
   the same order whatever its block, tile or position in it (rows past m alias row m - 1 and are never
   stored), so its numbers never depend on how many other tokens share its slot. */
static void prompt_block_@SUF@(int m, const float* x, long xs, float* y, long ys, int r, int in,
                               const lora_target* T, long s, const int32_t* pg, float* ws) {
  const WT* A = (const WT*)T->a;
  const WT* BT = (const WT*)T->bt;
  const long out = T->out;
  const int rp = (r + TR - 1) / TR * TR;
  float* af = ws;                        /* [rp][in], ranks past r zero */
  float* bf_ = af + (long)rp * in;       /* [r][out] */
  float* v = bf_ + (long)r * out;        /* [m][rp] */
  float fr[MAX_RANK_C];
  for (int j = 0; j < rp; j++) {
    float* d = af + (long)j * in;
    if (j < r) {
      const WT* row = A + (long)pg[j] * T->a_row;
      for (int i = 0; i < in; i++) d[i] = W(row[i]);
      fr[j] = T->scale[s] * RS_A(T, pg[j]) * RS_B(T, pg[j]);
    } else {
      memset(d, 0, (size_t)in * sizeof(float));
      fr[j] = 0.f;
    }
  }
  for (int j = 0; j < r; j++) {
    const WT* row = BT + (long)pg[j] * T->bt_row;
    float* d = bf_ + (long)j * out;
    for (long o = 0; o < out; o++) d[o] = W(row[o]);
  }
  const int iv = in / VW * VW;
  for (int t0 = 0; t0 < m; t0 += TT) {
    const float* xr[TT];
    for (int k = 0; k < TT; k++) xr[k] = x + (long)(t0 + k < m ? t0 + k : m - 1) * xs;
    for (int j0 = 0; j0 < rp; j0 += TR) {
      PER_TILE(SH_DECL)
      for (int i = 0; i < iv; i += VW) {
        PER_Q(SH_W)
        PER_K(SH_X)
        PER_TILE(SH_FMA)
      }
      SH_OUT_TILE
    }
  }
  for (int t0 = 0; t0 < m; t0 += TT) {
    float* yr[TT];
    const float* vr[TT];
    for (int k = 0; k < TT; k++) {
      const long row = t0 + k < m ? t0 + k : m - 1;
      yr[k] = y + row * ys + T->y_off;
      vr[k] = v + row * rp;
    }
    long o = 0;
    for (; o + VW * TR <= out; o += VW * TR) {
      PER_TILE(EX_LOAD)
      for (int j = 0; j < r; j++) {
        PER_Q(EX_W)
        PER_K(EX_V)
        PER_TILE(EX_FMA)
      }
      PER_TILE(EX_STORE)
    }
    for (; o + VW <= out; o += VW) {  /* columns past the last full tile, a vector at a time */
      PER_K(EX1_LOAD)
      for (int j = 0; j < r; j++) {
        const vf w = LDU(bf_ + (long)j * out + o);
        PER_K(EX1_FMA)
      }
      PER_K(EX1_STORE)
    }
    for (; o < out; o++)
      for (int k = 0; k < TT && t0 + k < m; k++) {
        float acc = yr[k][o];
        for (int j = 0; j < r; j++) acc += vr[k][j] * bf_[(long)j * out + o];
        yr[k][o] = acc;
      }
  }
}

#if HAVE_AMX_BF16
/* 32 weights of a rank row from p on as bf16, in order (so its 16 pairs; exact: int8 and bf16 values are bf16). */
#define ROW32_@SUF@(p) ((__m512i)_mm512_cvtne2ps_pbh(W16F((p) + 16), W16F(p)))

/* One slot's rank rows of one target laid out for the tiles (weights exact in bf16): A^T in the B-tile layout
   (row q of a k-step holds pair q of every rank of a group of 16), B^T with ranks 2p and 2p + 1 of every output
   column interleaved in row p, and each rank's scale (the slot's, times the rows' own for int8 rows). */
static void amx_layout_@SUF@(int r, int in, const lora_target* T, long s, const int32_t* pg, char* ws) {
  const WT* A = (const WT*)T->a;
  const WT* BT = (const WT*)T->bt;
  const long out = T->out;
  const int rp = (r + 15) / 16 * 16;
  const amx_ws w = amx_parts(ws, rp, in, out);
  for (int g = 0; g < rp / 16; g++) {
    const WT* rows[16];
    for (int n = 0; n < 16; n++) {
      const int j = 16 * g + n;
      rows[n] = j < r ? A + (long)pg[j] * T->a_row : NULL;
      w.fr[j] = j < r ? T->scale[s] * RS_A(T, pg[j]) * RS_B(T, pg[j]) : 0.f;
    }
    uint32_t* atg = w.at + (long)g * (in / 2) * 16;
    for (int k = 0; k < in; k += 32) {
      __m512i rr[16];
      for (int n = 0; n < 16; n++) rr[n] = rows[n] ? ROW32_@SUF@(rows[n] + k) : _mm512_setzero_si512();
      transpose16(rr);
      for (int q = 0; q < 16; q++) _mm512_store_si512(atg + (long)(k / 2 + q) * 16, rr[q]);
    }
  }
  const __m512i high = _mm512_set1_epi32((int)0xFFFF0000u);
  for (int p = 0; p < rp / 2; p++) {
    const WT* r0 = 2 * p < r ? BT + (long)pg[2 * p] * T->bt_row : NULL;
    const WT* r1 = 2 * p + 1 < r ? BT + (long)pg[2 * p + 1] * T->bt_row : NULL;
    uint32_t* d = w.bv + (long)p * out;
    for (long o = 0; o < out; o += 16) {
      const __m512i lo = r0 ? _mm512_srli_epi32(_mm512_castps_si512(W16F(r0 + o)), 16) : _mm512_setzero_si512();
      const __m512i hi = r1 ? _mm512_and_si512(_mm512_castps_si512(W16F(r1 + o)), high) : _mm512_setzero_si512();
      _mm512_store_si512(d + o, _mm512_or_si512(lo, hi));
    }
  }
}

/* Prompt rows of one slot (m <= 32 of them, x already bf16 in xb, 32 rows) for one target on AMX tiles, its rank
   rows laid out in ws by amx_layout_*: the shrink v = x . A^T in tiles of 16 tokens x 16 ranks over in / 32
   steps; v scaled (fr) and rounded to bf16; then y += v . B^T in tiles of 16 tokens x 16 output columns, loaded
   from y and stored back. Weights enter as bf16 exactly; x and v are rounded to bf16 (about 0.2% of a delta, a
   fifth of int8 rows' own rounding), sums are fp32. A token's row of a tile never meets another's, so its numbers
   are the same in any block. */
static void amx_rows_@SUF@(int m, const uint16_t* xb, float* y, long ys, int r, int in, const lora_target* T,
                           char* ws) {
  const long out = T->out;
  const int rp = (r + 15) / 16 * 16, two = m > 16, m0 = m < 16 ? m : 16, m1 = m - 16;
  const amx_ws w = amx_parts(ws, rp, in, out);
  uint32_t* bv = w.bv;
  float* v = w.v;
  uint16_t* vb = w.vb;
  for (int g = 0; g < rp / 16; g++) {
    const uint32_t* atg = w.at + (long)g * (in / 2) * 16;
    _tile_zero(0);
    _tile_zero(1);
    for (int k = 0; k < in; k += 32) {
      _tile_loadd(4, atg + (long)(k / 2) * 16, 64);
      _tile_loadd(2, xb + k, in * 2);
      _tile_dpbf16ps(0, 2, 4);
      if (two) { _tile_loadd(3, xb + 16L * in + k, in * 2); _tile_dpbf16ps(1, 3, 4); }
    }
    _tile_stored(0, v + 16 * g, rp * 4);
    if (two) _tile_stored(1, v + 16L * rp + 16 * g, rp * 4);
  }
  for (int t = 0; t < (two ? 32 : 16); t++)
    for (int j = 0; j < rp; j += 16)
      _mm256_store_si256((__m256i*)(vb + (long)t * rp + j), (__m256i)_mm512_cvtneps_pbh(
          _mm512_mul_ps(_mm512_load_ps(v + (long)t * rp + j), _mm512_load_ps(w.fr + j))));
  const int chunks = rp / 16;
  if (chunks == 1) {
    _tile_loadd(5, vb, rp * 2);
    if (two) _tile_loadd(6, vb + 16L * rp, rp * 2);
  }
  float* t0 = w.tmp;
  float* t1 = w.tmp + 256;
  for (long o = 0; o < out; o += 16) {
    float* y0 = y + T->y_off + o;
    float* y1 = y0 + 16 * ys;
    /* a tile's rows past m belong to other blocks: a partial tile goes through tmp */
    if (m0 == 16) _tile_loadd(0, y0, ys * 4);
    else {
      for (int t = 0; t < 16; t++) _mm512_store_ps(t0 + 16 * t, t < m0 ? _mm512_loadu_ps(y0 + t * ys) : _mm512_setzero_ps());
      _tile_loadd(0, t0, 64);
    }
    if (two) {
      if (m1 == 16) _tile_loadd(1, y1, ys * 4);
      else {
        for (int t = 0; t < 16; t++) _mm512_store_ps(t1 + 16 * t, t < m1 ? _mm512_loadu_ps(y1 + t * ys) : _mm512_setzero_ps());
        _tile_loadd(1, t1, 64);
      }
    }
    for (int c = 0; c < chunks; c++) {
      _tile_loadd(7, bv + (long)c * 8 * out + o, out * 4);
      if (chunks > 1) _tile_loadd(5, vb + 16 * c, rp * 2);
      _tile_dpbf16ps(0, 5, 7);
      if (two) {
        if (chunks > 1) _tile_loadd(6, vb + 16L * rp + 16 * c, rp * 2);
        _tile_dpbf16ps(1, 6, 7);
      }
    }
    if (m0 == 16) _tile_stored(0, y0, ys * 4);
    else {
      _tile_stored(0, t0, 64);
      for (int t = 0; t < m0; t++) _mm512_storeu_ps(y0 + t * ys, _mm512_load_ps(t0 + 16 * t));
    }
    if (two) {
      if (m1 == 16) _tile_stored(1, y1, ys * 4);
      else {
        _tile_stored(1, t1, 64);
        for (int t = 0; t < m1; t++) _mm512_storeu_ps(y1 + t * ys, _mm512_load_ps(t1 + 16 * t));
      }
    }
  }
}
#endif

/* blocks[b] = (first row, rows m in 1..PROMPT_BLOCK, slot), rows of one slot each; slot 0 blocks are skipped.
   AMX tiles where the CPU has them and the shapes fit (in a multiple of 32, every target's out of 16), the
   vector kernel otherwise. Returns 0, or -1 when a thread's workspace could not be allocated (y then partly
   updated). */
int loraserve_prompt_@SUF@(int nb, const int64_t* blocks, const int32_t* pages, int pages_stride, int r, int in,
                           const float* x, long x_stride, float* y, long y_stride, int nt, const lora_target* tg) {
  long out_max = 0;
  int fits = amx_on && in % 32 == 0;
  for (int g = 0; g < nt; g++) {
    out_max = tg[g].out > out_max ? tg[g].out : out_max;
    fits = fits && tg[g].out % 16 == 0;
  }
  int64_t few[3 * 64];
  int64_t* spans = nb <= 64 ? few : (int64_t*)malloc(sizeof(int64_t) * 3 * (size_t)nb);
  if (!spans) return -1;
  const int ns = prompt_spans(nb, blocks, spans);
  int failed = 0;
#if HAVE_AMX_BF16
  if (fits) {
    const int rp16 = (r + 15) / 16 * 16;
    const size_t need = (size_t)(amx_ws_bytes(in, rp16, out_max) + 3) / 4;
    #pragma omp parallel
    {
      amx_prompt_tiles();
      #pragma omp for schedule(dynamic, 1)
      for (int b = 0; b < ns; b++) {
        const long row = spans[3 * b], m = spans[3 * b + 1], s = spans[3 * b + 2];
        char* ws = (char*)grow(&ws_buf, &ws_cap, need);
        if (!ws) { failed = 1; continue; }
        uint16_t* xb = (uint16_t*)ws;
        for (long t = 0; t < m; t += 32)  /* each block's x once for all targets */
          amx_x_rows((int)(m - t < 32 ? m - t : 32), x + (row + t) * x_stride, x_stride, in, xb + t * in);
        const int32_t* pg = pages + s * pages_stride;
        const int rs = slot_rank(pg, r);
        char* w = align64(ws + AMX_X_BYTES(in));
        for (int g = 0; g < nt; g++) {
          amx_layout_@SUF@(rs, in, tg + g, s, pg, w);
          for (long t = 0; t < m; t += 32)
            amx_rows_@SUF@((int)(m - t < 32 ? m - t : 32), xb + t * in, y + (row + t) * y_stride, y_stride, rs, in,
                           tg + g, w);
        }
      }
      _tile_release();
    }
  } else
#endif
  {
    const long rp = (r + TR - 1) / TR * TR;
    const long need = rp * in + (long)r * out_max + PROMPT_SPAN * rp;
    #pragma omp parallel for schedule(dynamic, 1)
    for (int b = 0; b < ns; b++) {
      const long row = spans[3 * b], m = spans[3 * b + 1], s = spans[3 * b + 2];
      float* ws = (float*)grow(&ws_buf, &ws_cap, (size_t)need);
      if (!ws) { failed = 1; continue; }
      const int32_t* pg = pages + s * pages_stride;
      const int rs = slot_rank(pg, r);
      for (int g = 0; g < nt; g++)
        prompt_block_@SUF@((int)m, x + row * x_stride, x_stride, y + row * y_stride, y_stride, rs, in, tg + g, s, pg, ws);
    }
  }
  (void)fits;
  if (spans != few) free(spans);
  return failed ? -1 : 0;
}
"""

MAX_RANK = 1024  # the kernels' rank buffers
PROMPT_BLOCK = 32  # prompt rows of one adapter a block (the AMX path's two tiles of 16 rows)
PROMPT_SPAN = 128  # a thread's work item: up to this many rows of one adapter (whole blocks), its rows prepared once
# Decode: rank rows asked for ahead of the one read. Measured with kernels swapped run by run in one engine (8
# sequences on 8 distinct rank-16 adapters, SmolLM2 int8), LoRA's ms a decode step: 1 row 2.81-3.34, 3 rows
# 2.63-2.93, 4 rows 2.65-2.71, 6 rows 2.45-2.70, 10 rows 2.59-2.69, 16 rows 2.63-2.71.
PF_ROWS = 6
_SOURCE = (C_GROW_BUFFER + _HEADER.replace("@PROMPT_BLOCK@", str(PROMPT_BLOCK)).replace("@MAX_RANK@", str(MAX_RANK))
           .replace("@PROMPT_SPAN@", str(PROMPT_SPAN))
           .replace("@AMX_TILES@", C_AMX_TILES)
           + f"#define PF_ROWS {PF_ROWS}\n"
           + "#define WT uint16_t\n#define W(h) bf(h)\n#define RS_A(T, p) 1.f\n#define RS_B(T, p) 1.f\n"
           + "#define W16F(p) _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32("
           + "_mm256_loadu_si256((const __m256i*)(p))), 16))\n"
           + "#define DOT1(row, in, x, acc) _Pragma(\"omp simd reduction(+:acc)\") \\\n"
           + "  for (int i = 0; i < in; i++) acc += x[i] * bf(row[i])\n"
           + "#define AXPY(y, v, row, out) _Pragma(\"omp simd\") \\\n"
           + "  for (int o = 0; o < out; o++) y[o] += v * bf(row[o])\n"
           + _KERNELS.replace("@SUF@", "bf16")
           + "#undef WT\n#undef W\n#undef RS_A\n#undef RS_B\n#undef DOT1\n#undef AXPY\n#undef W16F\n"
           + "#define WT int8_t\n#define W(h) ((float)(h))\n#define RS_A(T, p) ((T)->a_sc[p])\n"
           + "#define RS_B(T, p) ((T)->bt_sc[p])\n#define W16F(p) i8x16(p)\n"
           + "#define DOT1(row, in, x, acc) (acc = dot1_i8(row, in, x))\n"
           + "#define AXPY(y, v, row, out) axpy_i8(y, v, row, out)\n"
           + _KERNELS.replace("@SUF@", "i8"))
_F32 = torch.float32


class _Target(ctypes.Structure):
    _fields_ = [("a", ctypes.c_void_p), ("a_row", ctypes.c_long), ("bt", ctypes.c_void_p),
                ("bt_row", ctypes.c_long), ("scale", ctypes.c_void_p), ("out", ctypes.c_long),
                ("y_off", ctypes.c_long), ("a_sc", ctypes.c_void_p), ("bt_sc", ctypes.c_void_p)]


WEIGHT_DTYPES = (torch.bfloat16, torch.int8)  # what the kernels read; int8 rows carry one fp32 scale each


def _rows_contiguous(t: torch.Tensor) -> bool:
    """[rows, n] whose every row is contiguous (the rows themselves may be apart)."""
    return t.dim() == 2 and t.stride(1) == 1


class KernelPlan:
    """The kernels' view of one group of targets that read the same x (q/k/v, gate/up, or one
    linear alone): their rank rows' pointers, the page table and output columns, checked and packed
    once (at backend start-up) so that a step pays one ctypes call per group and kind of row, and no
    per-call checks on them. It keeps its tensors alive; they must stay in place (the pool writes
    adapters into them and their rows into the page table)."""

    def __init__(self, parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]], pages: torch.Tensor,
                 row_scales: Optional[list[tuple[torch.Tensor, torch.Tensor]]] = None):
        """parts: per target (A rows [P, K], B^T rows [P, w], both bf16 or both int8, scale [N] fp32, first
        output column); pages: [N, R] int32, slot s's rank j at row pages[s, j] (`server/lora/stacks.py`);
        row_scales: with int8 rows, per target the fp32 scales [P] of its A rows and of its B^T rows."""
        if not parts:
            raise ValueError("a plan needs at least one target")
        if not (pages.dtype == torch.int32 and pages.device.type == "cpu" and pages.dim() == 2
                and pages.is_contiguous()):
            raise ValueError("the page table must be a contiguous [slots, R] int32 CPU tensor")
        self.slots, self.max_rank = pages.shape
        a0 = parts[0][0]
        self.in_features = a0.shape[1] if a0.dim() == 2 else 0
        self.width = 0  # columns of y the group spans
        self.dtype = a0.dtype
        if self.dtype not in WEIGHT_DTYPES:
            raise ValueError(f"the kernel reads bf16 or int8 rank rows, not {self.dtype}")
        if (row_scales is not None) != (self.dtype == torch.int8) or (row_scales and len(row_scales) != len(parts)):
            raise ValueError("int8 rows need their row scales (one pair per target), bf16 rows none")
        for i, (a, bt, scale, y_off) in enumerate(parts):
            if row_scales is not None:
                a_sc, bt_sc = row_scales[i]
                if not (a_sc.dtype == bt_sc.dtype == torch.float32 and a_sc.is_contiguous() and bt_sc.is_contiguous()
                        and a_sc.shape == (a.shape[0],) and bt_sc.shape == (bt.shape[0],)):
                    raise ValueError("row scales must be contiguous fp32, one per row")
            if not (a.dtype == bt.dtype == self.dtype and scale.dtype == torch.float32
                    and a.device.type == bt.device.type == scale.device.type == "cpu"
                    and _rows_contiguous(a) and _rows_contiguous(bt) and scale.is_contiguous()):
                raise ValueError("the kernel reads bf16 or int8 CPU rank rows (one dtype), each row contiguous, and fp32 scales")
            if a.shape != a0.shape or bt.shape[0] != a0.shape[0] or scale.shape != (self.slots,):
                raise ValueError(f"rows disagree: a {tuple(a.shape)}, bt {tuple(bt.shape)}, "
                                 f"scale {tuple(scale.shape)} for {tuple(a0.shape)} and {self.slots} slots")
            if y_off < 0:
                raise ValueError("negative output offset")
            self.width = max(self.width, y_off + bt.shape[1])
        if self.max_rank > MAX_RANK:
            raise ValueError(f"rank {self.max_rank} over the kernel's {MAX_RANK}")
        self._keep = (parts, pages, row_scales)
        self.pages = pages
        scales = row_scales or [(None, None)] * len(parts)
        self._targets = (_Target * len(parts))(*[
            _Target(a.data_ptr(), a.stride(0), bt.data_ptr(), bt.stride(0), scale.data_ptr(), bt.shape[1], y_off,
                    a_sc.data_ptr() if a_sc is not None else None, bt_sc.data_ptr() if bt_sc is not None else None)
            for (a, bt, scale, y_off), (a_sc, bt_sc) in zip(parts, scales)])
        self.count = len(parts)
        self.address = ctypes.addressof(self._targets)


class CpuLoraKernel:
    def __init__(self, lib: ctypes.CDLL):
        i, lg, p = ctypes.c_int, ctypes.c_long, ctypes.c_void_p
        self._decode, self._prompt = {}, {}
        for dtype, suffix in ((torch.bfloat16, "bf16"), (torch.int8, "i8")):
            for table, kind, restype in ((self._decode, "decode", None), (self._prompt, "prompt", ctypes.c_int)):
                fn = getattr(lib, f"loraserve_{kind}_{suffix}")
                fn.argtypes = [i, p, p, i, i, i, p, lg, p, lg, i, p]
                fn.restype = restype
                table[dtype] = fn
        self._set_prompt_amx = lib.loraserve_set_prompt_amx
        self._set_prompt_amx.argtypes = [i]
        self._prompt_amx = lib.loraserve_prompt_amx
        self._prompt_amx.restype = i
        lib.loraserve_amx_init.restype = i
        lib.loraserve_amx_init()

    @property
    def prompt_amx(self) -> bool:
        """Whether prompt rows go through AMX bf16 tiles (where the CPU has them and the shapes fit)."""
        return bool(self._prompt_amx())

    @property
    def prompt_path(self) -> str:
        """The prompt rows' path in words, for the start-up log and benchmark files."""
        return "AMX bf16 tiles" if self.prompt_amx else "vector FMA"

    def set_prompt_amx(self, on: bool) -> None:
        """Tests: the vector path for prompt rows on an AMX machine too (on: AMX again where granted)."""
        self._set_prompt_amx(int(on))

    def decode_function(self, dtype: torch.dtype) -> ctypes._CFuncPtr:
        """The decode call for rows of `dtype`, for the fused decode driver (server/model/fused_decode.py)."""
        return self._decode[dtype]

    @staticmethod
    def prompt_blocks(segments: LoraSegments, first_row: int) -> torch.Tensor:
        """The prompt kernel's work list for the rows from first_row on: [blocks, 3] int64 of (row, rows,
        slot), up to PROMPT_BLOCK rows of one adapter each, slot 0 left out. Built once per step from the step's
        segments (the runner sorts prompt rows by slot, so they are long)."""
        blocks = [(t, min(PROMPT_BLOCK, e - t), slot)
                  for s, e, slot in zip(segments.starts, segments.ends, segments.slots) if slot and e > first_row
                  for t in range(max(s, first_row), e, PROMPT_BLOCK)]
        return torch.tensor(blocks, dtype=torch.int64).view(-1, 3)

    @staticmethod
    def accepts(y: torch.Tensor, x: torch.Tensor, plan: KernelPlan, rows: int = 0) -> bool:
        """The activations the kernel reads: fp32 CPU rows of unit stride, at least `rows` of them, x as
        wide as the plan's input and y as its outputs side by side."""
        return (x.dtype is _F32 and y.dtype is _F32 and x.is_cpu and y.is_cpu and x.dim() == 2 and y.dim() == 2
                and x.stride(1) == 1 and y.stride(1) == 1 and x.shape[1] == plan.in_features
                and y.shape[1] == plan.width and x.shape[0] >= rows and y.shape[0] >= rows)

    @staticmethod
    def check_slots(slots: torch.Tensor, rank: int, plan: KernelPlan) -> None:
        """Once per step, not per call: the kernel indexes the page table with these unchecked."""
        if slots.dtype != torch.int64 or slots.device.type != "cpu" or not slots.is_contiguous() or slots.dim() != 1:
            raise ValueError("decode slots must be a contiguous 1-D int64 CPU tensor")
        if not 0 < rank <= plan.max_rank:
            raise ValueError(f"rank {rank} outside 1..{plan.max_rank}")
        if slots.numel() and not 0 <= int(slots.min()) <= int(slots.max()) < plan.slots:
            raise ValueError(f"slot out of range for {plan.slots} slots")

    def run(self, y: torch.Tensor, x: torch.Tensor, slots: torch.Tensor, plan: KernelPlan, rank: int) -> None:
        """y[t] += LoRA delta of every target in `plan` for the first len(slots) rows (slot 0 rows
        untouched). Unchecked: slots and rank passed `check_slots` (once per step), and y, x passed
        `accepts` for at least len(slots) rows; the backend checks once per group for both kinds of row."""
        self._decode[plan.dtype](slots.shape[0], slots.data_ptr(), plan.pages.data_ptr(), plan.max_rank, rank, plan.in_features,
                 x.data_ptr(), x.stride(0), y.data_ptr(), y.stride(0), plan.count, plan.address)

    def run_prompt(self, y: torch.Tensor, x: torch.Tensor, blocks: torch.Tensor, plan: KernelPlan, rank: int) -> None:
        """Like `run`, for the prompt rows of `blocks` (from `prompt_blocks`); y, x must have passed
        `accepts` for every row the blocks reach."""
        if self._prompt[plan.dtype](blocks.shape[0], blocks.data_ptr(), plan.pages.data_ptr(), plan.max_rank, rank,
                                    plan.in_features, x.data_ptr(), x.stride(0), y.data_ptr(), y.stride(0),
                                    plan.count, plan.address):
            raise MemoryError("the CPU LoRA prompt kernel could not allocate its workspace")


@functools.lru_cache(maxsize=None)
def load(cache_dir: Path) -> Optional[CpuLoraKernel]:
    """The compiled kernel, built into `cache_dir` on first use (the engine passes its kernel cache);
    None (logged once) when it cannot be had."""
    try:
        kernel = CpuLoraKernel(build_and_load("lora_cpu", _SOURCE, NATIVE_FLAGS, directory=cache_dir))
    except NativeBuildError as e:
        log.warning("CPU LoRA kernel unavailable (%s)", e)
        return None
    log.info("CPU LoRA kernel: built into %s; prompt rows on %s", cache_dir, kernel.prompt_path)
    return kernel
