/* loraserve: the LoRA decode and prompt kernels for one weight type (WT, W, RS_A, RS_B, W16F, DECODE_G, DOTG and
   AXPYG are defined before it, its suffix marker names the instance); server/lora/cpu_kernel.py instantiates it
   for bf16 and int8 rows. */
/* v[j] = sc * x . A[pg[j]] and y[o] += sum_j v[j] * B^T[pg[j]][o], a row at a time. Blocking four
   rows per pass (four accumulator chains, one pass over y) measured slower here: 4.6 ms a
   SmolLM2 step against 3.7 ms, the loop is bound by streaming the rows, not by FMA latency.
   Each row asks for the one PF_ROWS further on in the order they are read (A's rank rows, then B^T's, then the
   next target's A rows, asked for during an expand): an adapter's rows are short streams (1-3 KB) the hardware
   prefetcher picks up late; measured on SmolLM2 decode steps of 8 distinct rank-16 adapters, one row ahead took
   the kernel's time a step from 6.6-6.8 ms to 5.2 ms (bf16 rows), and PF_ROWS rows ahead keep more of them in
   flight (see PF_ROWS). */
/* shrink for G tokens of one slot (G <= DECODE_G, a constant where it is inlined): v[t][j] = sc * x[t] . A[pg[j]],
   each weight vector converted once for the G tokens, each token's numbers those of it alone. */
static inline __attribute__((always_inline)) void shrink_@SUF@(const float* const* x, int G, const lora_target* T,
                                                              const int32_t* pg, int r, int in, float sc,
                                                              float (*v)[MAX_RANK_C]) {
  const WT* A = (const WT*)T->a;
  const WT* BT = (const WT*)T->bt;
  for (int j = 0; j < r; j++) {
    const WT* row = A + (long)pg[j] * T->a_row;
    if (j + PF_ROWS < r) prefetch_bytes(A + (long)pg[j + PF_ROWS] * T->a_row, in * (long)sizeof(WT));
    else if (j + PF_ROWS - r < r) prefetch_bytes(BT + (long)pg[j + PF_ROWS - r] * T->bt_row, T->out * (long)sizeof(WT));
    float acc[DECODE_GROUP];
    DOTG(row, in, x, G, acc);
    for (int t = 0; t < G; t++) v[t][j] = acc[t] * sc * RS_A(T, pg[j]);
  }
}

/* y[t] += sum_j v[t][j] * B^T[pg[j]] for G tokens of one slot, a rank row at a time. */
static inline __attribute__((always_inline)) void expand_@SUF@(float (*v)[MAX_RANK_C], int G, const lora_target* T,
                                                              const int32_t* pg, int r, float* const* y) {
  const WT* BT = (const WT*)T->bt;
  const int out = (int)T->out;
  int j = 0;
#ifdef AXPYG4
  for (; j + 4 <= r; j += 4) {
    const WT* rows[4];
    float vj[4][DECODE_GROUP];
    for (int q = 0; q < 4; q++) {
      rows[q] = BT + (long)pg[j + q] * T->bt_row;
      if (j + q + PF_ROWS < r) prefetch_bytes(BT + (long)pg[j + q + PF_ROWS] * T->bt_row, out * (long)sizeof(WT));
      for (int t = 0; t < G; t++) vj[q][t] = v[t][j + q] * RS_B(T, pg[j + q]);
    }
    AXPYG4(y, vj, G, rows, out);
  }
#endif
  for (; j < r; j++) {
    const WT* row = BT + (long)pg[j] * T->bt_row;
    if (j + PF_ROWS < r) prefetch_bytes(BT + (long)pg[j + PF_ROWS] * T->bt_row, out * (long)sizeof(WT));
    float vj[DECODE_GROUP];
    for (int t = 0; t < G; t++) vj[t] = v[t][j] * RS_B(T, pg[j]);
    AXPYG(y, vj, G, row, out);
  }
}

/* One work item: G decode tokens tok[0..G) of one slot through every target; next_pg, the next item's page
   row (or NULL), is asked for while the last target expands. */
