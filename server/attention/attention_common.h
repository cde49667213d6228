/* loraserve: helpers shared by the CPU attention kernels (server/attention/decode_kernel.py and context_kernel.py
   paste it first). */
#include <stdint.h>
#include <string.h>
#include <math.h>

typedef float v16 __attribute__((vector_size(64)));
typedef int32_t i16 __attribute__((vector_size(64)));

#define MAXG 16

/* Cephes expf on 16 lanes; inputs below -87.3 give exactly 0 (masked and far-below-max scores). */
static inline v16 vexp(v16 x) {
  const v16 lo = (v16){0} - 87.3f;
  const i16 under = x < lo;
  x = (v16)((~under & (i16)x) | (under & (i16)lo));
  v16 n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;  /* round to nearest */
  v16 r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  v16 p = 1.9875691500E-4f * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  p = p * (r * r) + r + 1.f;
  i16 e = (__builtin_convertvector(n, i16) + 127) << 23;
  return (v16)(~under & (i16)(p * (v16)e));
}

typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));

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

#define PF 8  /* cache rows prefetched ahead */
static inline void prefetch_row(const float* row, int hd) {
  for (int l = 0; l < hd; l += 16) __builtin_prefetch(row + l);
}
static inline void store16(float* p, v16 v) { memcpy(p, &v, sizeof v); }
static inline v8 load8(const float* p) { v8 v; memcpy(&v, p, sizeof v); return v; }
static inline void store8(float* p, v8 v) { memcpy(p, &v, sizeof v); }

/* out[0 .. 16C) = sum_j p[j] * V[rw[j]] (KV head g) / den over j < n, in key order, in 8-lane vectors: AVX2's
   value pass of one query vector at a time (sixteen-lane accumulators for several went through the stack there).
   Lane for lane the sums of the sixteen-lane passes, so the same bits. `prefetch`: ask for the rows PF ahead
   (the first of a row's passes). */
static inline __attribute__((always_inline)) void weighted_rows8(const int C, const float* p, int n, const float* vc,
    const int64_t* rw, int nkv, int g, int hd, int prefetch, float den, float* out) {
  v8 acc[2 * C];
  for (int c = 0; c < 2 * C; c++) acc[c] = (v8){0};
  for (int j = 0; j < n; j++) {
    if (prefetch && j + PF < n) prefetch_row(vc + (rw[j + PF] * nkv + g) * hd, hd);
    const float* vr = vc + (rw[j] * nkv + g) * hd;
    const float pj = p[j];
    for (int c = 0; c < 2 * C; c++) acc[c] += pj * load8(vr + 8 * c);
  }
  for (int c = 0; c < 2 * C; c++) store8(out + 8 * c, acc[c] / den);
}
