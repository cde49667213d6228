/* loraserve: a step's whole layer stack in one call, calling the other libraries' kernels
   (server/model/fused_decode.py): decode rows first, then any prompt rows. */
#include <stdint.h>
#include <string.h>

typedef void (*linear_fn)(int m, int k, int kp, int b, const float* x, long xs, uint8_t* q, float* s, int n,
                          const int8_t* wp, const int32_t* wsum, const float* ws, float* y, long ys);
typedef void (*norm_fn)(int t, long n, const float* x, long xs, const float* r, long rs, float* h, long hs,
                        const float* w, float eps, float* y, long ys, int W);
typedef void (*rope_fn)(int t, int nr, int hd, float* x, long rs, const float* cos, const float* sin);
typedef void (*silu_fn)(int t, long n, const float* g, long gs, const float* u, long us, float* y, long ys, int V);
typedef void (*attn_fn)(int D, int nh, int nkv, int hd, const float* q, long qs, const float* kc, const float* vc,
                        const int64_t* rows, long row_stride, const int32_t* len, float scale, float* out);
typedef void (*lora_fn)(int n, const int64_t* slots, const int32_t* pages, int pages_stride, int r, int in,
                        const float* x, long x_stride, float* y, long y_stride, int nt, const void* tg);
typedef int (*lora_prompt_fn)(int nb, const int64_t* blocks, const int32_t* pages, int pages_stride, int r, int in,
                              const float* x, long x_stride, float* y, long y_stride, int nt, const void* tg);
typedef int (*ctx_attn_fn)(int S, const int32_t* nq, const int32_t* nctx, const int64_t* q0, const int64_t* r0,
                           int nh, int nkv, int hd, const float* q, long qs, const float* kc, const float* vc,
                           const int64_t* rows, float scale, float* out);
/* One call of the prompt attention kernel (server/attention/context_kernel.py's ContextCall). */
typedef struct { int count; const int32_t* nq; const int32_t* nctx; const int64_t* q0; const int64_t* r0;
                 const int64_t* rows; } ctx_call_t;

typedef struct { int k, kp, b, n; const int8_t* wp; const int32_t* wsum; const float* ws; } linear_t;
typedef struct { const float* in_norm; const float* post_norm; linear_t lin[4]; float* kc; float* vc; } layer_t;
typedef struct { const int32_t* pages; int pages_stride; int in; int nt; const void* targets; } lora_plan_t;

typedef struct {
  linear_fn linear; norm_fn norm; rope_fn rope; silu_fn silu; attn_fn attn; ctx_attn_fn ctx_attn;
  int layers, hidden, nh, nkv, hd, inter, norm_lanes, silu_vector;
  float eps, attn_scale;
  const layer_t* layer; const float* final_norm;
  long cache_rows;                        /* rows of each layer's K and V caches (kc, vc) */
} model_t;

typedef struct {
  int m;                                  /* rows: d decode tokens (one a sequence), then prompt tokens */
  float* h;                               /* [m, hidden]: the embeddings in, the residual stream after */
  const float* cos; const float* sin;     /* [m, hd] at each token's position */
  const int64_t* new_rows;                /* [m] cache row of each token's K/V */
  const int64_t* ctx_rows; long ctx_stride; const int32_t* ctx_len;  /* each sequence's context rows */
  uint8_t* q8; float* qs8;                /* the int8 kernel's scratch: m * max kp bytes, m scales */
  float *x, *qkv, *att, *o, *gu, *a, *dn; /* work rows (dn: the down projection's) */
  float* out;                             /* [m, hidden]: the final norm */
  lora_fn lora_call; const lora_plan_t* lora; const int64_t* slots; int rank;  /* lora NULL: no adapter */
  int d;                                  /* decode rows, the first d; new_rows/ctx_* are theirs */
  int ncalls; const ctx_call_t* calls;    /* the prompt rows' attention */
  lora_prompt_fn lora_prompt; const int64_t* blocks; int nb;  /* the prompt rows' LoRA (nb blocks) */
} step_t;

