/* bf16 matrix-vector products for CPU decode (x86-64 with AVX512-BF16).
 *
 * y[m, o] = sum_i x[m, i] * W[o, i] (+ bias[o]) for a handful of input rows m. W is the
 * plain row-major [O, I] bf16 weight of an nn.Linear. Decode is bound by reading W from
 * memory once, so each thread walks one contiguous half of W front to back (one sequential
 * stream the hardware prefetcher follows), multiplying every weight row by all M input rows
 * while the row is in L1. Products accumulate in fp32 (vdpbf16ps) and round to bf16 (RNE).
 *
 * Built on first use by kvserve/models/cpu_kernels.py with the system C compiler and loaded with
 * ctypes; OpenMP threads come from the libgomp PyTorch already loaded, so
 * torch.set_num_threads applies here too.
 */
#include <immintrin.h>
#include <omp.h>
#include <math.h>
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

/* This OpenMP thread's contiguous share [lo, hi) of n weight rows: one sequential stream each. */
static inline void thread_rows(int n, int *lo, int *hi) {
    const int nt = omp_get_num_threads(), tid = omp_get_thread_num();
    const int per = (n + nt - 1) / nt;
    *lo = tid * per < n ? tid * per : n;
    *hi = *lo + per < n ? *lo + per : n;
}

int kv_gemv_abi_version(void) { return 2; }

void kv_gemv_bf16(const uint16_t *W, const uint16_t *x, uint16_t *y, const uint16_t *bias,
                  int M, int O, int I) {
    const int nfull = I / 32, rem = I % 32;
    const __mmask32 rmask = (__mmask32)((1ull << rem) - 1);
#pragma omp parallel
    {
        int lo, hi;
        thread_rows(O, &lo, &hi);
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
}

/* The MLP's first half for a few rows: y[m, o] = silu(x_m . G_o) * (x_m . U_o), where W is
 * the fused [2 * N, I] gate/up weight (gate rows 0..N-1, up rows N..2N-1). Each thread streams
 * its share of gate rows and the matching up rows. */
void kv_gemv_silu_mul_bf16(const uint16_t *W, const uint16_t *x, uint16_t *y, int M, int N, int I) {
    const int nfull = I / 32, rem = I % 32;
    const __mmask32 rmask = (__mmask32)((1ull << rem) - 1);
#pragma omp parallel
    {
        int lo, hi;
        thread_rows(N, &lo, &hi);
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
}

/* sum <- x + residual (rounded to bf16, as the unfused add); out <- rmsnorm(sum) * w, computed
 * in fp32 and rounded once. M rows of length N, all contiguous. */
void kv_add_rmsnorm_bf16(const uint16_t *x, const uint16_t *residual, const uint16_t *w, uint16_t *out,
                         uint16_t *sum, int M, int N, float eps) {
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

/* RoPE (rotate_half layout) of T rows of H heads: out = x * cos + roll(x, D/2) * sin_signed,
 * with sin_signed = (-sin, sin) halves, each product and the sum rounded to bf16 exactly as the
 * PyTorch ops do. x rows are x_stride elements apart (heads contiguous within a row); cos and
 * sin_signed are [T, D]; out is [T, H, D] contiguous. */
void kv_rope_bf16(const uint16_t *x, int64_t x_stride, const uint16_t *cos, const uint16_t *ssin,
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