static inline __attribute__((always_inline)) void decode_item_@SUF@(
    int G, const int* tok, const int64_t* slots, const int32_t* pages, int pages_stride, int r, int in,
    const float* x, long x_stride, float* y, long y_stride, int nt, const lora_target* tg, const int32_t* next_pg) {
  const long s = slots[tok[0]];
  const int32_t* pg = pages + s * pages_stride;
  const int rs = slot_rank(pg, r);
  float v[DECODE_GROUP][MAX_RANK_C];
  const float* xs[DECODE_GROUP];
  float* ys[DECODE_GROUP];
  for (int t = 0; t < G; t++) xs[t] = x + tok[t] * x_stride;
  for (int g = 0; g < nt; g++) {
    const lora_target* T = tg + g;
    shrink_@SUF@(xs, G, T, pg, rs, in, T->scale[s], v);
    /* while this target expands, the next one's first A rows (or the next item's) come in */
    for (int k = 0; k < PF_ROWS && k < rs; k++) {
      if (g + 1 < nt) prefetch_bytes((const WT*)tg[g + 1].a + (long)pg[k] * tg[g + 1].a_row, in * (long)sizeof(WT));
      else if (next_pg) prefetch_bytes((const WT*)tg[0].a + (long)next_pg[k] * tg[0].a_row, in * (long)sizeof(WT));
    }
    for (int t = 0; t < G; t++) ys[t] = y + tok[t] * y_stride + T->y_off;
    expand_@SUF@(v, G, T, pg, rs, ys);
  }
}

/* For each of n decode tokens t with slot s = slots[t] != 0 and each target g:
   y[t, g.y_off:][:g.out] += scale_g[s] * (x[t] . A_g,s^T) . B_g,s^T over the first r ranks.
   Tokens of one slot go through together, up to DECODE_G at a time, so a popular adapter's rows are converted
   once for several of its tokens; a token's numbers are the same whichever tokens share its call. */
