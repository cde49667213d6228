/* loraserve: int8 x int8 linears with per-token activation scales (server/model/int8_dynamic.py fills in the
   AMX tile code). */
#include <stdint.h>
#include <string.h>
#include <math.h>
#include <immintrin.h>

#define NB 16
/* Rows a vector block takes at a time: its accumulators stay in registers (AVX2 has 16: a row takes two of
   them, so 4 rows; 8 rows spilled and ran 14% slower on a Zen 3 EPYC). */
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define RB 8
#elif defined(__AVX2__)
#define RB 4
#else
#define RB 8
#endif

/* In-place unnormalized Walsh-Hadamard transform of b floats (b a power of two >= 16), natural
   (Sylvester) order, stages h = b/2, b/4, ..., 1 (between vectors while h is at least the vector
   width, then inside them). Every output is a fixed sequence of single adds and subtracts, the same
   on every build, so the result is bit-exact and `hadamard_reference` reproduces it. */
#if defined(__AVX512F__)
#define VW 16
#elif defined(__AVX2__)
#define VW 8
#else
#define VW 1
#endif

static void fwht(float* v, int b) {
  for (int h = b >> 1; h >= VW && h >= 1; h >>= 1)
    for (int i = 0; i < b; i += h << 1)
      for (int j = i; j < i + h; j += VW) {
#if VW == 16
        const __m512 a = _mm512_loadu_ps(v + j), c = _mm512_loadu_ps(v + j + h);
        _mm512_storeu_ps(v + j, _mm512_add_ps(a, c));
        _mm512_storeu_ps(v + j + h, _mm512_sub_ps(a, c));
#elif VW == 8
        const __m256 a = _mm256_loadu_ps(v + j), c = _mm256_loadu_ps(v + j + h);
        _mm256_storeu_ps(v + j, _mm256_add_ps(a, c));
        _mm256_storeu_ps(v + j + h, _mm256_sub_ps(a, c));
#else
        const float a = v[j], c = v[j + h]; v[j] = a + c; v[j + h] = a - c;
#endif
      }
#if VW == 16
  for (int i = 0; i < b; i += 16) {  /* h = 8, 4, 2, 1: lanes with bit h set take (partner - own) */
    __m512 x = _mm512_loadu_ps(v + i), t;
    t = _mm512_shuffle_f32x4(x, x, _MM_SHUFFLE(1, 0, 3, 2)); x = _mm512_mask_sub_ps(_mm512_add_ps(x, t), 0xFF00, t, x);
    t = _mm512_shuffle_f32x4(x, x, _MM_SHUFFLE(2, 3, 0, 1)); x = _mm512_mask_sub_ps(_mm512_add_ps(x, t), 0xF0F0, t, x);
    t = _mm512_permute_ps(x, _MM_SHUFFLE(1, 0, 3, 2)); x = _mm512_mask_sub_ps(_mm512_add_ps(x, t), 0xCCCC, t, x);
    t = _mm512_permute_ps(x, _MM_SHUFFLE(2, 3, 0, 1)); x = _mm512_mask_sub_ps(_mm512_add_ps(x, t), 0xAAAA, t, x);
    _mm512_storeu_ps(v + i, x);
  }
#elif VW == 8
  for (int i = 0; i < b; i += 8) {  /* h = 4, 2, 1 */
    __m256 x = _mm256_loadu_ps(v + i), t;
    t = _mm256_permute2f128_ps(x, x, 1);
    x = _mm256_blend_ps(_mm256_add_ps(x, t), _mm256_sub_ps(t, x), 0xF0);
    t = _mm256_shuffle_ps(x, x, _MM_SHUFFLE(1, 0, 3, 2));
    x = _mm256_blend_ps(_mm256_add_ps(x, t), _mm256_sub_ps(t, x), 0xCC);
    t = _mm256_shuffle_ps(x, x, _MM_SHUFFLE(2, 3, 0, 1));
    x = _mm256_blend_ps(_mm256_add_ps(x, t), _mm256_sub_ps(t, x), 0xAA);
    _mm256_storeu_ps(v + i, x);
  }
#endif
}

