/* GGML block formats (Q8_0, Q4_0, Q4_1, Q5_0, Q4_K, Q5_K, Q6_K): geometry, dequantization, embedding
 * row lookup, weight quantization (Q8_0/Q4_0/Q4_1) and the unpacking of blocks into the
 * canonical tile that the dot kernels in kvq_gemm.c consume.
 *
 * Dequantization follows the gguf package's arithmetic operation for operation (fp16 scales
 * widened exactly, one rounding per multiply or add, no fused multiply-add: the library is
 * built with -ffp-contract=off), so its output equals gguf.quants.dequantize bit for bit and a
 * model dequantized here matches one dequantized at load time. Quantization uses GGML's
 * reference rounding for the same reason.
 *
 * Block layouts (bytes, little-endian fp16):
 *   Q8_0  34: d, int8 q[32]                      y = d*q
 *   Q4_0  18: d, q[16] (low nibbles: values 0-15, high: 16-31)   y = d*(q-8)
 *   Q4_1  20: d, m, q[16] (same nibble order)     y = d*q + m
 *   Q5_0  22: d, qh[4] (bit j of the LE uint32 is the 5th bit of value j), q[16] (Q4_0's nibble
 *             order)   y = d*(q-16)
 *   Q4_K 144: d, dmin, scales[12] (8 x 6-bit scale and min), q[128]: per 64 values, 32 bytes,
 *             low nibbles are the first 32, high nibbles the next 32   y = d*sc*q - dmin*mn
 *   Q5_K 176: d, dmin, scales[12], qh[32] (bit j of qh[l] is the 5th bit of value 32j+l), q[128]
 *   Q6_K 210: ql[128], qh[64], int8 scales[16] (one per 16 values), d   y = d*sc*(q-32)
 */
#include <math.h>
#include <stdlib.h>

#include "kvq_internal.h"

#if defined(__SSE2__) && !defined(KVQ_SCALAR)
#include <emmintrin.h>
#elif defined(__aarch64__) && defined(__ARM_NEON) && !defined(KVQ_SCALAR)
#include <arm_neon.h>
#endif

static const kvq_format FORMATS[] = {
    {KVQ_Q4_0, 32, 18, 0, 1},   {KVQ_Q4_1, 32, 20, 0, 1},   {KVQ_Q5_0, 32, 22, 0, 1},   {KVQ_Q8_0, 32, 34, 1, 0},
    {KVQ_Q4_K, 256, 144, 0, 1}, {KVQ_Q5_K, 256, 176, 0, 1}, {KVQ_Q6_K, 256, 210, 0, 1},
};

const kvq_format *kvq_format_of(int qtype) {
    for (unsigned i = 0; i < sizeof(FORMATS) / sizeof(FORMATS[0]); i++)
        if (FORMATS[i].qtype == qtype) return &FORMATS[i];
    return NULL;
}

int kvq_abi_version(void) { return KVQ_ABI_VERSION; }

int64_t kvq_row_bytes(int qtype, int64_t K) {
    const kvq_format *f = kvq_format_of(qtype);
    if (f == NULL || K <= 0 || K % f->block_size != 0) return -1;
    return K / f->block_size * f->block_bytes;
}

