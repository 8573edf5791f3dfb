/* Building blocks of the CPU decode kernels (x86-64 with AVX512-BF16), shared by the
 * one-op entry points (gemv_bf16.c, decode_attn_bf16.c) and the fused decoder stack
 * (decoder_stack_bf16.c). Every piece computes exactly the same way wherever it is called
 * from, so the fused stack is bit-identical to the chain of one-op calls.
 *
 * The GEMV pieces work on a range [lo, hi) of weight rows: each OpenMP thread takes one
 * contiguous share (`thread_rows`) and walks it front to back, one sequential stream the
 * hardware prefetcher follows. An output row depends only on its weight row, never on how
 * the rows were split between threads.
 */
#ifndef KVSERVE_BF16_KERNELS_H
#define KVSERVE_BF16_KERNELS_H

#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>

static inline uint16_t to_bf16(float s) {
    uint32_t u;
    __builtin_memcpy(&u, &s, 4);
    u += 0x7FFF + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

static inline float from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    __builtin_memcpy(&f, &u, 4);
    return f;
}

static inline __m512 load16_bf16(const uint16_t *p, __mmask16 m) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

/* This OpenMP thread's contiguous share [lo, hi) of n weight rows: one sequential stream each. */
static inline void thread_rows(int n, int *lo, int *hi) {
    const int nt = omp_get_num_threads(), tid = omp_get_thread_num();
    const int per = (n + nt - 1) / nt;
    *lo = tid * per < n ? tid * per : n;
    *hi = *lo + per < n ? *lo + per : n;
}

/* y[m, o] = x_m . W_o (+ bias[o]) for weight rows o in [lo, hi); W is [O, I] row-major. */
static inline void gemv_rows(const uint16_t *W, const uint16_t *x, uint16_t *y, const uint16_t *bias,
                             int M, int O, int I, int lo, int hi) {
    const int nfull = I / 32, rem = I % 32;
    const __mmask32 rmask = (__mmask32)((1ull << rem) - 1);
    for (int o = lo; o < hi; ++o) {
        const uint16_t *w = W + (int64_t)o * I;
        for (int m = 0; m < M; ++m) {
            const uint16_t *xm = x + (int64_t)m * I;
            __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
            int b = 0;
            for (; b + 1 < nfull; b += 2) {  /* two accumulators hide the FMA latency */
                a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(w + b * 32),
                                      (__m512bh)_mm512_loadu_si512(xm + b * 32));
                a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(w + b * 32 + 32),
                                      (__m512bh)_mm512_loadu_si512(xm + b * 32 + 32));
            }
            if (b < nfull)
                a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(w + b * 32),
                                      (__m512bh)_mm512_loadu_si512(xm + b * 32));
            if (rem)
                a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_maskz_loadu_epi16(rmask, w + nfull * 32),
                                      (__m512bh)_mm512_maskz_loadu_epi16(rmask, xm + nfull * 32));
            float s = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
            if (bias) s += from_bf16(bias[o]);
            y[(int64_t)m * O + o] = to_bf16(s);
        }
    }
}

/* The MLP's first half for gate rows o in [lo, hi): y[m, o] = silu(x_m . G_o) * (x_m . U_o),
 * where W is the fused [2 * N, I] gate/up weight (gate rows 0..N-1, up rows N..2N-1). */
static inline void gemv_silu_mul_rows(const uint16_t *W, const uint16_t *x, uint16_t *y,
                                      int M, int N, int I, int lo, int hi) {
    const int nfull = I / 32, rem = I % 32;
    const __mmask32 rmask = (__mmask32)((1ull << rem) - 1);
    for (int o = lo; o < hi; ++o) {
        const uint16_t *wg = W + (int64_t)o * I, *wu = W + (int64_t)(o + N) * I;
        for (int m = 0; m < M; ++m) {
            const uint16_t *xm = x + (int64_t)m * I;
            __m512 ag = _mm512_setzero_ps(), au = _mm512_setzero_ps();
            for (int b = 0; b < nfull; ++b) {
                __m512bh xv = (__m512bh)_mm512_loadu_si512(xm + b * 32);
                ag = _mm512_dpbf16_ps(ag, (__m512bh)_mm512_loadu_si512(wg + b * 32), xv);
                au = _mm512_dpbf16_ps(au, (__m512bh)_mm512_loadu_si512(wu + b * 32), xv);
            }
            if (rem) {
                __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(rmask, xm + nfull * 32);
                ag = _mm512_dpbf16_ps(ag, (__m512bh)_mm512_maskz_loadu_epi16(rmask, wg + nfull * 32), xv);
                au = _mm512_dpbf16_ps(au, (__m512bh)_mm512_maskz_loadu_epi16(rmask, wu + nfull * 32), xv);
            }
            /* round gate and up to bf16 first, as the unfused linear + silu * mul does */
            float g = from_bf16(to_bf16(_mm512_reduce_add_ps(ag)));
            float u = from_bf16(to_bf16(_mm512_reduce_add_ps(au)));
            y[(int64_t)m * N + o] = to_bf16(g / (1.f + expf(-g)) * u);
        }
    }
}

