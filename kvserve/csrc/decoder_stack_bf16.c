/* The whole decoder stack of a Llama-family model for a CPU decode step of a few rows, in
 * one call (x86-64 with AVX512-BF16, bf16 weights and KV cache).
 *
 * Batch-1 decode reads every weight once per token; what it costs beyond that is fixed
 * per-op overhead. Called op by op from Python, a layer makes eight calls, each starting and
 * joining an OpenMP team and allocating its output. Here one parallel region runs all layers:
 * the threads split each GEMV's weight rows, one thread does the small row ops (RMSNorm,
 * RoPE, the K/V write), the attention items are shared out, and a barrier separates phases.
 * Every phase is the same code as the one-op kernels (bf16_kernels.h), so the result is bit
 * for bit that of the op-by-op path:
 *
 *   residual = embeddings(ids);  h = input_norm(residual)         (layer 0)
 *   h = input_norm(x + residual), residual = x + residual          (later layers)
 *   qkv = h W_qkv (+ b);  q, k = rope(q, k);  cache[slot] = k, v;  a = attention(q)
 *   o = a W_o (+ b);  h = post_norm(o + residual), residual = o + residual
 *   x = (silu(h W_gate) * (h W_up)) W_down
 *   and after the last layer, out = final_norm(x + residual)
 */
#include <stdlib.h>
#include <string.h>

#include "bf16_kernels.h"

/* Per-layer pointers, in this order, in the int64 table the caller builds once
 * (kvserve/models/cpu_decoder.py). A missing bias is 0. */
enum {
    P_INPUT_NORM, P_QKV_W, P_QKV_B, P_O_W, P_O_B, P_POST_NORM, P_GATE_UP_W, P_DOWN_W,
    P_K_CACHE, P_V_CACHE, P_COUNT
};

int kv_decoder_stack_abi_version(void) { return 2; }

/* bf16 elements of scratch the stack needs for M rows. */
int64_t kv_decoder_stack_scratch(int M, int H, int Hq, int Hkv, int D, int I) {
    return (int64_t)M * (3 * (int64_t)H + (Hq + 2 * Hkv) * D + (Hq + Hkv) * D + Hq * D + I);
}

/* ids: [M] int64 token ids (< vocab) whose rows of embed [vocab, H] start the residual
 * stream; final_norm: [H]; out: [M, H]. cos, ssin: [M, D] RoPE factors (see rope_rows).
 * tables: [M, tab_stride] int32 block ids; lens: [M] int32 context lengths including this
 * token; slots: [M] int64 cache slots of this token (-1 = don't write). scratch: see
 * kv_decoder_stack_scratch. H hidden size, Hq / Hkv query / KV heads, D head dim (<= 128),
 * I MLP width, bs block size, window <= 0 for none. Returns 0; -1 if an allocation failed,
 * -2 for a token id out of range (nothing computed). */
int kv_decoder_stack_bf16(const int64_t *ptrs, int L, const int64_t *ids, const uint16_t *embed, int64_t vocab,
                          const uint16_t *final_norm, uint16_t *out, const uint16_t *cos,
                          const uint16_t *ssin, const int32_t *tables, int tab_stride,
                          const int32_t *lens, const int64_t *slots, uint16_t *scratch,
                          int M, int H, int Hq, int Hkv, int D, int I, int bs, float scale,
                          int window, float eps) {
    const int G = Hq / Hkv, Oqkv = (Hq + 2 * Hkv) * D, Hqk = Hq + Hkv;
    uint16_t *res = scratch;                          /* [M, H] residual stream */
    uint16_t *h = res + (int64_t)M * H;               /* [M, H] normed input of a block */
    uint16_t *xo = h + (int64_t)M * H;                /* [M, H] output of o_proj / down_proj */
    uint16_t *qkv = xo + (int64_t)M * H;              /* [M, (Hq + 2 Hkv) D] */
    uint16_t *qk = qkv + (int64_t)M * Oqkv;           /* [M, Hq + Hkv, D] rotated q and k */
    uint16_t *att = qk + (int64_t)M * Hqk * D;        /* [M, Hq, D] */
    uint16_t *act = att + (int64_t)M * Hq * D;        /* [M, I] silu(gate) * up */

    int span = 1;  /* longest attention span: sizes each thread's score scratch */
    for (int b = 0; b < M; ++b) {
        if (ids[b] < 0 || ids[b] >= vocab) return -2;
        const int n = attn_span(lens[b], window);
        span = n > span ? n : span;
    }
    const int nthreads = omp_get_max_threads();
    float *scores = (float *)malloc(sizeof(float) * (size_t)nthreads * (size_t)G * (size_t)span);
    if (!scores) return -1;
    /* the embeddings are the first residual; layer 0's block input is their plain RMSNorm */
    for (int b = 0; b < M; ++b) memcpy(res + (int64_t)b * H, embed + ids[b] * H, sizeof(uint16_t) * (size_t)H);
    rmsnorm_rows(res, (const uint16_t *)ptrs[P_INPUT_NORM], h, M, H, eps);

#pragma omp parallel num_threads(nthreads)
    {
        float *sc = scores + (size_t)omp_get_thread_num() * G * span;
        for (int l = 0; l < L; ++l) {
            const int64_t *p = ptrs + (int64_t)l * P_COUNT;
            int lo, hi;
            if (l > 0) {
#pragma omp single
                add_rmsnorm_rows(xo, res, (const uint16_t *)p[P_INPUT_NORM], h, res, M, H, eps);
            }
            thread_rows(Oqkv, &lo, &hi);
            gemv_rows((const uint16_t *)p[P_QKV_W], h, qkv, (const uint16_t *)p[P_QKV_B], M, Oqkv, H, lo, hi);
#pragma omp barrier
#pragma omp single
            {
                rope_rows(qkv, Oqkv, cos, ssin, qk, M, Hqk, D);
                write_kv_rows((uint16_t *)p[P_K_CACHE], (uint16_t *)p[P_V_CACHE], qk + Hq * D, (int64_t)Hqk * D,
                              qkv + Hqk * D, Oqkv, slots, M, Hkv, D);
            }
#pragma omp for collapse(2) schedule(dynamic, 1)
            for (int b = 0; b < M; ++b)
                for (int kh = 0; kh < Hkv; ++kh)
                    attn_item((const uint16_t *)p[P_K_CACHE], (const uint16_t *)p[P_V_CACHE], qk, (int64_t)Hqk * D,
                              att, tables, tab_stride, lens, b, kh, Hq, Hkv, D, bs, scale, window, sc);
            thread_rows(H, &lo, &hi);
            gemv_rows((const uint16_t *)p[P_O_W], att, xo, (const uint16_t *)p[P_O_B], M, H, Hq * D, lo, hi);
#pragma omp barrier
#pragma omp single
            add_rmsnorm_rows(xo, res, (const uint16_t *)p[P_POST_NORM], h, res, M, H, eps);
            thread_rows(I, &lo, &hi);
            gemv_silu_mul_rows((const uint16_t *)p[P_GATE_UP_W], h, act, M, I, H, lo, hi);
#pragma omp barrier
            thread_rows(H, &lo, &hi);
            gemv_rows((const uint16_t *)p[P_DOWN_W], act, xo, NULL, M, H, I, lo, hi);
#pragma omp barrier
        }
#pragma omp single
        add_rmsnorm_rows(xo, res, final_norm, out, res, M, H, eps);
    }
    free(scores);
    return 0;
}
