/* loraserve: RoPE, RMSNorm with its residual add, and SiLU x up, with torch's bits (server/model/cpu_glue.py). */
#include <stdint.h>
#include <string.h>
#include <math.h>

#define MAX_NORM_DIM 16384

typedef float v16 __attribute__((vector_size(64)));

static inline v16 load16(const float* p) { v16 v; memcpy(&v, p, sizeof v); return v; }
static inline void store16(float* p, v16 v) { memcpy(p, &v, sizeof v); }

/* In place on the first nr heads of hd floats of each of t rows (row stride rs): HF's rotate-half
   RoPE, x * cos + rotate_half(x) * sin, with the row's cos and sin (tables of hd floats each);
   built without contraction, so bit for bit torch's three ops. */
void lsq_rope(int t, int nr, int hd, float* x, long rs, const float* cos, const float* sin) {
  const int half = hd / 2;
  for (int i = 0; i < t; i++) {
    const float* c = cos + (long)i * hd;
    const float* s = sin + (long)i * hd;
    for (int h = 0; h < nr; h++) {
      float* v = x + (long)i * rs + (long)h * hd;
      float lo[512], hi[512];
      memcpy(lo, v, sizeof(float) * half);
      memcpy(hi, v + half, sizeof(float) * half);
      for (int j = 0; j < half; j++) {
        v[j] = lo[j] * c[j] + (-hi[j]) * s[j];
        v[j + half] = hi[j] * c[j + half] + lo[j] * s[j + half];
      }
    }
  }
}

static inline int ceil_log2(long x) {
  if (x <= 2) return 1;
  int bits = 0;
  for (unsigned long v = (unsigned long)(x - 1); v; v >>= 1) bits++;
  return bits;
}

/* The float sum of sq[0..n) in the order of torch's CPU sum kernel with lanes of W floats: the
   W-wide vectors of the row, read as rows of 4, summed into 4 accumulators cascaded in levels of
   2^p vector rows; the leftover vectors into the first accumulator; the 4 accumulators; then the
   scalar tail and the W lanes in order. W is a constant where it is inlined, so the lane loops vectorize. */
static inline __attribute__((always_inline)) float torch_sum(const float* sq, long n, const int W) {
  const long nv = n / W, rows = nv / 4;
  int p = ceil_log2(rows) / 4;
  if (p < 4) p = 4;
  const long step = 1L << p, mask = step - 1;
  float acc[4][4][16];
  memset(acc, 0, sizeof acc);
  long i = 0;
  for (; i + step <= rows;) {
    for (long j = 0; j < step; ++j, ++i)
      for (int k = 0; k < 4; k++)
        for (int l = 0; l < W; l++) acc[0][k][l] += sq[(i * 4 + k) * W + l];
    for (int j = 1; j < 4; ++j) {
      for (int k = 0; k < 4; k++)
        for (int l = 0; l < W; l++) { acc[j][k][l] += acc[j - 1][k][l]; acc[j - 1][k][l] = 0.f; }
      if ((i & (mask << (j * p))) != 0) break;
    }
  }
  for (; i < rows; ++i)
    for (int k = 0; k < 4; k++)
      for (int l = 0; l < W; l++) acc[0][k][l] += sq[(i * 4 + k) * W + l];
  for (int j = 1; j < 4; ++j)
    for (int k = 0; k < 4; k++)
      for (int l = 0; l < W; l++) acc[0][k][l] += acc[j][k][l];
  for (long v = rows * 4; v < nv; ++v)
    for (int l = 0; l < W; l++) acc[0][0][l] += sq[v * W + l];
  for (int k = 1; k < 4; k++)
    for (int l = 0; l < W; l++) acc[0][0][l] += acc[0][k][l];
  float s = 0.f;
  for (long c = nv * W; c < n; ++c) s += sq[c];
  for (int l = 0; l < W; l++) s += acc[0][0][l];
  return s;
}

static inline __attribute__((always_inline)) void norm_row(
    long n, const float* x, const float* r, float* h, const float* w, float eps, float* y, const int W) {
  float sq[MAX_NORM_DIM];
  const float* src = x;
  if (r) {  /* the residual add first: h = x + r, normalized */
    for (long c = 0; c < n; c++) h[c] = x[c] + r[c];
    src = h;
  }
  for (long c = 0; c < n; c++) sq[c] = src[c] * src[c];
  const float mean = torch_sum(sq, n, W) / (float)n;
  const float rs = 1.f / sqrtf(mean + eps);
  for (long c = 0; c < n; c++) y[c] = (src[c] * rs) * w[c];
}