/* sum <- x + residual (rounded to bf16, as the unfused add); out <- rmsnorm(sum) * w, computed
 * in fp32 and rounded once. M rows of length N, all contiguous. `sum` may be `residual`
 * (each element is read before it is overwritten). */
static inline void add_rmsnorm_rows(const uint16_t *x, const uint16_t *residual, const uint16_t *w,
                                    uint16_t *out, uint16_t *sum, int M, int N, float eps) {
    for (int m = 0; m < M; ++m) {
        const uint16_t *xm = x + (int64_t)m * N, *res = residual + (int64_t)m * N;
        uint16_t *rm = sum + (int64_t)m * N;
        uint16_t *om = out + (int64_t)m * N;
        float ss = 0.f;
        for (int i = 0; i < N; ++i) {
            uint16_t r = to_bf16(from_bf16(xm[i]) + from_bf16(res[i]));
            rm[i] = r;
            float f = from_bf16(r);
            ss += f * f;
        }
        const float inv = 1.f / sqrtf(ss / (float)N + eps);
        for (int i = 0; i < N; ++i) om[i] = to_bf16(from_bf16(rm[i]) * inv * from_bf16(w[i]));
    }
}

/* out <- rmsnorm(x) * w for M contiguous rows of length N: F.rms_norm's formula (fp32, rounded
 * once), with the sum of squares taken in order as add_rmsnorm_rows does. */
static inline void rmsnorm_rows(const uint16_t *x, const uint16_t *w, uint16_t *out, int M, int N, float eps) {
    for (int m = 0; m < M; ++m) {
        const uint16_t *xm = x + (int64_t)m * N;
        uint16_t *om = out + (int64_t)m * N;
        float ss = 0.f;
        for (int i = 0; i < N; ++i) {
            float f = from_bf16(xm[i]);
            ss += f * f;
        }
        const float inv = 1.f / sqrtf(ss / (float)N + eps);
        for (int i = 0; i < N; ++i) om[i] = to_bf16(from_bf16(xm[i]) * inv * from_bf16(w[i]));
    }
}

/* RoPE (rotate_half layout) of T rows of H heads: out = x * cos + roll(x, D/2) * sin_signed,
 * with sin_signed = (-sin, sin) halves, each product and the sum rounded to bf16 exactly as the
 * PyTorch ops do. x rows are x_stride elements apart (heads contiguous within a row); cos and
 * sin_signed are [T, D]; out is [T, H, D] contiguous. */
static inline void rope_rows(const uint16_t *x, int64_t x_stride, const uint16_t *cos, const uint16_t *ssin,
                             uint16_t *out, int T, int H, int D) {
    const int half = D / 2;
    for (int t = 0; t < T; ++t) {
        const uint16_t *c = cos + (int64_t)t * D, *s = ssin + (int64_t)t * D;
        for (int h = 0; h < H; ++h) {
            const uint16_t *xh = x + (int64_t)t * x_stride + (int64_t)h * D;
            uint16_t *oh = out + ((int64_t)t * H + h) * D;
            for (int i = 0; i < D; ++i) {
                const float a = from_bf16(to_bf16(from_bf16(xh[i]) * from_bf16(c[i])));
                const float r = from_bf16(to_bf16(from_bf16(xh[(i + half) % D]) * from_bf16(s[i])));
                oh[i] = to_bf16(a + r);
            }
        }
    }
}

/* Write B decode rows' new keys and values (k/v rows k_stride/v_stride elements apart, heads
 * contiguous) to cache slots[b]; a slot < 0 is skipped. */