/* 6-bit scale and min j of a Q4_K/Q5_K scales[12] field. */
static inline void kvq_scale_min(const uint8_t *s, int j, int *sc, int *mn) {
    if (j < 4) {
        *sc = s[j] & 63;
        *mn = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4);
        *mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

/* One block -> block_size floats. */
static void dequant_block(int qtype, const uint8_t *b, float *y) {
    switch (qtype) {
    case KVQ_Q8_0: {
        float d = kvq_h2f(kvq_rd16(b));
        for (int i = 0; i < 32; i++) y[i] = (float)(int8_t)b[2 + i] * d;
        break;
    }
    case KVQ_Q4_0: {
        float d = kvq_h2f(kvq_rd16(b));
        for (int i = 0; i < 16; i++) {
            y[i] = d * (float)((b[2 + i] & 0x0f) - 8);
            y[i + 16] = d * (float)((b[2 + i] >> 4) - 8);
        }
        break;
    }
    case KVQ_Q5_0: {
        float d = kvq_h2f(kvq_rd16(b));
        uint32_t qh = (uint32_t)b[2] | ((uint32_t)b[3] << 8) | ((uint32_t)b[4] << 16) | ((uint32_t)b[5] << 24);
        for (int i = 0; i < 16; i++) {
            y[i] = d * (float)((int)((b[6 + i] & 0x0f) | (((qh >> i) & 1) << 4)) - 16);
            y[i + 16] = d * (float)((int)((b[6 + i] >> 4) | (((qh >> (i + 16)) & 1) << 4)) - 16);
        }
        break;
    }
    case KVQ_Q4_1: {
        float d = kvq_h2f(kvq_rd16(b)), m = kvq_h2f(kvq_rd16(b + 2));
        for (int i = 0; i < 16; i++) {
            y[i] = d * (float)(b[4 + i] & 0x0f) + m;
            y[i + 16] = d * (float)(b[4 + i] >> 4) + m;
        }
        break;
    }
    case KVQ_Q4_K:
    case KVQ_Q5_K: {
        float d = kvq_h2f(kvq_rd16(b)), dmin = kvq_h2f(kvq_rd16(b + 2));
        const uint8_t *sc = b + 4, *qh = b + 16, *qs = qtype == KVQ_Q4_K ? b + 16 : b + 48;
        for (int j = 0; j < 8; j++) {
            int s, mn;
            kvq_scale_min(sc, j, &s, &mn);
            float dd = d * (float)s, dm = dmin * (float)mn;
            const uint8_t *q = qs + 32 * (j / 2);
            int shift = 4 * (j & 1);
            for (int l = 0; l < 32; l++) {
                int v = (q[l] >> shift) & 0x0f;
                if (qtype == KVQ_Q5_K) v |= ((qh[l] >> j) & 1) << 4;
                y[32 * j + l] = dd * (float)v - dm;
            }
        }
        break;
    }
    case KVQ_Q6_K: {
        const uint8_t *ql = b, *qh = b + 128;
        const int8_t *sc = (const int8_t *)(b + 192);
        float d = kvq_h2f(kvq_rd16(b + 208));
        for (int h = 0; h < 2; h++) {
            for (int k = 0; k < 4; k++) { /* values 128h + 32k + l */
                const uint8_t *lo = ql + 64 * h + 32 * (k & 1);
                int lshift = 4 * (k >> 1);
                for (int l = 0; l < 32; l++) {
                    int v = ((lo[l] >> lshift) & 0x0f) | (((qh[32 * h + l] >> (2 * k)) & 3) << 4);
                    int idx = 128 * h + 32 * k + l;
                    y[idx] = (d * (float)sc[idx / 16]) * (float)(v - 32);
                }
            }
        }
        break;
    }
    default:
        break;
    }
}

static void dequant_row(const kvq_format *f, const uint8_t *row, float *y, int64_t K) {
    for (int64_t b = 0; b < K / f->block_size; b++)
        dequant_block(f->qtype, row + b * f->block_bytes, y + b * f->block_size);
}

void kvq_dequantize(int qtype, const void *w, int64_t w_row_bytes, float *out, int64_t rows, int64_t K) {
    const kvq_format *f = kvq_format_of(qtype);
    if (f == NULL || K % f->block_size != 0) return;
#pragma omp parallel for schedule(static) if (rows * K >= 65536)
    for (int64_t r = 0; r < rows; r++)
        dequant_row(f, (const uint8_t *)w + r * w_row_bytes, out + r * K, K);
}

int kvq_get_rows(int qtype, const void *w, int64_t w_row_bytes, int64_t num_rows, const int64_t *ids, int64_t n,
                 int64_t K, float *out) {
    const kvq_format *f = kvq_format_of(qtype);
    if (f == NULL || K % f->block_size != 0) return -1;
    for (int64_t i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= num_rows) return -1;
        dequant_row(f, (const uint8_t *)w + ids[i] * w_row_bytes, out + i * K, K);
    }
    return 0;
}

/* GGML's reference quantizers (round half away from zero for Q8_0; truncation of x/d + 8.5 for
 * Q4_0 and of (x-min)/d + 0.5 for Q4_1), in fp32 like the gguf package. */