/* Largest |v[j]| (exact in any order). */
static float abs_max(const float* v, int n) {
  float amax = 0.f;
  int j = 0;
#if VW == 16
  __m512 mx = _mm512_setzero_ps();
  for (; j + 16 <= n; j += 16) mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_loadu_ps(v + j)));
  amax = _mm512_reduce_max_ps(mx);
#elif VW == 8
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 mx = _mm256_setzero_ps();
  for (; j + 8 <= n; j += 8) mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, _mm256_loadu_ps(v + j)));
  float lanes[8];
  _mm256_storeu_ps(lanes, mx);
  for (int e = 0; e < 8; e++) amax = lanes[e] > amax ? lanes[e] : amax;
#endif
  for (; j < n; j++) { const float a = fabsf(v[j]); amax = a > amax ? a : amax; }
  return amax;
}

/* m rows of x (k floats each, row stride xs) -> q (kp bytes each) and scale (m floats): the row
   padded with zeros to kp, rotated in blocks of b, then scale = absmax / 127 and
   q = rint(v * (127 / absmax)) + 128 in [1, 255] (u8 with zero point 128). */
void lsq_quantize(int m, int k, int kp, int b, const float* x, long xs, uint8_t* q, float* scale) {
  #pragma omp parallel for schedule(static) if(m >= 32)
  for (int i = 0; i < m; i++) {
    float v[kp];
    memcpy(v, x + (long)i * xs, sizeof(float) * k);
    memset(v + k, 0, sizeof(float) * (kp - k));
    for (int o = 0; o < kp; o += b) fwht(v + o, b);
    const float amax = abs_max(v, kp);
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    scale[i] = amax / 127.f;
    uint8_t* o = q + (long)i * kp;
    int j = 0;
#if VW == 16
    const __m512 vi = _mm512_set1_ps(inv), hi = _mm512_set1_ps(127.f), lo = _mm512_set1_ps(-127.f);
    const __m512i zp = _mm512_set1_epi32(128);
    for (; j + 16 <= kp; j += 16) {
      const __m512 f = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_loadu_ps(v + j), vi), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      const __m512i d = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(f, lo), hi)), zp);
      _mm_storeu_si128((__m128i*)(o + j), _mm512_cvtusepi32_epi8(d));
    }
#elif VW == 8
    const __m256 vi = _mm256_set1_ps(inv), hi = _mm256_set1_ps(127.f), lo = _mm256_set1_ps(-127.f);
    const __m256i zp = _mm256_set1_epi32(128);
    for (; j + 8 <= kp; j += 8) {
      __m256 f = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(v + j), vi), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      __m256i d = _mm256_add_epi32(_mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(f, lo), hi)), zp);
      __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(d), _mm256_extracti128_si256(d, 1));
      _mm_storel_epi64((__m128i*)(o + j), _mm_packus_epi16(w, w));
    }
#endif
    for (; j < kp; j++) {
      float f = nearbyintf(v[j] * inv);
      f = f > 127.f ? 127.f : (f < -127.f ? -127.f : f);
      o[j] = (uint8_t)((int)f + 128);
    }
  }
}

/* The same rotation for weight rows at load (n rows of kp floats, in place). */
void lsq_rotate(int n, int kp, int b, float* w) {
  #pragma omp parallel for schedule(static)
  for (int r = 0; r < n; r++)
    for (int o = 0; o < kp; o += b) fwht(w + (long)r * kp + o, b);
}

/* Packed weights: block c of NB outputs, k-group g of 4 inputs at wp + (c * kp/4 + g) * 64:
   NB outputs x 4 consecutive inputs. Rows past n are zero. */
