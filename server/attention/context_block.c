/* loraserve: the body of one block of queries of context_kernel.c, compiled once per (G, C, QN) shape by
   server/attention/context_kernel.py. */
  const int hd = 16 * C, nv = G * QN;
  int len[QB];
  for (int qi = 0; qi < QN; qi++) len[qi] = L - n + i0 + qi + 1;
  const int nbm = (len[QN - 1] + 15) / 16;  /* s: [nv][nbm * 16] */
  const float* qp[G * QN];
  for (int qi = 0; qi < QN; qi++)
    for (int h = 0; h < G; h++) qp[qi * G + h] = q + (long)(i0 + qi) * qs + (long)(g * G + h) * hd;
  const i16 lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  /* Scores, 16 keys a vector: s[v][j] = scale * q_v . K_j, summed over the head width in order. */
  for (int b = 0; b < nbm; b++) {
    const float* kb = kt + (long)b * hd * 16;
    v16 acc[G * QN];
#if defined(__AVX512F__)
    for (int v = 0; v < nv; v++) acc[v] = (v16){0};
    for (int c = 0; c < hd; c++) {
      const v16 kv = load16(kb + c * 16);
      for (int v = 0; v < nv; v++) acc[v] += qp[v][c] * kv;
    }
#else
    /* AVX2: three query vectors a pass in 8-lane halves (six of 16 lanes spilled), the same sums */
    for (int v0 = 0; v0 < nv; v0 += 3) {
      const int vn = nv - v0 < 3 ? nv - v0 : 3;
      v8 lo[3] = {{0}}, hi[3] = {{0}};
      for (int c = 0; c < hd; c++) {
        const v8 kl = load8(kb + c * 16), kh = load8(kb + c * 16 + 8);
        for (int v = 0; v < vn; v++) {
          lo[v] += qp[v0 + v][c] * kl;
          hi[v] += qp[v0 + v][c] * kh;
        }
      }
      for (int v = 0; v < vn; v++) {
        memcpy(&acc[v0 + v], &lo[v], sizeof lo[v]);
        memcpy((char*)&acc[v0 + v] + sizeof lo[v], &hi[v], sizeof hi[v]);
      }
    }
#endif
    const i16 key = lane + b * 16;
    for (int qi = 0; qi < QN; qi++) {
      const i16 seen = key < len[qi];
      for (int h = 0; h < G; h++) {
        const int v = qi * G + h;
        const v16 sc = acc[v] * scale;
        store16(s + ((long)v * nbm + b) * 16, (v16)((seen & (i16)sc) | (~seen & (i16)((v16){0} - INFINITY))));
      }
    }
  }
  /* Softmax over each query's own keys; the blocks past them (its partner's) are zeros. */
  float den[G * QN];
  for (int qi = 0; qi < QN; qi++) {
    const int nb = (len[qi] + 15) / 16;
    for (int h = 0; h < G; h++) {
      float* sv = s + (long)(qi * G + h) * nbm * 16;
      v16 mv = load16(sv);  /* the masked lanes are -inf; a maximum is exact in any order */
      for (int b = 1; b < nb; b++) {
        const v16 x = load16(sv + 16 * b);
        const i16 gt = x > mv;
        mv = (v16)((gt & (i16)x) | (~gt & (i16)mv));
      }
      float m = mv[0];
      for (int t = 1; t < 16; t++) m = mv[t] > m ? mv[t] : m;
      v16 sum = {0};
      for (int b = 0; b < nb; b++) {
        const v16 e = vexp(load16(sv + 16 * b) - m);
        store16(sv + 16 * b, e);
        sum += e;
      }
      for (int b = nb; b < nbm; b++) store16(sv + 16 * b, (v16){0});
      den[qi * G + h] = hsum(sum);
    }
  }
  /* Values in key order: on AVX-512 each row read once for the block's query vectors; on AVX2 (16 registers,
     where their accumulators went through the stack) one query vector a pass, in native 8-lane vectors, the
     rows coming again from L2. Each output's sums run in the same order either way: the same bits. */
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
  for (int v = 0; v < nv; v++)
    weighted_rows8(C, s + (long)v * nbm * 16, lmax, vc, rw, nkv, g, hd, v == 0, den[v],
                   out + ((long)(i0 + v / G) * nh + g * G + v % G) * hd);
#endif
