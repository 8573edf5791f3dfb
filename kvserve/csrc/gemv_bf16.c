/* bf16 matrix-vector products and the small per-row ops of CPU decode (x86-64 with
 * AVX512-BF16), one op per call.
 *
 * y[m, o] = sum_i x[m, i] * W[o, i] (+ bias[o]) for a handful of input rows m. W is the
 * plain row-major [O, I] bf16 weight of an nn.Linear. Decode is bound by reading W from
 * memory once, so each thread walks one contiguous half of W front to back (one sequential
 * stream the hardware prefetcher follows), multiplying every weight row by all M input rows
 * while the row is in L1. Products accumulate in fp32 (vdpbf16ps) and round to bf16 (RNE).
 * The arithmetic lives in bf16_kernels.h, shared with the fused decoder stack.
 *
 * Built on first use by kvserve/models/cpu_kernels.py with the system C compiler and loaded with
 * ctypes; OpenMP threads come from the libgomp PyTorch already loaded, so
 * torch.set_num_threads applies here too.
 */
#include "bf16_kernels.h"

int kv_gemv_abi_version(void) { return 5; }

void kv_gemv_bf16(const uint16_t *W, const uint16_t *x, uint16_t *y, const uint16_t *bias,
                  int M, int O, int I) {
#pragma omp parallel
    {
        int lo, hi;
        thread_rows(O, &lo, &hi);
        gemv_rows(W, x, y, bias, M, O, I, lo, hi);
    }
}

/* The MLP's first half for a few rows: y[m, o] = silu(x_m . G_o) * (x_m . U_o), where W is
 * the fused [2 * N, I] gate/up weight. Each thread streams its share of gate rows and the
 * matching up rows. */
void kv_gemv_silu_mul_bf16(const uint16_t *W, const uint16_t *x, uint16_t *y, int M, int N, int I) {
#pragma omp parallel
    {
        int lo, hi;
        thread_rows(N, &lo, &hi);
        gemv_silu_mul_rows(W, x, y, M, N, I, lo, hi);
    }
}

void kv_rmsnorm_bf16(const uint16_t *x, const uint16_t *w, uint16_t *out, int M, int N, float eps) {
    rmsnorm_rows(x, w, out, M, N, eps);
}

void kv_add_rmsnorm_bf16(const uint16_t *x, const uint16_t *residual, const uint16_t *w, uint16_t *out,
                         uint16_t *sum, int M, int N, float eps) {
    add_rmsnorm_rows(x, residual, w, out, sum, M, N, eps);
}

/* RoPE factors of T positions for head dim D (rotate_half layout): cos[t] = cos(a), ssin[t] =
 * (-sin(a[:D/2]), sin(a[D/2:])) with a[i] = pos_t * inv_freq[i % (D/2)] (the fp32 product, as
 * PyTorch forms it), rounded to bf16; cos and ssin are [T, D]. */
void kv_rope_factors_bf16(const int64_t *pos, const float *inv_freq, uint16_t *cos_out, uint16_t *ssin_out,
                          int T, int D) {
    const int half = D / 2;
    for (int t = 0; t < T; ++t) {
        const float p = (float)pos[t];
        for (int i = 0; i < half; ++i) {
            const float a = p * inv_freq[i], c = cosf(a), s = sinf(a);
            cos_out[(int64_t)t * D + i] = cos_out[(int64_t)t * D + half + i] = to_bf16(c);
            ssin_out[(int64_t)t * D + i] = to_bf16(-s);
            ssin_out[(int64_t)t * D + half + i] = to_bf16(s);
        }
    }
}

void kv_rope_bf16(const uint16_t *x, int64_t x_stride, const uint16_t *cos, const uint16_t *ssin,
                  uint16_t *out, int T, int H, int D) {
    rope_rows(x, x_stride, cos, ssin, out, T, H, D);
}
