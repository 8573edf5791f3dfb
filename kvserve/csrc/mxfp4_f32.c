/* MXFP4 weights (GGML type 39 layout: per 32 weights one E8M0 scale byte, then 16 bytes whose
 * low nibbles are weights 0..15 and high nibbles 16..31, E2M1 codes) multiplied on the CPU
 * without materializing the dense matrix: gpt-oss's experts (kvserve/kernels/mxfp4.py).
 *
 * kv_mxfp4_linear_f32: out[m, n] = sum_k x[m, k] W[n, k] (+ bias[n]) for up to KV_MXFP4_MAX_ROWS
 * rows of x; threads split the weight rows, each decoded once (table lookups times the block's
 * power of two, exact) and multiplied by every input row while in L1.
 * kv_mxfp4_dequant_f32: the dense fp32 matrix (larger row counts: then one sgemm).
 * Portable C; 16 independent partial sums per row let the compiler vectorize without
 * reassociating (the result does not depend on the thread count). */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define KV_MXFP4_MAX_ROWS 8

static const float E2M1[16] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f,
                               -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

int kv_mxfp4_abi_version(void) { return 1; }
int kv_mxfp4_max_rows(void) { return KV_MXFP4_MAX_ROWS; }

static inline void decode_block(const uint8_t *b, float *v) {
    const float s = ldexpf(1.0f, (int)b[0] - 127);
    for (int j = 0; j < 16; j++) {
        v[j] = E2M1[b[1 + j] & 15] * s;
        v[j + 16] = E2M1[b[1 + j] >> 4] * s;
    }
}

int kv_mxfp4_linear_f32(const uint8_t *w, int64_t n_rows, int64_t k, const float *x, int64_t m,
                        const float *bias, float *out) {
    if (m < 1 || m > KV_MXFP4_MAX_ROWS || k % 32) return -1;
    const int64_t g_count = k / 32, row_bytes = g_count * 17;
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < n_rows; n++) {
        const uint8_t *row = w + n * row_bytes;
        float acc[KV_MXFP4_MAX_ROWS][16];
        float v[32];
        memset(acc, 0, sizeof(acc));
        for (int64_t g = 0; g < g_count; g++) {
            decode_block(row + g * 17, v);
            for (int64_t r = 0; r < m; r++) {
                const float *xr = x + r * k + g * 32;
                for (int j = 0; j < 16; j++) acc[r][j] += v[j] * xr[j] + v[j + 16] * xr[j + 16];
            }
        }
        for (int64_t r = 0; r < m; r++) {
            float s = 0.0f;
            for (int j = 0; j < 16; j++) s += acc[r][j];
            out[r * n_rows + n] = s + (bias ? bias[n] : 0.0f);
        }
    }
    return 0;
}

int kv_mxfp4_dequant_f32(const uint8_t *w, int64_t n_rows, int64_t k, float *out) {
    if (k % 32) return -1;
    const int64_t g_count = k / 32, row_bytes = g_count * 17;
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < n_rows; n++)
        for (int64_t g = 0; g < g_count; g++) decode_block(w + n * row_bytes + g * 17, out + n * k + g * 32);
    return 0;
}