void lsq_pack(int n, int kp, const int8_t* w, int8_t* wp) {
  const int nbk = (n + NB - 1) / NB;
  #pragma omp parallel for schedule(static)
  for (int c = 0; c < nbk; c++)
    for (int g = 0; g < kp / 4; g++)
      for (int r = 0; r < NB; r++)
        for (int e = 0; e < 4; e++) {
          const int row = c * NB + r;
          wp[(((long)c * (kp / 4) + g) * NB + r) * 4 + e] = row < n ? w[(long)row * kp + g * 4 + e] : 0;
        }
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define ISA "avx512_vnni"
/* M rows (M <= RB) against one block of NB outputs: u8 x s8 -> s32 (vpdpbusd), minus 128 * sum(w). */
static inline __attribute__((always_inline)) void block(const int M, int kp, const uint8_t* xu,
    const int8_t* wp, const int32_t* wsum, const float* ws, const float* xsc, float* y, long ys, int cols) {
  __m512i acc[RB];
  for (int i = 0; i < M; i++) acc[i] = _mm512_setzero_si512();
  for (int g = 0; g < kp / 4; g++) {
    const __m512i w = _mm512_loadu_si512(wp + (long)g * 64);
    for (int i = 0; i < M; i++)
      acc[i] = _mm512_dpbusd_epi32(acc[i], _mm512_set1_epi32(*(const int32_t*)(xu + (long)i * kp + g * 4)), w);
  }
  const __m512i comp = _mm512_slli_epi32(_mm512_loadu_si512(wsum), 7);
  const __mmask16 mk = cols >= NB ? (__mmask16)0xFFFF : (__mmask16)((1u << cols) - 1);
  const __m512 vws = _mm512_loadu_ps(ws);
  for (int i = 0; i < M; i++) {
    const __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[i], comp)), vws);
    _mm512_mask_storeu_ps(y + (long)i * ys, mk, _mm512_mul_ps(f, _mm512_set1_ps(xsc[i])));
  }
}
#elif defined(__AVX2__)
#define ISA "avx2"
/* AVX2 has no u8 x s8 -> s32 instruction that cannot saturate: multiply |w| (u8) by x * sign(w)
   (s8) with maddubs (each pair at most 2 * 127 * 127, below the s16 limit), then madd to s32. */
static inline __attribute__((always_inline)) void block(const int M, int kp, const uint8_t* xu,
    const int8_t* wp, const int32_t* wsum, const float* ws, const float* xsc, float* y, long ys, int cols) {
  (void)wsum;
  __m256i acc[RB][2];
  for (int i = 0; i < M; i++) acc[i][0] = acc[i][1] = _mm256_setzero_si256();
  const __m256i ones = _mm256_set1_epi16(1), flip = _mm256_set1_epi8((char)0x80);
  for (int g = 0; g < kp / 4; g++) {
    for (int h = 0; h < 2; h++) {
      const __m256i w = _mm256_loadu_si256((const __m256i*)(wp + (long)g * 64 + h * 32));
      const __m256i aw = _mm256_sign_epi8(w, w);
      for (int i = 0; i < M; i++) {
        const __m256i xb = _mm256_xor_si256(_mm256_set1_epi32(*(const int32_t*)(xu + (long)i * kp + g * 4)), flip);
        const __m256i p = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(xb, w));
        acc[i][h] = _mm256_add_epi32(acc[i][h], _mm256_madd_epi16(p, ones));
      }
    }
  }
  for (int i = 0; i < M; i++) {
    int32_t a[NB];
    _mm256_storeu_si256((__m256i*)a, acc[i][0]);
    _mm256_storeu_si256((__m256i*)(a + 8), acc[i][1]);
    for (int c = 0; c < cols; c++) y[(long)i * ys + c] = ((float)a[c] * ws[c]) * xsc[i];
  }
}
#else
#define ISA "scalar"
static inline void block(const int M, int kp, const uint8_t* xu, const int8_t* wp, const int32_t* wsum,
                         const float* ws, const float* xsc, float* y, long ys, int cols) {
  (void)wsum;
  for (int i = 0; i < M; i++) {
    int32_t a[NB] = {0};
    for (int g = 0; g < kp / 4; g++)
      for (int c = 0; c < NB; c++)
        for (int e = 0; e < 4; e++)
          a[c] += ((int32_t)xu[(long)i * kp + g * 4 + e] - 128) * wp[((long)g * NB + c) * 4 + e];
    for (int c = 0; c < cols; c++) y[(long)i * ys + c] = ((float)a[c] * ws[c]) * xsc[i];
  }
}
#endif

const char* lsq_isa(void) { return ISA; }