void loraserve_decode_@SUF@(int n, const int64_t* slots, const int32_t* pages, int pages_stride, int r, int in,
                            const float* x, long x_stride, float* y, long y_stride, int nt, const lora_target* tg) {
  const int *tok, *off;
  const int ni = decode_items(n, slots, DECODE_G, &tok, &off);
  if (ni < 0) {  /* no memory for the items: token by token */
    #pragma omp parallel for schedule(static) if(n > 1)
    for (int t = 0; t < n; t++)
      if (slots[t] != 0) decode_item_@SUF@(1, &t, slots, pages, pages_stride, r, in, x, x_stride, y, y_stride, nt, tg, 0);
    return;
  }
  #pragma omp parallel for schedule(static) if(ni > 1)
  for (int i = 0; i < ni; i++) {
    const int* it = tok + off[i];
    const int32_t* next_pg = i + 1 < ni ? pages + slots[tok[off[i + 1]]] * pages_stride : 0;
    switch (off[i + 1] - off[i]) {
#if DECODE_G == 4
      case 4: decode_item_@SUF@(4, it, slots, pages, pages_stride, r, in, x, x_stride, y, y_stride, nt, tg, next_pg); break;
      case 3: decode_item_@SUF@(3, it, slots, pages, pages_stride, r, in, x, x_stride, y, y_stride, nt, tg, next_pg); break;
      case 2: decode_item_@SUF@(2, it, slots, pages, pages_stride, r, in, x, x_stride, y, y_stride, nt, tg, next_pg); break;
#endif
      default: decode_item_@SUF@(1, it, slots, pages, pages_stride, r, in, x, x_stride, y, y_stride, nt, tg, next_pg);
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

#if HAVE_BF16_PAIRS
/* 32 weights of a rank row from p on as bf16, in order (so its 16 pairs; exact: int8 and bf16 values are bf16). */
#define ROW32_@SUF@(p) ((__m512i)_mm512_cvtne2ps_pbh(W16F((p) + 16), W16F(p)))

/* One slot's rank rows of one target laid out for the tiles (weights exact in bf16): A^T in the B-tile layout
   (row q of a k-step holds pair q of every rank of a group of 16), B^T with ranks 2p and 2p + 1 of every output
   column interleaved in row p, and each rank's scale (the slot's, times the rows' own for int8 rows). */
static void pair_layout_@SUF@(int r, int in, const lora_target* T, long s, const int32_t* pg, char* ws) {
  const WT* A = (const WT*)T->a;
  const WT* BT = (const WT*)T->bt;
  const long out = T->out;
  const int rp = (r + 15) / 16 * 16;
  const pair_ws w = pair_parts(ws, rp, in, out);
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

/* Prompt rows of one slot (m <= 32 of them, x already bf16 in xb) for one target with AVX-512 BF16's bf16 pair
   dot products (vdpbf16ps), its rank rows laid out in ws by pair_layout_* as for the tiles: the shrink in tiles of
   DP_S tokens x 16 ranks (a vector of A^T's layout holds a pair of in values of 16 ranks; a token's pair of x is
   broadcast to it), v scaled and rounded to bf16, then the expand in tiles of DP_T tokens x DP_C vectors of 16
   output columns (a vector of B^T's layout holds a pair of ranks of 16 columns; a token's pair of rank values is
   broadcast), from y and back. The numbers the tiles' are, in the order of a vector unit: each (token, rank) or
   (token, column) sum is its own lane, fed pairs in one fixed order, so a token's numbers are the same in any
   block or tile (rows past m alias row m - 1 and are never stored). */
static void dp_rows_@SUF@(int m, const uint16_t* xb, float* y, long ys, int r, int in, const lora_target* T,
                          char* ws) {
  const long out = T->out;
  const int rp = (r + 15) / 16 * 16, pairs = (r + 1) / 2, ip = in / 2;
  const pair_ws w = pair_parts(ws, rp, in, out);
  uint16_t* vb = w.vb;
  for (int t0 = 0; t0 < m; t0 += DP_S) {
    const uint32_t* xr[DP_S];
    for (int k = 0; k < DP_S; k++) xr[k] = (const uint32_t*)(xb + (long)(t0 + k < m ? t0 + k : m - 1) * in);
    for (int g = 0; g < rp / 16; g++) {
      const uint32_t* atg = w.at + (long)g * ip * 16;
      __m512 acc[DP_S];
      for (int k = 0; k < DP_S; k++) acc[k] = _mm512_setzero_ps();
      for (int q = 0; q < ip; q++) {
        const __m512bh a = (__m512bh)_mm512_load_si512(atg + (long)q * 16);
        for (int k = 0; k < DP_S; k++)
          acc[k] = _mm512_dpbf16_ps(acc[k], (__m512bh)_mm512_set1_epi32((int)xr[k][q]), a);
      }
      const __m512 fr = _mm512_load_ps(w.fr + 16 * g);
      for (int k = 0; k < DP_S && t0 + k < m; k++)
        _mm256_store_si256((__m256i*)(vb + (long)(t0 + k) * rp + 16 * g),
                           (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[k], fr)));
    }
  }
  const uint32_t* bv = w.bv;
  for (int t0 = 0; t0 < m; t0 += DP_T) {
    const uint32_t* vr[DP_T];
    float* yr[DP_T];
    for (int k = 0; k < DP_T; k++) {
      const long row = t0 + k < m ? t0 + k : m - 1;
      vr[k] = (const uint32_t*)(vb + row * rp);
      yr[k] = y + row * ys + T->y_off;
    }
    long o = 0;
    for (; o + 16 * DP_C <= out; o += 16 * DP_C) {
      __m512 c[DP_T][DP_C];
      for (int k = 0; k < DP_T; k++)
        for (int q = 0; q < DP_C; q++) c[k][q] = _mm512_loadu_ps(yr[k] + o + 16 * q);
      for (int p = 0; p < pairs; p++) {
        __m512bh b[DP_C];
        for (int q = 0; q < DP_C; q++) b[q] = (__m512bh)_mm512_load_si512(bv + (long)p * out + o + 16 * q);
        for (int k = 0; k < DP_T; k++) {
          const __m512bh v = (__m512bh)_mm512_set1_epi32((int)vr[k][p]);
          for (int q = 0; q < DP_C; q++) c[k][q] = _mm512_dpbf16_ps(c[k][q], v, b[q]);
        }
      }
      for (int k = 0; k < DP_T && t0 + k < m; k++)
        for (int q = 0; q < DP_C; q++) _mm512_storeu_ps(yr[k] + o + 16 * q, c[k][q]);
    }
    for (; o < out; o += 16) {  /* columns past the last full tile (out is a multiple of 16) */
      __m512 c[DP_T];
      for (int k = 0; k < DP_T; k++) c[k] = _mm512_loadu_ps(yr[k] + o);
      for (int p = 0; p < pairs; p++) {
        const __m512bh b = (__m512bh)_mm512_load_si512(bv + (long)p * out + o);
        for (int k = 0; k < DP_T; k++) c[k] = _mm512_dpbf16_ps(c[k], (__m512bh)_mm512_set1_epi32((int)vr[k][p]), b);
      }
      for (int k = 0; k < DP_T && t0 + k < m; k++) _mm512_storeu_ps(yr[k] + o, c[k]);
    }
  }
}
#endif

#if HAVE_AMX_BF16
/* Prompt rows of one slot (m <= 32 of them, x already bf16 in xb, 32 rows) for one target on AMX tiles, its rank
   rows laid out in ws by pair_layout_*: the shrink v = x . A^T in tiles of 16 tokens x 16 ranks over in / 32
   steps; v scaled (fr) and rounded to bf16; then y += v . B^T in tiles of 16 tokens x 16 output columns, loaded
   from y and stored back. Weights enter as bf16 exactly; x and v are rounded to bf16 (about 0.2% of a delta, a
   fifth of int8 rows' own rounding), sums are fp32. A token's row of a tile never meets another's, so its numbers
   are the same in any block. */
static void amx_rows_@SUF@(int m, const uint16_t* xb, float* y, long ys, int r, int in, const lora_target* T,
                           char* ws) {
  const long out = T->out;
  const int rp = (r + 15) / 16 * 16, two = m > 16, m0 = m < 16 ? m : 16, m1 = m - 16;
  const pair_ws w = pair_parts(ws, rp, in, out);
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
   As bf16 pairs where the CPU multiplies them (AMX tiles, else AVX-512 BF16 dot products: prompt_path) and the
   shapes fit (in a multiple of 32, every target's out of 16), the vector kernel otherwise. Returns 0, or -1 when a
   thread's workspace could not be allocated (y then partly updated). */
int loraserve_prompt_@SUF@(int nb, const int64_t* blocks, const int32_t* pages, int pages_stride, int r, int in,
                           const float* x, long x_stride, float* y, long y_stride, int nt, const lora_target* tg) {
  long out_max = 0;
  int fits = prompt_path > 0 && in % 32 == 0;
  for (int g = 0; g < nt; g++) {
    out_max = tg[g].out > out_max ? tg[g].out : out_max;
    fits = fits && tg[g].out % 16 == 0;
  }
  int64_t few[3 * 64];
  int64_t* spans = nb <= 64 ? few : (int64_t*)malloc(sizeof(int64_t) * 3 * (size_t)nb);
  if (!spans) return -1;
  const int ns = prompt_spans(nb, blocks, spans);
  int failed = 0;
#if HAVE_BF16_PAIRS
  if (fits) {
    const int rp16 = (r + 15) / 16 * 16;
    const size_t need = (size_t)(pair_ws_bytes(in, rp16, out_max) + 3) / 4;
#if HAVE_AMX_BF16
    const int tiles = prompt_path == 2;
#endif
    #pragma omp parallel
    {
#if HAVE_AMX_BF16
      if (tiles) amx_prompt_tiles();
#endif
      #pragma omp for schedule(dynamic, 1)
      for (int b = 0; b < ns; b++) {
        const long row = spans[3 * b], m = spans[3 * b + 1], s = spans[3 * b + 2];
        char* ws = (char*)grow(&ws_buf, &ws_cap, need);
        if (!ws) { failed = 1; continue; }
        uint16_t* xb = (uint16_t*)ws;
        for (long t = 0; t < m; t += 32)  /* each block's x once for all targets */
          pair_x_rows((int)(m - t < 32 ? m - t : 32), x + (row + t) * x_stride, x_stride, in, xb + t * in);
        const int32_t* pg = pages + s * pages_stride;
        const int rs = slot_rank(pg, r);
        char* w = align64(ws + PAIR_X_BYTES(in));
        for (int g = 0; g < nt; g++) {
          pair_layout_@SUF@(rs, in, tg + g, s, pg, w);
          for (long t = 0; t < m; t += 32) {
            const int mt = (int)(m - t < 32 ? m - t : 32);
#if HAVE_AMX_BF16
            if (tiles) amx_rows_@SUF@(mt, xb + t * in, y + (row + t) * y_stride, y_stride, rs, in, tg + g, w);
            else
#endif
            dp_rows_@SUF@(mt, xb + t * in, y + (row + t) * y_stride, y_stride, rs, in, tg + g, w);
          }
        }
      }
#if HAVE_AMX_BF16
      if (tiles) _tile_release();
#endif
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
