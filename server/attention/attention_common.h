/* loraserve: helpers shared by the CPU attention kernels (server/attention/decode_kernel.py and context_kernel.py
   paste it first). */
#include <stdint.h>
#include <string.h>
#include <math.h>

typedef float v16 __attribute__((vector_size(64)));
typedef int32_t i16 __attribute__((vector_size(64)));

#define MAXG 16

typedef float v8 __attribute__((vector_size(32)));
typedef int32_t i8 __attribute__((vector_size(32)));  /* 8 lanes of int32, as i16 is 16 */
typedef float v4 __attribute__((vector_size(16)));

/* Cephes expf, lane by lane (16 lanes: vexp; 8: vexp8, AVX2's native width, the same bits a lane); inputs below
   -87.3 give exactly 0 (masked and far-below-max scores). */
#define DEFINE_VEXP(name, V, I) \
static inline V name(V x) { \
  const V lo = (V){0} - 87.3f; \
  const I under = x < lo; \
  x = (V)((~under & (I)x) | (under & (I)lo)); \
  V n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;  /* round to nearest */ \
  V r = x - n * 0.693359375f; \
  r = r - n * -2.12194440e-4f; \
  V p = 1.9875691500E-4f * r + 1.3981999507E-3f; \
  p = p * r + 8.3334519073E-3f; \
  p = p * r + 4.1665795894E-2f; \
  p = p * r + 1.6666665459E-1f; \
  p = p * r + 5.0000001201E-1f; \
  p = p * (r * r) + r + 1.f; \
  I e = (__builtin_convertvector(n, I) + 127) << 23; \
  return (V)(~under & (I)(p * (V)e)); \
}
DEFINE_VEXP(vexp, v16, i16)
DEFINE_VEXP(vexp8, v8, i8)
#undef DEFINE_VEXP

static inline float hsum8(v8 a) {  /* halves added in a fixed order */
  v4 c, d;
  memcpy(&c, &a, 16); memcpy(&d, (const char*)&a + 16, 16);
  c += d;
  return (c[0] + c[2]) + (c[1] + c[3]);
}

static inline float hsum(v16 v) {  /* the same order: halves first */
  v8 a, b;
  memcpy(&a, &v, 32); memcpy(&b, (const char*)&v + 32, 32);
  return hsum8(a + b);
}

static inline v16 load16(const float* p) { v16 v; memcpy(&v, p, sizeof v); return v; }

/* Loops over a handful of registers, unrolled: GCC left some as loops over accumulators in memory. */
#define UNROLL _Pragma("GCC unroll 16")

#define PF 8  /* cache rows prefetched ahead */
static inline void prefetch_row(const float* row, int hd) {
  for (int l = 0; l < hd; l += 16) __builtin_prefetch(row + l);
}
static inline void store16(float* p, v16 v) { memcpy(p, &v, sizeof v); }
static inline v8 load8(const float* p) { v8 v; memcpy(&v, p, sizeof v); return v; }
static inline void store8(float* p, v8 v) { memcpy(p, &v, sizeof v); }

/* The largest of s[0 .. 16 nb) (exact in any order). */
static inline float row_max(const float* s, int nb) {
#if defined(__AVX512F__)
  v16 mv = load16(s);
  for (int b = 1; b < nb; b++) {
    const v16 x = load16(s + 16 * b);
    const i16 gt = x > mv;
    mv = (v16)((gt & (i16)x) | (~gt & (i16)mv));
  }
  float m = mv[0];
  for (int t = 1; t < 16; t++) m = mv[t] > m ? mv[t] : m;
#else
  v8 mv = load8(s);
  for (int i = 1; i < 2 * nb; i++) {
    const v8 x = load8(s + 8 * i);
    const i8 gt = x > mv;
    mv = (v8)((gt & (i8)x) | (~gt & (i8)mv));
  }
  float m = mv[0];
  for (int t = 1; t < 8; t++) m = mv[t] > m ? mv[t] : m;
#endif
  return m;
}

/* The scores s[0 .. 16 nb) (-inf where masked) become exp(s - m) in place; returns their sum, lanes first, then
   hsum's order. On AVX2 in native 8-lane halves (generic 16-lane vectors went through the stack there): lane for
   lane the same operations, so the same bits. */