static void linear(const model_t* M, const linear_t* L, int m, const float* x, long xs, const step_t* S,
                   float* y, long ys) {
  M->linear(m, L->k, L->kp, L->b, x, xs, S->q8, S->qs8, L->n, L->wp, L->wsum, L->ws, y, ys);
}

/* The LoRA kernel's calls for decode rows, then for prompt rows, as the CPU backend makes them; -1 when the
   prompt kernel had no memory for its workspace. */
static int lora(const step_t* S, const lora_plan_t* P, const float* x, long xs, float* y, long ys) {
  if (!P) return 0;
  if (S->d) S->lora_call(S->d, S->slots, P->pages, P->pages_stride, S->rank, P->in, x, xs, y, ys, P->nt, P->targets);
  return S->nb ? S->lora_prompt(S->nb, S->blocks, P->pages, P->pages_stride, S->rank, P->in, x, xs, y, ys, P->nt,
                                P->targets) : 0;
}

/* The layered path's calls (server/model/llama.py DecoderLayer.forward), layer after layer. Returns 0, -1
   when a kernel had no memory for its workspace, or -2 (before anything is written) when a token's cache row
   lies outside the caches, as torch's index_copy_ on the layered path would refuse it. */
int lsq_decode_layers(const model_t* M, const step_t* S) {
  const int m = S->m, H = M->hidden, I = M->inter, qs = M->nh * M->hd, kvs = M->nkv * M->hd;
  const long wq = qs + 2 * kvs, wgu = 2L * I;
  const float* delta = 0;
  for (int i = 0; i < m; i++)
    if (S->new_rows[i] < 0 || S->new_rows[i] >= M->cache_rows) return -2;
  for (int l = 0; l < M->layers; l++) {
    const layer_t* L = M->layer + l;
    const lora_plan_t* P = S->lora ? S->lora + 4 * l : 0;
    M->norm(m, H, S->h, H, delta, H, S->h, H, L->in_norm, M->eps, S->x, H, M->norm_lanes);
    linear(M, &L->lin[0], m, S->x, H, S, S->qkv, wq);
    if (lora(S, P ? P + 0 : 0, S->x, H, S->qkv, wq)) return -1;
    M->rope(m, M->nh + M->nkv, M->hd, S->qkv, wq, S->cos, S->sin);
    for (int i = 0; i < m; i++) {
      memcpy(L->kc + S->new_rows[i] * kvs, S->qkv + i * wq + qs, sizeof(float) * kvs);
      memcpy(L->vc + S->new_rows[i] * kvs, S->qkv + i * wq + qs + kvs, sizeof(float) * kvs);
    }
    if (S->d) M->attn(S->d, M->nh, M->nkv, M->hd, S->qkv, wq, L->kc, L->vc, S->ctx_rows, S->ctx_stride, S->ctx_len,
                      M->attn_scale, S->att);
    for (int c = 0; c < S->ncalls; c++) {
      const ctx_call_t* C = S->calls + c;
      if (M->ctx_attn(C->count, C->nq, C->nctx, C->q0, C->r0, M->nh, M->nkv, M->hd, S->qkv, wq, L->kc, L->vc,
                      C->rows, M->attn_scale, S->att)) return -1;
    }
    linear(M, &L->lin[1], m, S->att, qs, S, S->o, H);
    if (lora(S, P ? P + 1 : 0, S->att, qs, S->o, H)) return -1;
    M->norm(m, H, S->h, H, S->o, H, S->h, H, L->post_norm, M->eps, S->x, H, M->norm_lanes);
    linear(M, &L->lin[2], m, S->x, H, S, S->gu, wgu);
    if (lora(S, P ? P + 2 : 0, S->x, H, S->gu, wgu)) return -1;
    M->silu(m, I, S->gu, wgu, S->gu + I, wgu, S->a, I, M->silu_vector);
    linear(M, &L->lin[3], m, S->a, I, S, S->dn, H);
    if (lora(S, P ? P + 3 : 0, S->a, I, S->dn, H)) return -1;
    delta = S->dn;
  }
  M->norm(m, H, S->h, H, delta, H, S->h, H, M->final_norm, M->eps, S->out, H, M->norm_lanes);
  return 0;
}