/* y = RMSNorm(x (+ r)) * w over t rows of n floats (row strides xs, rs, hs, ys); with r, the sum
   x + r is also written to h. Torch's bits with torch's sum lane width W (8 or 16). */
void lsq_rms_norm(int t, long n, const float* x, long xs, const float* r, long rs, float* h, long hs,
                  const float* w, float eps, float* y, long ys, int W) {
  #pragma omp parallel for schedule(static) if(t >= 64)
  for (int i = 0; i < t; i++) {
    const float* ri = r ? r + (long)i * rs : 0;
    float* hi = r ? h + (long)i * hs : 0;
    if (W == 16) norm_row(n, x + (long)i * xs, ri, hi, w, eps, y + (long)i * ys, 16);
    else norm_row(n, x + (long)i * xs, ri, hi, w, eps, y + (long)i * ys, 8);
  }
}

/* out = silu(g) * u over t rows of n floats: torch's bits. torch computes silu as x / (1 + exp(-x)) with
   SLEEF's expf (the u10 variant, fused multiply-adds), element by element, so the same steps in the same
   order give the same floats; needs AVX2 and FMA (lsq_silu_ready says whether this build has them), and
   loading checks the bits against torch's op before using it. */
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
static inline __m256 sleef_expf(__m256 d) {
  const __m256i q = _mm256_cvtps_epi32(_mm256_mul_ps(d, _mm256_set1_ps(1.442695040888963407359924681f)));
  const __m256 qf = _mm256_cvtepi32_ps(q);
  __m256 s = _mm256_fmadd_ps(qf, _mm256_set1_ps(-0.693145751953125f), d);
  s = _mm256_fmadd_ps(qf, _mm256_set1_ps(-1.428606765330187045e-06f), s);
  __m256 u = _mm256_set1_ps(0.000198527617612853646278381f);
  u = _mm256_fmadd_ps(u, s, _mm256_set1_ps(0.00139304355252534151077271f));
  u = _mm256_fmadd_ps(u, s, _mm256_set1_ps(0.00833336077630519866943359f));
  u = _mm256_fmadd_ps(u, s, _mm256_set1_ps(0.0416664853692054748535156f));
  u = _mm256_fmadd_ps(u, s, _mm256_set1_ps(0.166666671633720397949219f));
  u = _mm256_fmadd_ps(u, s, _mm256_set1_ps(0.5f));
  u = _mm256_add_ps(_mm256_set1_ps(1.0f), _mm256_fmadd_ps(_mm256_mul_ps(s, s), u, s));
  const __m256i q1 = _mm256_srai_epi32(q, 1), q2 = _mm256_sub_epi32(q, q1);  /* u * 2^q in two steps */
  const __m256 p1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(q1, _mm256_set1_epi32(127)), 23));
  const __m256 p2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(q2, _mm256_set1_epi32(127)), 23));
  u = _mm256_mul_ps(_mm256_mul_ps(u, p1), p2);
  u = _mm256_andnot_ps(_mm256_cmp_ps(d, _mm256_set1_ps(-104.f), _CMP_LT_OQ), u);
  return _mm256_blendv_ps(u, _mm256_set1_ps(__builtin_inff()), _mm256_cmp_ps(_mm256_set1_ps(100.f), d, _CMP_LT_OQ));
}

static inline __m256 silu_mul8(__m256 x, __m256 u) {
  const __m256 e = sleef_expf(_mm256_sub_ps(_mm256_setzero_ps(), x));
  return _mm256_mul_ps(_mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.f), e)), u);
}

int lsq_silu_ready(void) { return 1; }

/* torch's loop takes a row in vectors of V floats (twice its vector width) and the last n % V elements
   one at a time through std::exp (glibc's expf); V is found at load like the norm's lanes. */
void lsq_silu_mul(int t, long n, const float* g, long gs, const float* u, long us, float* y, long ys, int V) {
  const long nv = n / V * V;
  #pragma omp parallel for schedule(static) if((long)t * n >= 65536)  /* a prefill's rows over the threads */
  for (int i = 0; i < t; i++) {
    const float *gi = g + (long)i * gs, *ui = u + (long)i * us;
    float* yi = y + (long)i * ys;
    for (long c = 0; c < nv; c += 8)
      _mm256_storeu_ps(yi + c, silu_mul8(_mm256_loadu_ps(gi + c), _mm256_loadu_ps(ui + c)));
    for (long c = nv; c < n; c++) yi[c] = (gi[c] / (1.f + expf(-gi[c]))) * ui[c];
  }
}
#else
int lsq_silu_ready(void) { return 0; }
void lsq_silu_mul(int t, long n, const float* g, long gs, const float* u, long us, float* y, long ys, int V) {}
#endif