static inline float exp_sum(float* s, int nb, float m) {
#if defined(__AVX512F__)
  v16 sum = {0};
  for (int b = 0; b < nb; b++) {
    const v16 e = vexp(load16(s + 16 * b) - m);
    store16(s + 16 * b, e);
    sum += e;
  }
  return hsum(sum);
#else
  v8 lo = {0}, hi = {0};
  for (int b = 0; b < nb; b++) {
    const v8 el = vexp8(load8(s + 16 * b) - m), eh = vexp8(load8(s + 16 * b + 8) - m);
    store8(s + 16 * b, el);
    store8(s + 16 * b + 8, eh);
    lo += el;
    hi += eh;
  }
  return hsum8(lo + hi);
#endif
}

/* AVX2's value pass: out[v][0 .. 16C) = sum_j p[v][j] * V[rw[j]] (KV head g) / den[v] over j < n, in key order,
   for VN <= 3 query vectors at once, W <= 4 eight-lane columns from c0 a pass (12 accumulators, three weights and
   a row's piece: AVX2's 16 registers), so a row's piece is loaded once for the VN vectors. Lane for lane the sums
   of the sixteen-lane passes, so the same bits. `prefetch`: ask for the rows PF ahead. VN and W are constants and
   the loops over them unrolled, so the accumulators are registers: sized by C (a variable-length array) or left
   as loops by GCC, they lived in memory, and the prompt kernel took 2.2x as long (SmolLM2, 544 tokens: 16.5 ->
   7.4 ms a layer, Zen 3, 2 threads). */
static inline __attribute__((always_inline)) void weighted_cols8(const int VN, const int W, const float* const* p,
    int n, const float* vc, const int64_t* rw, int nkv, int g, int hd, int c0, int prefetch, const float* den,
    float* const* out) {
  v8 acc[3][4];
  UNROLL for (int v = 0; v < VN; v++)
    UNROLL for (int w = 0; w < W; w++) acc[v][w] = (v8){0};
  for (int j = 0; j < n; j++) {
    if (prefetch && j + PF < n) prefetch_row(vc + (rw[j + PF] * nkv + g) * hd, hd);
    const float* vr = vc + (rw[j] * nkv + g) * hd + 8 * c0;
    v8 pj[3];
    UNROLL for (int v = 0; v < VN; v++) pj[v] = (v8){0} + p[v][j];
    UNROLL for (int w = 0; w < W; w++) {
      const v8 x = load8(vr + 8 * w);
      UNROLL for (int v = 0; v < VN; v++) acc[v][w] += pj[v] * x;
    }
  }
  UNROLL for (int v = 0; v < VN; v++)
    UNROLL for (int w = 0; w < W; w++) store8(out[v] + 8 * (c0 + w), acc[v][w] / den[v]);
}
/* All 2C columns of VN query vectors, four columns a pass (the rows' pieces come again from L2). */
static inline __attribute__((always_inline)) void weighted_rows8(const int C, const int VN, const float* const* p,
    int n, const float* vc, const int64_t* rw, int nkv, int g, int hd, int prefetch, const float* den,
    float* const* out) {
  int c0 = 0;
  for (; c0 + 4 <= 2 * C; c0 += 4) weighted_cols8(VN, 4, p, n, vc, rw, nkv, g, hd, c0, prefetch && c0 == 0, den, out);
  if (2 * C - c0 == 2) weighted_cols8(VN, 2, p, n, vc, rw, nkv, g, hd, c0, prefetch && c0 == 0, den, out);
}

/* AVX2's whole value pass of one KV head: nv query vectors (weights p[v], sum den[v], output out[v]) three at a
   time, the rows prefetched in the first pass. */
static inline __attribute__((always_inline)) void weighted_rows8_all(const int C, int nv, const float* const* p,
    int n, const float* vc, const int64_t* rw, int nkv, int g, int hd, const float* den, float* const* out) {
  for (int v0 = 0; v0 < nv; v0 += 3) {
    if (nv - v0 >= 3) weighted_rows8(C, 3, p + v0, n, vc, rw, nkv, g, hd, v0 == 0, den + v0, out + v0);
    else if (nv - v0 == 2) weighted_rows8(C, 2, p + v0, n, vc, rw, nkv, g, hd, v0 == 0, den + v0, out + v0);
    else weighted_rows8(C, 1, p + v0, n, vc, rw, nkv, g, hd, v0 == 0, den + v0, out + v0);
  }
}