static void block_rows(int m, int kp, const uint8_t* xu, const int8_t* wp, const int32_t* wsum,
                       const float* ws, const float* xsc, float* y, long ys, int cols) {
  switch (m) {
    case 1: block(1, kp, xu, wp, wsum, ws, xsc, y, ys, cols); break;
    case 2: block(2, kp, xu, wp, wsum, ws, xsc, y, ys, cols); break;
    case 3: block(3, kp, xu, wp, wsum, ws, xsc, y, ys, cols); break;
#if RB > 4
    case 4: block(4, kp, xu, wp, wsum, ws, xsc, y, ys, cols); break;
    case 5: block(5, kp, xu, wp, wsum, ws, xsc, y, ys, cols); break;
    case 6: block(6, kp, xu, wp, wsum, ws, xsc, y, ys, cols); break;
    case 7: block(7, kp, xu, wp, wsum, ws, xsc, y, ys, cols); break;
#endif
    default: block(RB, kp, xu, wp, wsum, ws, xsc, y, ys, cols); break;
  }
}

#if defined(__AMX_INT8__) && defined(__AMX_TILE__) && defined(__AVX512F__)
@AMX_TILES@
/* AMX: 16 rows x 64 bytes of x (A) times 16 k-groups x 64 bytes of a packed block (B, which is
   exactly the VNNI layout tdpbusd wants) into 16 x 16 int32 (C). Tiles 0-3: C, 4-5: A, 6-7: B. */
static int amx_ready = 0;

int lsq_amx_init(void) {
  amx_ready = amx_request();
  return amx_ready;
}

/* Tiles 0-5 (C and A) hold `rows` token rows; the B tiles always 16 k-groups. */
static void amx_config(int rows) {
  const uint8_t r = (uint8_t)rows, rs[8] = {r, r, r, r, r, r, 16, 16};
  const uint16_t colsb[8] = {64, 64, 64, 64, 64, 64, 64, 64};
  amx_load_tiles(rs, colsb);
}

static void amx_epilogue(int rows, const int32_t* acc, const int32_t* wsum, const float* ws, const float* xsc,
                         float* y, long ys, int cols) {
  const __m512i comp = _mm512_slli_epi32(_mm512_loadu_si512(wsum), 7);
  const __mmask16 mk = cols >= NB ? (__mmask16)0xFFFF : (__mmask16)((1u << cols) - 1);
  const __m512 vws = _mm512_loadu_ps(ws);
  for (int i = 0; i < rows; i++) {
    const __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_loadu_si512(acc + 16 * i), comp)), vws);
    _mm512_mask_storeu_ps(y + (long)i * ys, mk, _mm512_mul_ps(f, _mm512_set1_ps(xsc[i])));
  }
}

/* Rows r0 (and r1, 16 further on, or r0 again) against blocks c0 and c1 (or c0 again); `rows` as
   configured (16, or the last rows of the batch). */
static void amx_2x2(int rows, int r0, int r1, int c0, int c1, int n, int kp, const uint8_t* xu, const int8_t* wp,
                    const int32_t* wsum, const float* ws, const float* xsc, float* y, long ys) {
  _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
  const int8_t* b0 = wp + (long)c0 * (kp / 4) * 64;
  const int8_t* b1 = wp + (long)c1 * (kp / 4) * 64;
  for (int kk = 0; kk < kp; kk += 64) {
    /* Two k-steps ahead (2 KB a block): decode reads each weight once, from memory, and the hardware
       prefetcher alone left 8-13% of a SmolLM2 step's linear time on the table (measured). Past the end of
       the block the address is the next pair's start (blocks are laid out in order), where this thread or
       the other goes next: 4% more (prefetches never fault, so the last block needs no guard). */
    for (int l = 0; l < 1024; l += 64) {
      _mm_prefetch((const char*)(b0 + (long)(kk + 128) * 16 + l), _MM_HINT_T0);
      _mm_prefetch((const char*)(b1 + (long)(kk + 128) * 16 + l), _MM_HINT_T0);
    }
    _tile_loadd(4, xu + (long)r0 * kp + kk, kp);
    _tile_loadd(5, xu + (long)r1 * kp + kk, kp);
    _tile_loadd(6, b0 + (long)kk * 16, 64);
    _tile_loadd(7, b1 + (long)kk * 16, 64);
    _tile_dpbusd(0, 4, 6); _tile_dpbusd(1, 4, 7); _tile_dpbusd(2, 5, 6); _tile_dpbusd(3, 5, 7);
  }
  int32_t acc[4][256];
  _tile_stored(0, acc[0], 64); _tile_stored(1, acc[1], 64); _tile_stored(2, acc[2], 64); _tile_stored(3, acc[3], 64);
  const int rs[2] = {r0, r1}, cs[2] = {c0, c1};
  for (int a = 0; a < 2; a++) {
    if (a && r1 == r0) break;
    for (int b = 0; b < 2; b++) {
      if (b && c1 == c0) break;
      const int c = cs[b], cols = n - c * NB < NB ? n - c * NB : NB;
      amx_epilogue(rows, acc[2 * a + b], wsum + c * NB, ws + c * NB, xsc + rs[a], y + (long)rs[a] * ys + c * NB, ys, cols);
    }
  }
}
#define HAVE_AMX 1
#else
int lsq_amx_init(void) { return 0; }
#define HAVE_AMX 0
#endif

