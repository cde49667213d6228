/* loraserve: decode attention read in place from the paged KV cache (server/attention/decode_kernel.py). */

/* One sequence d and one KV head g: out[d, h] = softmax(scale * q[d, h] . K[rows[j]]) . V[rows[j]] over
   j < n for the G query heads h of g together (each K and V row read once). Inlined with G and C
   (= hd / 16) as constants for the common shapes, so q and the accumulators stay in registers (3x
   faster than runtime-sized arrays on SmolLM2's shapes). The instance is chosen by the model's shape
   alone, so a token's bits still depend only on its own context. */
static inline __attribute__((always_inline)) void head_group(const int G, const int C, int d, int g, int nh,
    int nkv, int hd, const float* q, long qs, const float* kc, const float* vc, const int64_t* rw, int n,
    float scale, float* out) {
  const int nv = (n + 15) / 16;
  float s[G][nv * 16];
#if defined(__AVX512F__)
  v16 qv[G][C];
  for (int h = 0; h < G; h++)
    for (int c = 0; c < C; c++) qv[h][c] = load16(q + (long)d * qs + (long)(g * G + h) * hd + 16 * c);
  for (int j = 0; j < n; j++) {
    /* Rows are scattered over the paged cache, so the hardware prefetcher cannot follow them: ask for the
       row PF ahead (K, then V's first rows as K's end nears). Measured on SmolLM2 decode steps (8 x ~80
       tokens, 30 layers): this kernel's time a step 3.1-3.3 -> 2.4 ms. */
    if (j + PF < n) prefetch_row(kc + (rw[j + PF] * nkv + g) * hd, hd);
    else if (j + PF - n < n) prefetch_row(vc + (rw[j + PF - n] * nkv + g) * hd, hd);
    const float* kr = kc + (rw[j] * nkv + g) * hd;
    v16 kv[C];
    for (int c = 0; c < C; c++) kv[c] = load16(kr + 16 * c);
    for (int h = 0; h < G; h++) {
      v16 a = qv[h][0] * kv[0];
      for (int c = 1; c < C; c++) a += qv[h][c] * kv[c];
      s[h][j] = hsum(a) * scale;
    }
  }
#else
  for (int h = 0; h < G; h++) {
    const float* qh = q + (long)d * qs + (long)(g * G + h) * hd;
    v8 qlo[C], qhi[C];
    for (int c = 0; c < C; c++) { qlo[c] = load8(qh + 16 * c); qhi[c] = load8(qh + 16 * c + 8); }
    for (int j = 0; j < n; j++) {
      if (h == 0) {
        if (j + PF < n) prefetch_row(kc + (rw[j + PF] * nkv + g) * hd, hd);
        else if (j + PF - n < n) prefetch_row(vc + (rw[j + PF - n] * nkv + g) * hd, hd);
      }
      const float* kr = kc + (rw[j] * nkv + g) * hd;
      v8 lo = qlo[0] * load8(kr), hi = qhi[0] * load8(kr + 8);
      for (int c = 1; c < C; c++) {
        lo += qlo[c] * load8(kr + 16 * c);
        hi += qhi[c] * load8(kr + 16 * c + 8);
      }
      s[h][j] = hsum8(lo + hi) * scale;
    }
  }
#endif
  float inv[MAXG];
  for (int h = 0; h < G; h++) {
    for (int j = n; j < nv * 16; j++) s[h][j] = -INFINITY;
    inv[h] = exp_sum(s[h], nv, row_max(s[h], nv));
  }
#if defined(__AVX512F__)
  v16 acc[G][C];
  for (int h = 0; h < G; h++)
    for (int c = 0; c < C; c++) acc[h][c] = (v16){0};
  for (int j = 0; j < n; j++) {
    if (j + PF < n) prefetch_row(vc + (rw[j + PF] * nkv + g) * hd, hd);
    const float* vr = vc + (rw[j] * nkv + g) * hd;
    v16 vv[C];
    for (int c = 0; c < C; c++) vv[c] = load16(vr + 16 * c);
    for (int h = 0; h < G; h++) {
      const float p = s[h][j];
      for (int c = 0; c < C; c++) acc[h][c] += p * vv[c];
    }
  }
  for (int h = 0; h < G; h++)
    for (int c = 0; c < C; c++) store16(out + ((long)d * nh + g * G + h) * hd + 16 * c, acc[h][c] / inv[h]);
#else
  const float* pv[MAXG];
  float* ov[MAXG];
  for (int h = 0; h < G; h++) {
    pv[h] = s[h];
    ov[h] = out + ((long)d * nh + g * G + h) * hd;
  }
  weighted_rows8_all(C, G, pv, n, vc, rw, nkv, g, hd, inv, ov);
#endif
}

/* out[d, h] for every decoding sequence d and query head h. q: [D, nh, hd], rows qs floats apart (a view
   of the fused qkv output needs no copy); out: [D, nh, hd]; caches: [rows, nkv, hd]; hd a multiple of 16
   and at most 256. */
void lsq_decode_attention(int D, int nh, int nkv, int hd, const float* q, long qs, const float* kc, const float* vc,
                          const int64_t* rows, long row_stride, const int32_t* len, float scale, float* out) {
  const int G = nh / nkv, C = hd / 16;
  #pragma omp parallel for schedule(static) collapse(2) if(D * nkv > 1)
  for (int d = 0; d < D; d++)
    for (int g = 0; g < nkv; g++) {
      const int64_t* rw = rows + (long)d * row_stride;
      if (G == 3 && C == 4) head_group(3, 4, d, g, nh, nkv, hd, q, qs, kc, vc, rw, len[d], scale, out);
      else if (G == 4 && C == 4) head_group(4, 4, d, g, nh, nkv, hd, q, qs, kc, vc, rw, len[d], scale, out);
      else if (G == 8 && C == 4) head_group(8, 4, d, g, nh, nkv, hd, q, qs, kc, vc, rw, len[d], scale, out);
      else if (G == 4 && C == 8) head_group(4, 8, d, g, nh, nkv, hd, q, qs, kc, vc, rw, len[d], scale, out);
      else head_group(G, C, d, g, nh, nkv, hd, q, qs, kc, vc, rw, len[d], scale, out);
    }
}
