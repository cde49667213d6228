/* loraserve: the body of one block of queries of context_kernel.c, compiled once per (G, C, QN) shape by
   server/attention/context_kernel.py. */
  const int hd = 16 * C, nv = G * QN;
  int len[QB];
  for (int qi = 0; qi < QN; qi++) len[qi] = L - n + i0 + qi + 1;
  const int nbm = (len[QN - 1] + 15) / 16;  /* s: [nv][nbm * 16] */
  const float* qp[G * QN];
  for (int qi = 0; qi < QN; qi++)
    for (int h = 0; h < G; h++) qp[qi * G + h] = q + (long)(i0 + qi) * qs + (long)(g * G + h) * hd;
  /* Scores, 16 keys a vector: s[v][j] = scale * q_v . K_j, summed over the head width in order. */
  for (int b = 0; b < nbm; b++) {
    const float* kb = kt + (long)b * hd * 16;
#if defined(__AVX512F__)
    const i16 lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
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
#else
    /* AVX2: three query vectors a pass in 8-lane halves, the same sums */
    int v0 = 0;
    for (; v0 + 3 <= nv; v0 += 3) scores8(3, G, hd, v0, qp, kb, b, len, scale, s, nbm);
    if (nv - v0 == 2) scores8(2, G, hd, v0, qp, kb, b, len, scale, s, nbm);
    else if (nv - v0 == 1) scores8(1, G, hd, v0, qp, kb, b, len, scale, s, nbm);
#endif
  }
  /* Softmax over each query's own keys; the blocks past them (its partner's) are zeros. */
  float den[G * QN];
  for (int v = 0; v < nv; v++) {
    const int nb = (len[v / G] + 15) / 16;
    float* sv = s + (long)v * nbm * 16;  /* the masked lanes are -inf */
    den[v] = exp_sum(sv, nb, row_max(sv, nb));
    memset(sv + 16 * nb, 0, sizeof(float) * 16 * (nbm - nb));
  }
  /* Values in key order: on AVX-512 each row read once for the block's query vectors; on AVX2 (16 registers)
     three query vectors and a third of a row a pass (weighted_rows8). Each output's sums run in the same order
     either way: the same bits. */
  const int lmax = len[QN - 1];
#if defined(__AVX512F__)
  v16 acc[G * QN][C];
  for (int v = 0; v < nv; v++)
    for (int c = 0; c < C; c++) acc[v][c] = (v16){0};
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
#else
  const float* pv[G * QN];
  float* ov[G * QN];
  for (int v = 0; v < nv; v++) {
    pv[v] = s + (long)v * nbm * 16;
    ov[v] = out + ((long)(i0 + v / G) * nh + g * G + v % G) * hd;
  }
  weighted_rows8_all(C, nv, pv, lmax, vc, rw, nkv, g, hd, den, ov);
#endif