static int amx_min_rows = 2;  /* a single row streams as fast through the vector kernel (tests set it) */
void lsq_set_amx_min_rows(int r) { amx_min_rows = r; }

int lsq_has_amx(void) { return HAVE_AMX; }

/* y[i, :n] = ((float)(x_i . w_j) * ws[j]) * xsc[i] for m rows of quantized x (kp bytes each, zero
   point 128), weights packed by lsq_pack, wsum[j] = sum_k w[j, k], ws padded to whole blocks.
   Whole groups of 16 rows go through AMX where the CPU has it, the rest through `block`; the
   integer sums are exact and the float epilogue is the same, so the path never shows in the bits. */
void lsq_gemm(int m, int n, int kp, const uint8_t* xu, const float* xsc, const int8_t* wp,
              const int32_t* wsum, const float* ws, float* y, long ys) {
  const int nbk = (n + NB - 1) / NB, pairs = (nbk + 1) / 2;
#if HAVE_AMX
  const int amx = amx_ready && m >= amx_min_rows;
#else
  const int amx = 0;
#endif
  const int full = amx ? (m / 16) * 16 : 0, tail = m - full;
  #pragma omp parallel if(nbk > 1)
  {
#if HAVE_AMX
    if (full) {
      amx_config(16);
      #pragma omp for schedule(static) nowait
      for (int p = 0; p < pairs; p++) {
        const int c0 = 2 * p, c1 = c0 + 1 < nbk ? c0 + 1 : c0;
        for (int r = 0; r < full; r += 32)
          amx_2x2(16, r, r + 16 < full ? r + 16 : r, c0, c1, n, kp, xu, wp, wsum, ws, xsc, y, ys);
      }
    }
    if (amx && tail) {
      amx_config(tail);
      #pragma omp for schedule(static) nowait
      for (int p = 0; p < pairs; p++) {
        const int c0 = 2 * p, c1 = c0 + 1 < nbk ? c0 + 1 : c0;
        amx_2x2(tail, full, full, c0, c1, n, kp, xu, wp, wsum, ws, xsc, y, ys);
      }
    }
    if (amx) _tile_release();
#endif
    if (!amx) {
      #pragma omp for schedule(static)
      for (int c = 0; c < nbk; c++) {
        const int cols = n - c * NB < NB ? n - c * NB : NB;
        for (int r = 0; r < m; r += RB)
          block_rows(m - r < RB ? m - r : RB, kp, xu + (long)r * kp, wp + (long)c * (kp / 4) * (NB * 4),
                     wsum + c * NB, ws + c * NB, xsc + r, y + (long)r * ys + c * NB, ys, cols);
      }
    }
  }
}

/* One call per linear: quantize m rows of x into the scratch q (m * kp bytes) and scales s, then
   multiply. Saves the engine a second trip through Python per linear. */
void lsq_linear(int m, int k, int kp, int b, const float* x, long xs, uint8_t* q, float* s, int n,
                const int8_t* wp, const int32_t* wsum, const float* ws, float* y, long ys) {
  lsq_quantize(m, k, kp, b, x, xs, q, s);
  lsq_gemm(m, n, kp, q, s, wp, wsum, ws, y, ys);
}
