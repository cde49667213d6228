/* loraserve: the CPU LoRA kernels' shared part. A template: server/lora/cpu_kernel.py fills in its markers
   (the prompt block and span, the largest rank, the AMX tile code), then appends cpu_kernel_typed.c once per
   weight type. */
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

/* Decode tokens of one slot that a kernel call serves together, sharing each weight vector it converts
   (16 accumulators of AVX-512's 32 registers for the shrink). */
#define DECODE_GROUP 4

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

/* G tokens' rows of x (G <= DECODE_GROUP, a constant where it is inlined) against one int8 weight row: each
   weight vector is converted once for the G tokens, and each token has its own four accumulators of 16 (an FMA's
   latency hidden) summed in one fixed order, so its numbers do not depend on G or on the other tokens. */
static inline __attribute__((always_inline)) void dotg_i8(const int8_t* row, int in, const float* const* x, int G,
                                                         float* out) {
  __m512 a[DECODE_GROUP][4];
  for (int t = 0; t < G; t++) a[t][0] = a[t][1] = a[t][2] = a[t][3] = _mm512_setzero_ps();
  int i = 0;
  for (; i + 64 <= in; i += 64) {
    const __m512 w0 = i8x16(row + i), w1 = i8x16(row + i + 16), w2 = i8x16(row + i + 32), w3 = i8x16(row + i + 48);
    for (int t = 0; t < G; t++) {
      a[t][0] = _mm512_fmadd_ps(_mm512_loadu_ps(x[t] + i), w0, a[t][0]);
      a[t][1] = _mm512_fmadd_ps(_mm512_loadu_ps(x[t] + i + 16), w1, a[t][1]);
      a[t][2] = _mm512_fmadd_ps(_mm512_loadu_ps(x[t] + i + 32), w2, a[t][2]);
      a[t][3] = _mm512_fmadd_ps(_mm512_loadu_ps(x[t] + i + 48), w3, a[t][3]);
    }
  }
  for (; i + 16 <= in; i += 16) {
    const __m512 w = i8x16(row + i);
    for (int t = 0; t < G; t++) a[t][0] = _mm512_fmadd_ps(_mm512_loadu_ps(x[t] + i), w, a[t][0]);
  }
  for (int t = 0; t < G; t++) {
    float s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a[t][0], a[t][1]), _mm512_add_ps(a[t][2], a[t][3])));
    for (int e = i; e < in; e++) s += x[t][e] * (float)row[e];
    out[t] = s;
  }
}

/* y[t][0..out) += v[t] * row for G tokens, 16 int8 weights at a time, each converted once for the G. */
static inline __attribute__((always_inline)) void axpyg_i8(float* const* y, const float* v, int G, const int8_t* row,
                                                          int out) {
  __m512 vv[DECODE_GROUP];
  for (int t = 0; t < G; t++) vv[t] = _mm512_set1_ps(v[t]);
  int o = 0;
  for (; o + 16 <= out; o += 16) {
    const __m512 w = i8x16(row + o);
    for (int t = 0; t < G; t++) _mm512_storeu_ps(y[t] + o, _mm512_fmadd_ps(vv[t], w, _mm512_loadu_ps(y[t] + o)));
  }
  for (; o < out; o++) {
    const float w = (float)row[o];
    for (int t = 0; t < G; t++) y[t][o] += v[t] * w;
  }
}

/* Four rank rows at once: each token's y vector loaded and stored once for the four (a rank at a time, y went
   through the load and store ports once a rank), its four FMAs in rank order, so its bits are axpyg_i8's four
   times over. */
static inline __attribute__((always_inline)) void axpyg4_i8(float* const* y, float (*v)[DECODE_GROUP], int G,
                                                           const int8_t* const* row, int out) {
  __m512 vv[4][DECODE_GROUP];
  for (int q = 0; q < 4; q++)
    for (int t = 0; t < G; t++) vv[q][t] = _mm512_set1_ps(v[q][t]);
  int o = 0;
  for (; o + 16 <= out; o += 16) {
    const __m512 w0 = i8x16(row[0] + o), w1 = i8x16(row[1] + o), w2 = i8x16(row[2] + o), w3 = i8x16(row[3] + o);
    for (int t = 0; t < G; t++) {
      __m512 a = _mm512_loadu_ps(y[t] + o);
      a = _mm512_fmadd_ps(vv[0][t], w0, a);
      a = _mm512_fmadd_ps(vv[1][t], w1, a);
      a = _mm512_fmadd_ps(vv[2][t], w2, a);
      _mm512_storeu_ps(y[t] + o, _mm512_fmadd_ps(vv[3][t], w3, a));
    }
  }
  for (; o < out; o++)
    for (int q = 0; q < 4; q++) {
      const float w = (float)row[q][o];
      for (int t = 0; t < G; t++) y[t][o] += v[q][t] * w;
    }
}
#else
/* As the AVX-512 one, with two accumulators of 8 a token. */
static inline __attribute__((always_inline)) void dotg_i8(const int8_t* row, int in, const float* const* x, int G,
                                                         float* out) {
  v8f a[DECODE_GROUP][2], xv;
  for (int t = 0; t < G; t++) { a[t][0] = (v8f){0}; a[t][1] = (v8f){0}; }
  int i = 0;
  for (; i + 16 <= in; i += 16) {
    const v8f w0 = i8x8(row + i), w1 = i8x8(row + i + 8);
    for (int t = 0; t < G; t++) {
      memcpy(&xv, x[t] + i, 32); a[t][0] += xv * w0;
      memcpy(&xv, x[t] + i + 8, 32); a[t][1] += xv * w1;
    }
  }
  for (; i + 8 <= in; i += 8) {
    const v8f w = i8x8(row + i);
    for (int t = 0; t < G; t++) { memcpy(&xv, x[t] + i, 32); a[t][0] += xv * w; }
  }
  for (int t = 0; t < G; t++) {
    float s = hsum8(a[t][0] + a[t][1]);
    for (int e = i; e < in; e++) s += x[t][e] * (float)row[e];
    out[t] = s;
  }
}