static inline void write_kv_rows(uint16_t *kc, uint16_t *vc, const uint16_t *k, int64_t k_stride,
                                 const uint16_t *v, int64_t v_stride, const int64_t *slots,
                                 int B, int Hkv, int D) {
    for (int b = 0; b < B; ++b) {
        if (slots[b] < 0) continue;
        __builtin_memcpy(kc + slots[b] * Hkv * D, k + (int64_t)b * k_stride, sizeof(uint16_t) * Hkv * D);
        __builtin_memcpy(vc + slots[b] * Hkv * D, v + (int64_t)b * v_stride, sizeof(uint16_t) * Hkv * D);
    }
}

/* How many keys a decode with context length L attends to (the last `window`; window <= 0:
 * all). */
static inline int attn_span(int L, int window) {
    return window > 0 && L > window ? window : L;
}

/* Decode attention of sequence b over KV head h: its G = Hq / Hkv query heads h*G .. h*G+G-1
 * (HF's repeat_kv grouping) attend over the sequence's keys, read in place from the paged
 * cache (K and V each [num_blocks, bs, Hkv, D]) through its block table. Scores and the
 * softmax are fp32; the output is rounded to bf16 once. q: [B, Hq, D] with q_stride elements
 * between sequences; out: [B, Hq, D] contiguous; sc: scratch for G * attn_span(L) floats.
 * D <= 128. */
static inline void attn_item(const uint16_t *kc, const uint16_t *vc, const uint16_t *q, int64_t q_stride,
                             uint16_t *out, const int32_t *tables, int tab_stride, const int32_t *lens,
                             int b, int h, int Hq, int Hkv, int D, int bs, float scale, int window, float *sc) {
    const int G = Hq / Hkv;
    const int nd32 = (D + 31) / 32, nd16 = (D + 15) / 16;
    const int L = lens[b];
    const int n = attn_span(L, window), start = L - n;
    const int32_t *tab = tables + (int64_t)b * tab_stride;
    const uint16_t *qh = q + (int64_t)b * q_stride + (int64_t)h * G * D;
    /* scores[g][t] = q_g . k_t * scale */
    for (int t = start; t < L; ++t) {
        const uint16_t *kt = kc + (((int64_t)tab[t / bs] * bs + t % bs) * Hkv + h) * D;
        for (int g = 0; g < G; ++g) {
            const uint16_t *qg = qh + (int64_t)g * D;
            __m512 acc = _mm512_setzero_ps();
            for (int c = 0; c < nd32; ++c) {
                int left = D - c * 32;
                __mmask32 m = left >= 32 ? (__mmask32)0xFFFFFFFFu : (__mmask32)((1u << left) - 1);
                acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_maskz_loadu_epi16(m, kt + c * 32),
                                       (__m512bh)_mm512_maskz_loadu_epi16(m, qg + c * 32));
            }
            sc[(int64_t)g * n + (t - start)] = _mm512_reduce_add_ps(acc) * scale;
        }
    }
    for (int g = 0; g < G; ++g) {
        float *s = sc + (int64_t)g * n;
        float mx = -INFINITY, sum = 0.f;
        for (int i = 0; i < n; ++i) mx = s[i] > mx ? s[i] : mx;
        for (int i = 0; i < n; ++i) { s[i] = expf(s[i] - mx); sum += s[i]; }
        const float inv = n > 0 ? 1.f / sum : 0.f;
        __m512 acc[8];  /* D <= 128 */
        for (int c = 0; c < nd16; ++c) acc[c] = _mm512_setzero_ps();
        for (int t = start; t < L; ++t) {
            const uint16_t *vt = vc + (((int64_t)tab[t / bs] * bs + t % bs) * Hkv + h) * D;
            const __m512 p = _mm512_set1_ps(s[t - start]);
            for (int c = 0; c < nd16; ++c) {
                int left = D - c * 16;
                __mmask16 m = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
                acc[c] = _mm512_fmadd_ps(p, load16_bf16(vt + c * 16, m), acc[c]);
            }
        }
        uint16_t *o = out + ((int64_t)b * Hq + (int64_t)h * G + g) * D;
        for (int c = 0; c < nd16; ++c) {
            float tmp[16];
            _mm512_storeu_ps(tmp, _mm512_mul_ps(acc[c], _mm512_set1_ps(inv)));
            for (int j = 0; j < 16 && c * 16 + j < D; ++j) o[c * 16 + j] = to_bf16(tmp[j]);
        }
    }
}

#endif