static void quantize_block(int qtype, const float *x, uint8_t *b) {
    if (qtype == KVQ_Q8_0) {
        float amax = 0.0f;
        for (int i = 0; i < 32; i++) amax = fmaxf(amax, fabsf(x[i]));
        float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        uint16_t h = kvq_f2h(d);
        b[0] = (uint8_t)h, b[1] = (uint8_t)(h >> 8);
        for (int i = 0; i < 32; i++) b[2 + i] = (uint8_t)(int8_t)roundf(x[i] * id);
    } else if (qtype == KVQ_Q4_0) {
        float amax = fabsf(x[0]), max = x[0]; /* the first value of largest magnitude, like argmax */
        for (int i = 1; i < 32; i++)
            if (fabsf(x[i]) > amax) amax = fabsf(x[i]), max = x[i];
        float d = max / -8.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        uint16_t h = kvq_f2h(d);
        b[0] = (uint8_t)h, b[1] = (uint8_t)(h >> 8);
        for (int i = 0; i < 16; i++) {
            int lo = (int)(x[i] * id + 8.5f), hi = (int)(x[i + 16] * id + 8.5f);
            lo = lo > 15 ? 15 : lo, hi = hi > 15 ? 15 : hi;
            b[2 + i] = (uint8_t)(lo | (hi << 4));
        }
    } else { /* Q4_1 */
        float min = x[0], max = x[0];
        for (int i = 1; i < 32; i++) min = fminf(min, x[i]), max = fmaxf(max, x[i]);
        float d = (max - min) / 15.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        uint16_t h = kvq_f2h(d), hm = kvq_f2h(min);
        b[0] = (uint8_t)h, b[1] = (uint8_t)(h >> 8), b[2] = (uint8_t)hm, b[3] = (uint8_t)(hm >> 8);
        for (int i = 0; i < 16; i++) {
            int lo = (int)((x[i] - min) * id + 0.5f), hi = (int)((x[i + 16] - min) * id + 0.5f);
            lo = lo > 15 ? 15 : lo, hi = hi > 15 ? 15 : hi;
            b[4 + i] = (uint8_t)(lo | (hi << 4));
        }
    }
}

int kvq_quantize_weights(int qtype, const float *x, void *w, int64_t N, int64_t K) {
    if (qtype != KVQ_Q8_0 && qtype != KVQ_Q4_0 && qtype != KVQ_Q4_1) return -1;
    const kvq_format *f = kvq_format_of(qtype);
    if (K % 32 != 0) return -1;
    int64_t nb = N * (K / 32);
#pragma omp parallel for schedule(static) if (nb >= 4096)
    for (int64_t i = 0; i < nb; i++) quantize_block(qtype, x + i * 32, (uint8_t *)w + i * f->block_bytes);
    return 0;
}

/* ---- canonical tiles (see kvq_internal.h) ---- */

static inline void put_scales(float *restrict sc, float *restrict off, float s0, float s1, float o0, float o1) {
    for (int i = 0; i < 4; i++) sc[i] = s0, sc[4 + i] = s1;
    off[0] = o0, off[1] = o1;
}

/* 16 bytes of nibbles -> 32 codes (low nibbles first), the Q4_0/Q4_1 order. */
static inline void unpack_nibbles16(const uint8_t *restrict src, int8_t *restrict q) {
#if defined(__SSE2__) && !defined(KVQ_SCALAR)
    const __m128i m4 = _mm_set1_epi8(0x0f);
    __m128i v = _mm_loadu_si128((const __m128i *)src);
    _mm_storeu_si128((__m128i *)q, _mm_and_si128(v, m4));
    _mm_storeu_si128((__m128i *)(q + 16), _mm_and_si128(_mm_srli_epi16(v, 4), m4));
#elif defined(__aarch64__) && defined(__ARM_NEON) && !defined(KVQ_SCALAR)
    uint8x16_t v = vld1q_u8(src);
    vst1q_s8(q, vreinterpretq_s8_u8(vandq_u8(v, vdupq_n_u8(0x0f))));
    vst1q_s8(q + 16, vreinterpretq_s8_u8(vshrq_n_u8(v, 4)));
#else
    for (int l = 0; l < 16; l++) q[l] = (int8_t)(src[l] & 0x0f), q[16 + l] = (int8_t)(src[l] >> 4);
#endif
}

static void unpack_q4(int qtype, const uint8_t *restrict b, int64_t nblk, int8_t *restrict q, float *restrict sc,
                      float *restrict off) {
    const int hdr = qtype == KVQ_Q4_0 ? 2 : 4;
    for (int64_t i = 0; i < nblk; i++, b += hdr + 16, q += 32, sc += 8, off += 2) {
        float d = kvq_h2f(kvq_rd16(b));
        float m = qtype == KVQ_Q4_0 ? -8.0f * d : kvq_h2f(kvq_rd16(b + 2));
        unpack_nibbles16(b + hdr, q);
        put_scales(sc, off, d, d, m, m);
    }
}

/* Byte j of Q5_HI[v] is 0x10 where bit j of v is set: one qh byte -> the 5th bits of 8 codes
 * (OR-ed into 8 codes read as one little-endian uint64: x86-64 and AArch64). */
static uint64_t Q5_HI[256];

#if defined(__GNUC__)
__attribute__((constructor))
#endif
static void q5_hi_init(void) {
    for (int v = 0; v < 256; v++) {
        uint64_t m = 0;
        for (int j = 0; j < 8; j++)
            if (v >> j & 1) m |= (uint64_t)0x10 << (8 * j);
        Q5_HI[v] = m;
    }
}

