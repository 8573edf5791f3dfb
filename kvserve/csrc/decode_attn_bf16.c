/* Paged decode attention on CPU for a bf16 KV cache (x86-64 with AVX512-BF16).
 *
 * One query row per sequence. For sequence b and KV head h, the G = Hq / Hkv query heads
 * h*G .. h*G+G-1 (HF's repeat_kv grouping) attend over the sequence's keys, read in place
 * from the paged cache through its block table: no gather, no padding. Scores and the softmax
 * are fp32; the output is rounded to bf16 once. Work items (b, h) are spread over the OpenMP
 * threads of the libgomp PyTorch already loaded.
 *
 * Cache layout (kvserve/attention/base.py): K and V each [num_blocks, block_size, Hkv, D].
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

static inline uint16_t to_bf16(float s) {
    uint32_t u;
    __builtin_memcpy(&u, &s, 4);
    u += 0x7FFF + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

static inline __m512 load16_bf16(const uint16_t *p, __mmask16 m) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

int kv_decode_attn_abi_version(void) { return 2; }

/* q: [B, Hq, D] with row stride q_stride (elements) between sequences; out: [B, Hq, D]
 * contiguous. tables: [B, tab_stride] int32 block ids; lens: [B] int32 context lengths
 * (including the new token). window <= 0: no sliding window. If slots is not NULL, the
 * step's new keys and values (k_new/v_new rows, k_stride/v_stride elements apart, heads
 * contiguous) are first written to cache slots[b] (a slot < 0 is skipped); otherwise they must
 * already be in the cache. Returns 0, or -1 if a scratch allocation failed. */
int kv_decode_attn_bf16(uint16_t *kc, uint16_t *vc, const uint16_t *q, int64_t q_stride,
                        uint16_t *out, const int32_t *tables, int tab_stride, const int32_t *lens,
                        int B, int Hq, int Hkv, int D, int bs, float scale, int window,
                        const uint16_t *k_new, int64_t k_stride, const uint16_t *v_new,
                        int64_t v_stride, const int64_t *slots) {
    const int G = Hq / Hkv;
    const int nd32 = (D + 31) / 32, nd16 = (D + 15) / 16;
    int failed = 0;
    if (slots) {
        for (int b = 0; b < B; ++b) {
            if (slots[b] < 0) continue;
            __builtin_memcpy(kc + slots[b] * Hkv * D, k_new + (int64_t)b * k_stride, sizeof(uint16_t) * Hkv * D);
            __builtin_memcpy(vc + slots[b] * Hkv * D, v_new + (int64_t)b * v_stride, sizeof(uint16_t) * Hkv * D);
        }
    }
#pragma omp parallel for collapse(2) schedule(dynamic, 1)
    for (int b = 0; b < B; ++b) {
        for (int h = 0; h < Hkv; ++h) {
            const int L = lens[b];
            const int start = window > 0 && L > window ? L - window : 0;
            const int n = L - start;
            float *sc = (float *)malloc(sizeof(float) * (size_t)G * (size_t)(n > 0 ? n : 1));
            if (!sc) { failed = 1; continue; }
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
            free(sc);
        }
    }
    return failed ? -1 : 0;
}