/* y[t][0..out) += v[t] * row for G tokens, 8 int8 weights at a time, each converted once for the G. */
static inline __attribute__((always_inline)) void axpyg_i8(float* const* y, const float* v, int G, const int8_t* row,
                                                          int out) {
  int o = 0;
  for (; o + 8 <= out; o += 8) {
    const v8f w = i8x8(row + o);
    for (int t = 0; t < G; t++) {
      v8f yv;
      memcpy(&yv, y[t] + o, 32);
      yv += v[t] * w;
      memcpy(y[t] + o, &yv, 32);
    }
  }
  for (; o < out; o++) {
    const float w = (float)row[o];
    for (int t = 0; t < G; t++) y[t][o] += v[t] * w;
  }
}

static inline __attribute__((always_inline)) void axpyg4_i8(float* const* y, float (*v)[DECODE_GROUP], int G,
                                                           const int8_t* const* row, int out) {
  int o = 0;
  for (; o + 8 <= out; o += 8) {
    const v8f w0 = i8x8(row[0] + o), w1 = i8x8(row[1] + o), w2 = i8x8(row[2] + o), w3 = i8x8(row[3] + o);
    for (int t = 0; t < G; t++) {
      v8f yv;
      memcpy(&yv, y[t] + o, 32);
      yv += v[0][t] * w0;
      yv += v[1][t] * w1;
      yv += v[2][t] * w2;
      yv += v[3][t] * w3;
      memcpy(y[t] + o, &yv, 32);
    }
  }
  for (; o < out; o++)
    for (int q = 0; q < 4; q++) {
      const float w = (float)row[q][o];
      for (int t = 0; t < G; t++) y[t][o] += v[q][t] * w;
    }
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

/* A decode call's tokens as work items: the tokens with a slot (slot 0 is no adapter), ordered by slot and, within
   a slot, by token; cut into items of at most gmax tokens of one slot, a slot's tokens spread evenly over its
   items. tok[off[i]..off[i + 1]) are item i's tokens. The calls of one decode step (four a layer) pass the same
   slots, so each thread keeps its last answer and reuses it while they do not change. Returns the number of
   items, or -1 when memory for them could not be had. */
typedef struct { int n, gmax, cap, ni; int64_t* slots; int* tok; int* off; } decode_items_t;
static __thread decode_items_t items_cache;

static int decode_items(int n, const int64_t* slots, int gmax, const int** tok, const int** off) {
  decode_items_t* c = &items_cache;
  if (c->slots && c->n == n && c->gmax == gmax && memcmp(c->slots, slots, sizeof(int64_t) * (size_t)n) == 0) {
    *tok = c->tok; *off = c->off;
    return c->ni;
  }
  if (n > c->cap) {
    int64_t* ns = (int64_t*)realloc(c->slots, sizeof(int64_t) * (size_t)n);
    if (ns) c->slots = ns;
    int* nt = ns ? (int*)realloc(c->tok, sizeof(int) * (size_t)n) : NULL;
    if (nt) c->tok = nt;
    int* no = nt ? (int*)realloc(c->off, sizeof(int) * ((size_t)n + 1)) : NULL;
    if (no) c->off = no;
    if (!no) { c->n = -1; return -1; }
    c->cap = n;
  }
  int m = 0;
  for (int t = 0; t < n; t++) {  /* insertion sort by slot, stable: once a step, n is a batch */
    if (slots[t] == 0) continue;
    int k = m++;
    while (k > 0 && slots[c->tok[k - 1]] > slots[t]) { c->tok[k] = c->tok[k - 1]; k--; }
    c->tok[k] = t;
  }
  int ni = 0;
  c->off[0] = 0;
  for (int a = 0; a < m;) {
    int b = a;
    while (b < m && slots[c->tok[b]] == slots[c->tok[a]]) b++;
    const int len = b - a, k = (len + gmax - 1) / gmax, base = len / k, extra = len % k;
    for (int i = 0, at = a; i < k; i++) {
      at += base + (i < extra);
      c->off[++ni] = at;
    }
    a = b;
  }
  memcpy(c->slots, slots, sizeof(int64_t) * (size_t)n);
  c->n = n; c->gmax = gmax; c->ni = ni;
  *tok = c->tok; *off = c->off;
  return ni;
}
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

/* Prompt rows as bf16 pairs (x and the rank values rounded to bf16, weights exact, fp32 sums), where the CPU
   multiplies bf16 pairs: on AMX tiles (amx_rows_*) or with AVX-512 BF16's vdpbf16ps (dp_rows_*), both reading
   one slot's rank rows as pair_layout_* lays them out. Prompt paths: 0 the vector FMA kernel (fp32 x), 1 bf16 dot
   products, 2 AMX tiles; prompt_best is what this CPU has, prompt_path what serves (tests switch it). */
#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>
#define HAVE_BF16_PAIRS 1
#define DP_S 8  /* dp_rows_*: tokens a shrink tile (one accumulator of 16 ranks each) */
#define DP_T 4  /* tokens x */
#define DP_C 4  /* vectors of 16 output columns an expand tile */
#else
#define HAVE_BF16_PAIRS 0
#endif
#if HAVE_BF16_PAIRS && defined(__AMX_BF16__) && defined(__AMX_TILE__)
@AMX_TILES@
#define HAVE_AMX_BF16 1
#else
#define HAVE_AMX_BF16 0
#endif
static int prompt_best = 0, prompt_path = 0;

/* The best prompt path this CPU grants (AMX needs Linux's leave for the tile state); it then serves. */
int loraserve_prompt_init(void) {
#if HAVE_AMX_BF16
  if (amx_request()) prompt_best = 2;
  else
#endif
  prompt_best = HAVE_BF16_PAIRS;
  prompt_path = prompt_best;
  return prompt_best;
}

/* Tests: a path below the best (0: the vector kernel), or the best again with a larger number. */
void loraserve_set_prompt_path(int path) { prompt_path = path < 0 ? 0 : path > prompt_best ? prompt_best : path; }
int loraserve_prompt_path(void) { return prompt_path; }

#if HAVE_AMX_BF16
/* Tiles 0-1: C, 16 tokens x 16 fp32 (rank values, or output columns read from y); 2-3: 16 tokens x 32 bf16
   of x; 4: 16 pairs of in values x 16 ranks (A^T, VNNI); 5-6: 16 tokens x 16 bf16 rank values; 7: 8 pairs of
   ranks x 16 output columns (B^T, VNNI). */
static void amx_prompt_tiles(void) {
  static const uint8_t rows[8] = {16, 16, 16, 16, 16, 16, 16, 8};
  static const uint16_t colsb[8] = {64, 64, 64, 64, 64, 32, 32, 64};
  amx_load_tiles(rows, colsb);
}
#endif

#if HAVE_BF16_PAIRS

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

/* Bytes of the bf16 pair paths' workspace, 64-byte aligned parts (see pair_layout_*, amx_rows_*, dp_rows_*). */
#define PAIR_X_BYTES(in) ((long)PROMPT_SPAN * (in) * 2)
static inline long pair_ws_bytes(int in, int rp16, long out_max) {
  return PAIR_X_BYTES(in) + (long)rp16 * in * 2 + (long)rp16 * out_max * 2 + 32L * rp16 * 4 + 32L * rp16 * 2
         + 16 * 16 * 4 * 2 + (long)rp16 * 4 + 6 * 64;
}
static inline char* align64(char* p) { return (char*)(((uintptr_t)p + 63) & ~(uintptr_t)63); }

/* The bf16 pair paths' workspace after x (ws from pair_layout_* on, 64-byte aligned parts): A^T and B^T of one slot and
   target as the tiles read them, the rank values of 32 tokens in fp32 and bf16, two partial output tiles, and
   each rank's scale. */
typedef struct { uint32_t* at; uint32_t* bv; float* v; uint16_t* vb; float* tmp; float* fr; } pair_ws;
static inline pair_ws pair_parts(char* ws, int rp, int in, long out) {
  pair_ws w;
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
static void pair_x_rows(int m, const float* x, long xs, int in, uint16_t* xb) {
  for (int t = 0; t < (m > 16 ? 32 : 16); t++) {
    uint16_t* d = xb + (long)t * in;
    if (t >= m) { memset(d, 0, (size_t)in * 2); continue; }
    const float* r = x + (long)t * xs;
    for (int i = 0; i < in; i += 32)
      _mm512_storeu_si512(d + i, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(r + i + 16), _mm512_loadu_ps(r + i)));
  }
}
#endif
