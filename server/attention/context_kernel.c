/* loraserve: prompt attention read in place from the paged KV cache. A template:
   server/attention/context_kernel.py fills in the blocks (context_block.c, compiled once per shape) and their
   dispatch. */

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

/* AVX2: the scores of query vectors v0 .. v0+VN-1 (VN <= 3, a constant) for keys b*16 .. b*16+15, in 8-lane
   halves (VN x 2 accumulators, two key loads), scaled, -inf past each query's own keys: s[v][b*16 + t]. */
static inline __attribute__((always_inline)) void scores8(const int VN, const int G, const int hd, int v0,
    const float* const* qp, const float* kb, int b, const int* len, float scale, float* s, int nbm) {
  v8 lo[3], hi[3];
  UNROLL for (int v = 0; v < VN; v++) lo[v] = hi[v] = (v8){0};
  for (int c = 0; c < hd; c++) {
    const v8 kl = load8(kb + c * 16), kh = load8(kb + c * 16 + 8);
    UNROLL for (int v = 0; v < VN; v++) {
      lo[v] += qp[v0 + v][c] * kl;
      hi[v] += qp[v0 + v][c] * kh;
    }
  }
  const i8 lane = {0, 1, 2, 3, 4, 5, 6, 7}, ninf = (i8)((v8){0} - INFINITY);
  for (int v = 0; v < VN; v++) {
    const int l = len[(v0 + v) / G];
    const i8 seen_lo = lane + b * 16 < l, seen_hi = lane + (b * 16 + 8) < l;
    float* sv = s + ((long)(v0 + v) * nbm + b) * 16;
    store8(sv, (v8)((seen_lo & (i8)(lo[v] * scale)) | (~seen_lo & ninf)));
    store8(sv + 8, (v8)((seen_hi & (i8)(hi[v] * scale)) | (~seen_hi & ninf)));
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