/* Q5_0: Q4_0's nibbles plus a 5th bit per value from qh; codes in [0, 32), offset -16 d. */
static void unpack_q5_0(const uint8_t *restrict b, int64_t nblk, int8_t *restrict q, float *restrict sc,
                        float *restrict off) {
#if !defined(__GNUC__)
    if (Q5_HI[1] == 0) q5_hi_init();
#endif
    for (int64_t i = 0; i < nblk; i++, b += 22, q += 32, sc += 8, off += 2) {
        float d = kvq_h2f(kvq_rd16(b));
        unpack_nibbles16(b + 6, q);
        for (int j = 0; j < 4; j++) { /* codes 8j .. 8j+7 take the bits of qh byte j */
            uint64_t v;
            memcpy(&v, q + 8 * j, 8);
            v |= Q5_HI[b[2 + j]];
            memcpy(q + 8 * j, &v, 8);
        }
        put_scales(sc, off, d, d, -16.0f * d, -16.0f * d);
    }
}

static void unpack_q45k(int is5, const uint8_t *restrict b, int64_t nblk, int8_t *restrict q, float *restrict sc,
                        float *restrict off) {
    for (int64_t i = 0; i < nblk; i++, b += is5 ? 176 : 144) {
        float d = kvq_h2f(kvq_rd16(b)), dmin = kvq_h2f(kvq_rd16(b + 2));
        const uint8_t *qh = b + 16, *qs = is5 ? b + 48 : b + 16;
        for (int j = 0; j < 8; j++, q += 32, sc += 8, off += 2) {
            int s, mn;
            kvq_scale_min(b + 4, j, &s, &mn);
            const uint8_t *src = qs + 32 * (j / 2);
            const int shift = 4 * (j & 1);
            if (is5)
                for (int l = 0; l < 32; l++) q[l] = (int8_t)(((src[l] >> shift) & 0x0f) | (((qh[l] >> j) & 1) << 4));
            else
                for (int l = 0; l < 32; l++) q[l] = (int8_t)((src[l] >> shift) & 0x0f);
            float dd = d * (float)s, dm = -(dmin * (float)mn);
            put_scales(sc, off, dd, dd, dm, dm);
        }
    }
}

static void unpack_q6k(const uint8_t *restrict b, int64_t nblk, int8_t *restrict q, float *restrict sc,
                       float *restrict off) {
    for (int64_t i = 0; i < nblk; i++, b += 210) {
        const uint8_t *ql = b, *qh = b + 128;
        const int8_t *s = (const int8_t *)(b + 192);
        float d = kvq_h2f(kvq_rd16(b + 208));
        for (int h = 0; h < 2; h++)
            for (int k = 0; k < 4; k++, q += 32, sc += 8, off += 2) {
                const uint8_t *lo = ql + 64 * h + 32 * (k & 1), *hi = qh + 32 * h;
                const int lshift = 4 * (k >> 1), hshift = 2 * k;
                for (int l = 0; l < 32; l++) q[l] = (int8_t)(((lo[l] >> lshift) & 0x0f) | (((hi[l] >> hshift) & 3) << 4));
                int j = 8 * h + 2 * k; /* index of the 16-value scale of this 32's first half */
                float s0 = d * (float)s[j], s1 = d * (float)s[j + 1];
                put_scales(sc, off, s0, s1, -32.0f * s0, -32.0f * s1);
            }
    }
}

void kvq_unpack(const kvq_format *f, const uint8_t *row, int64_t k0, int64_t kc, int8_t *q, float *sc, float *off) {
    const uint8_t *b = row + k0 / f->block_size * f->block_bytes;
    int64_t nblk = kc / f->block_size;
    switch (f->qtype) {
    case KVQ_Q8_0:
        for (int64_t i = 0; i < nblk; i++, b += 34, q += 32, sc += 8, off += 2) {
            float d = kvq_h2f(kvq_rd16(b));
            memcpy(q, b + 2, 32);
            put_scales(sc, off, d, d, 0.0f, 0.0f);
        }
        break;
    case KVQ_Q4_0:
    case KVQ_Q4_1:
        unpack_q4(f->qtype, b, nblk, q, sc, off);
        break;
    case KVQ_Q5_0:
        unpack_q5_0(b, nblk, q, sc, off);
        break;
    case KVQ_Q4_K:
    case KVQ_Q5_K:
        unpack_q45k(f->qtype == KVQ_Q5_K, b, nblk, q, sc, off);
        break;
    case KVQ_Q6_K:
        unpack_q6k(b, nblk, q, sc, off);
        break;
    default:
        break;
    }
}
