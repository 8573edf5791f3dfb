/* Integer dot products of GGML block weights with 8-bit quantized activations: activation
 * quantization, the per-instruction-set tile dot kernels and the GEMM drivers of kvq.h.
 *
 * Why this shape: decode reads every weight once per token, so the GEMM must stream the weight
 * at memory bandwidth. Each call walks its rows [n0, n1) front to back in tiles of 4 rows and
 * chunks of 2048 values; a tile chunk is unpacked once into the canonical form (int8 codes plus
 * float lane scales and offsets, kvq_internal.h), which stays in L1 while every activation row
 * is multiplied by it. So the weight is read from memory once per call whatever M is, and only
 * the (small) quantized activations are re-read, from cache. One dot kernel per instruction set:
 *   AVX-512 (+VNNI)  two 32-value blocks per 512-bit register, vpdpbusd or vpmaddubsw+vpmaddwd
 *   AVX2             vpmaddubsw (u8 x s8 -> s16 pairs) + vpmaddwd, as llama.cpp does
 *   NEON (+dotprod)  sdot on 16-value halves, else smull + sadalp
 *   plain C          the reference, and the build forced by KVSERVE_CPU_ISA=baseline
 * On AVX2 (and the AVX-512 build) few activation rows skip the tile: "direct kernels" dot the
 * block bytes as they are (Q4_0, Q4_1, Q5_0 and Q8_0 four activation rows at a time up to a
 * per-format bound, below; Q4_K, Q5_K, Q6_K up to 48 rows and Q8_0 from 5 to 48, further below).
 * The AVX-512 VNNI build has its own direct kernels for Q4_0, Q4_1 and Q5_0 (gemm_zdirect, up
 * to 48 rows, and above that in chunks of at most 48: prefill stays on them) and for Q8_0 from 2 rows (gemm_zq8rows): vpdpbusd on 512-bit registers, 8 activation
 * rows per unpacked weight step, for verify and batched steps' extra rows.
 * Codes are in [0, 64) for every format but Q8_0 (the offsets carry Q4_0's -8 and Q6_K's -32),
 * so u8 x s8 products need the sign trick (|w| times x with w's sign) only for Q8_0.
 * Each output value's arithmetic depends only on its weight row and activation row, never on
 * the tile or thread a row landed in (the contract of kvq.h).
 */
#include <math.h>
#include <stdlib.h>

#include "kvq_internal.h"

#if defined(_OPENMP)
#include <omp.h>
#endif
/* KVQ_SCALAR (the baseline build) keeps to plain C even where the compiler targets SIMD. */
#if !defined(KVQ_SCALAR) && defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define KVQ_AVX2 1
#if defined(__AVX512F__) && defined(__AVX512BW__)
#define KVQ_AVX512 1
#endif
#if defined(KVQ_AVX512) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define KVQ_VNNI512 1
#endif
#endif
#if !defined(KVQ_SCALAR) && defined(__aarch64__) && defined(__ARM_NEON)
#include <arm_neon.h>
#define KVQ_NEON 1
#endif

const char *kvq_isa(void) {
#if defined(KVQ_VNNI512)
    return "avx512vnni"; /* the gemm_zdirect / gemm_zq8rows kernels (cpu_quant.dequant_min_rows reads this) */
#elif defined(KVQ_AVX512)
    return "avx512";
#elif defined(KVQ_AVX2)
    return "avx2";
#elif defined(KVQ_NEON) && defined(__ARM_FEATURE_DOTPROD)
    return "neon-dotprod";
#elif defined(KVQ_NEON)
    return "neon";
#else
    return "scalar";
#endif
}

int64_t kvq_act_bytes(int qtype, int64_t M, int64_t K) {
    const kvq_format *f = kvq_format_of(qtype);
    if (f == NULL || M < 0 || K <= 0 || K % f->block_size != 0) return -1;
    return M * kvq_act_stride(K);
}

/* ---- activation quantization: per 32 values d = max|x| / 127, q = round(x / d) ---- */

static void quantize_act_row(const float *x, uint8_t *row, int64_t K) {
    int64_t nb = K / KVQ_QK;
    int8_t *q = (int8_t *)row;
    float *d = (float *)(row + K), *s = d + nb;
#if defined(KVQ_AVX2)
    /* The plain loop below in AVX2 (gcc keeps it scalar: fmaxf and nearbyintf), the same values:
     * the max is exact in any order, x * id the same product, cvtps rounds to nearest even as
     * nearbyintf does (default rounding mode), and the code sums are exact integers. Every layer
     * quantizes each activation row of a step on every thread, ~2 ns a value in the plain loop:
     * a fifth of what an extra verify row cost in the decoder stack. */
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int64_t b = 0; b < nb; b++) {
        const float *xb = x + b * KVQ_QK;
        __m256 v[4];
        for (int i = 0; i < 4; i++) v[i] = _mm256_loadu_ps(xb + 8 * i);
        __m256 m = _mm256_setzero_ps(); /* max(|x|, m) keeps m where |x| is NaN, as fmaxf does */
        for (int i = 0; i < 4; i++) m = _mm256_max_ps(_mm256_andnot_ps(sign, v[i]), m);
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        const float amax = _mm_cvtss_f32(m4);
        const float db = amax / 127.0f, id = db != 0.0f ? 1.0f / db : 0.0f;
        const __m256 idv = _mm256_set1_ps(id);
        __m256i c[4];
        for (int i = 0; i < 4; i++) c[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], idv));
        /* int32 -> int8 in order: packs interleave 128-bit lanes, the permute restores them */
        const __m256i p16a = _mm256_packs_epi32(c[0], c[1]), p16b = _mm256_packs_epi32(c[2], c[3]);
        const __m256i p8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(p16a, p16b),
                                                       _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)(q + b * KVQ_QK), p8);
        const __m256i h0 = _mm256_add_epi32(c[0], c[1]), h1 = _mm256_add_epi32(c[2], c[3]);
        /* lane sums of h0 (values 0-15) and h1 (16-31) */
        const __m256i t = _mm256_hadd_epi32(h0, h1); /* [h0 pairs | h1 pairs] per 128-bit lane */
        const __m128i u = _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
        const __m128i w = _mm_hadd_epi32(u, u); /* [s0, s1, s0, s1] */
        d[b] = db, s[2 * b] = db * (float)_mm_cvtsi128_si32(w), s[2 * b + 1] = db * (float)_mm_extract_epi32(w, 1);
    }
    return;
#endif
    for (int64_t b = 0; b < nb; b++) {
        const float *xb = x + b * KVQ_QK;
        float amax = 0.0f;
        for (int i = 0; i < KVQ_QK; i++) amax = fmaxf(amax, fabsf(xb[i]));
        float db = amax / 127.0f, id = db != 0.0f ? 1.0f / db : 0.0f;
        int s0 = 0, s1 = 0;
        for (int i = 0; i < KVQ_QK; i++) {
            int v = (int)nearbyintf(xb[i] * id);
            q[b * KVQ_QK + i] = (int8_t)v;
            if (i < 16)
                s0 += v;
            else
                s1 += v;
        }
        d[b] = db, s[2 * b] = db * (float)s0, s[2 * b + 1] = db * (float)s1;
    }
}

void kvq_quantize_act_range(int qtype, const float *x, int64_t x_stride, void *xq, int64_t M, int64_t K, int64_t m0,
                            int64_t m1) {
    (void)M;
    if (kvq_act_bytes(qtype, 1, K) < 0) return;
    int64_t stride = kvq_act_stride(K);
    for (int64_t m = m0; m < m1; m++) quantize_act_row(x + m * x_stride, (uint8_t *)xq + m * stride, K);
}

void kvq_quantize_act(int qtype, const float *x, int64_t x_stride, void *xq, int64_t M, int64_t K) {
    if (kvq_act_bytes(qtype, 1, K) < 0) return;
    int64_t stride = kvq_act_stride(K);
#pragma omp parallel for schedule(static) if (M * K >= 65536)
    for (int64_t m = 0; m < M; m++) quantize_act_row(x + m * x_stride, (uint8_t *)xq + m * stride, K);
}

/* ---- tile dot kernels ---- */

#define TQ_STRIDE KVQ_CHUNK
#define TSC_STRIDE (KVQ_CHUNK / KVQ_QK * 8)
#define TOFF_STRIDE (KVQ_CHUNK / KVQ_QK * 2)

typedef struct {
    const int8_t *q;
    const float *sc, *off;
} tile_t;

#if defined(KVQ_AVX2)
static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Integer dot of one 32-value block, as 8 int32 lane sums (lanes 0-3: values 0-15). */
static inline __attribute__((always_inline)) __m256i dot32_avx2(int sgn, __m256i w, __m256i x) {
    __m256i p = sgn ? _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w)) : _mm256_maddubs_epi16(w, x);
    return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
}
#endif

#if defined(KVQ_AVX512)
static inline __attribute__((always_inline)) __m512i dot64_avx512(int sgn, __m512i w, __m512i x) {
    if (sgn) {
        __mmask64 neg = _mm512_movepi8_mask(w);
        x = _mm512_mask_sub_epi8(x, neg, _mm512_setzero_si512(), x);
        w = _mm512_abs_epi8(w);
    }
#if defined(__AVX512VNNI__)
    return _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, x);
#else
    return _mm512_madd_epi16(_mm512_maddubs_epi16(w, x), _mm512_set1_epi16(1));
#endif
}
#endif

/* res[r] = sum over the chunk of (weight tile row r) * (activation row), for r < nr. */
static inline __attribute__((always_inline)) void tile_dot_impl(int sgn, int has_off, int nr, tile_t t,
                                                                const int8_t *xq, const float *xd,
                                                                const float *xs, int64_t nb, float *res) {
    int64_t b = 0;
#if defined(KVQ_AVX2)
    __m256 acc[KVQ_TILE_ROWS];
    for (int r = 0; r < nr; r++) acc[r] = _mm256_setzero_ps();
#if defined(KVQ_AVX512)
    __m512 acc5[KVQ_TILE_ROWS];
    for (int r = 0; r < nr; r++) acc5[r] = _mm512_setzero_ps();
    for (; b + 2 <= nb; b += 2) {
        __m512i xv = _mm512_loadu_si512((const void *)(xq + 32 * b));
        __m512 dx = _mm512_castpd_ps(_mm512_insertf64x4(
            _mm512_castps_pd(_mm512_castps256_ps512(_mm256_broadcast_ss(xd + b))),
            _mm256_castps_pd(_mm256_broadcast_ss(xd + b + 1)), 1));
        for (int r = 0; r < nr; r++) {
            __m512i p = dot64_avx512(sgn, _mm512_loadu_si512((const void *)(t.q + r * TQ_STRIDE + 32 * b)), xv);
            __m512 s = _mm512_mul_ps(_mm512_loadu_ps(t.sc + r * TSC_STRIDE + 8 * b), dx);
            acc5[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), s, acc5[r]);
        }
    }
#endif
    for (; b < nb; b++) {
        __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + 32 * b));
        __m256 dx = _mm256_broadcast_ss(xd + b);
        for (int r = 0; r < nr; r++) {
            __m256i p = dot32_avx2(sgn, _mm256_loadu_si256((const __m256i *)(t.q + r * TQ_STRIDE + 32 * b)), xv);
            __m256 s = _mm256_mul_ps(_mm256_loadu_ps(t.sc + r * TSC_STRIDE + 8 * b), dx);
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), s, acc[r]);
        }
    }
    for (int r = 0; r < nr; r++) {
        float v = hsum256(acc[r]);
#if defined(KVQ_AVX512)
        v += _mm512_reduce_add_ps(acc5[r]);
#endif
        if (has_off) {
            const float *o = t.off + r * TOFF_STRIDE;
            __m256 a = _mm256_setzero_ps();
            int64_t i = 0;
            for (; i + 8 <= 2 * nb; i += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(o + i), _mm256_loadu_ps(xs + i), a);
            float tail = 0.0f;
            for (; i < 2 * nb; i++) tail += o[i] * xs[i];
            v += hsum256(a) + tail;
        }
        res[r] = v;
    }
#elif defined(KVQ_NEON)
    float32x4_t acc[KVQ_TILE_ROWS];
    for (int r = 0; r < nr; r++) acc[r] = vdupq_n_f32(0.0f);
    for (; b < nb; b++) {
        int8x16_t xlo = vld1q_s8(xq + 32 * b), xhi = vld1q_s8(xq + 32 * b + 16);
        float dx = xd[b];
        for (int r = 0; r < nr; r++) {
            const int8_t *w = t.q + r * TQ_STRIDE + 32 * b;
            int8x16_t wlo = vld1q_s8(w), whi = vld1q_s8(w + 16);
#if defined(__ARM_FEATURE_DOTPROD)
            int32x4_t i0 = vdotq_s32(vdupq_n_s32(0), wlo, xlo), i1 = vdotq_s32(vdupq_n_s32(0), whi, xhi);
#else
            int32x4_t i0 = vpadalq_s16(vpaddlq_s16(vmull_s8(vget_low_s8(wlo), vget_low_s8(xlo))), vmull_high_s8(wlo, xlo));
            int32x4_t i1 = vpadalq_s16(vpaddlq_s16(vmull_s8(vget_low_s8(whi), vget_low_s8(xhi))), vmull_high_s8(whi, xhi));
#endif
            const float *sc = t.sc + r * TSC_STRIDE + 8 * b;
            acc[r] = vfmaq_f32(acc[r], vcvtq_f32_s32(i0), vmulq_n_f32(vld1q_f32(sc), dx));
            acc[r] = vfmaq_f32(acc[r], vcvtq_f32_s32(i1), vmulq_n_f32(vld1q_f32(sc + 4), dx));
        }
    }
    for (int r = 0; r < nr; r++) {
        float v = vaddvq_f32(acc[r]);
        if (has_off) {
            const float *o = t.off + r * TOFF_STRIDE;
            float32x4_t a = vdupq_n_f32(0.0f);
            int64_t i = 0;
            for (; i + 4 <= 2 * nb; i += 4) a = vfmaq_f32(a, vld1q_f32(o + i), vld1q_f32(xs + i));
            float tail = 0.0f;
            for (; i < 2 * nb; i++) tail += o[i] * xs[i];
            v += vaddvq_f32(a) + tail;
        }
        res[r] = v;
    }
#else
    (void)sgn;
    for (int r = 0; r < nr; r++) {
        const int8_t *w = t.q + r * TQ_STRIDE;
        const float *sc = t.sc + r * TSC_STRIDE;
        float v = 0.0f;
        for (b = 0; b < nb; b++) {
            int32_t s0 = 0, s1 = 0;
            for (int i = 0; i < 16; i++) s0 += (int32_t)w[32 * b + i] * xq[32 * b + i];
            for (int i = 16; i < 32; i++) s1 += (int32_t)w[32 * b + i] * xq[32 * b + i];
            v += xd[b] * (sc[8 * b] * (float)s0 + sc[8 * b + 4] * (float)s1);
        }
        if (has_off) {
            const float *o = t.off + r * TOFF_STRIDE;
            for (int64_t i = 0; i < 2 * nb; i++) v += o[i] * xs[i];
        }
        res[r] = v;
    }
#endif
}

/* Specialisations: the full 4-row tile (unrolled, accumulators in registers) and any tail. */
static void tile_dot(const kvq_format *f, int nr, tile_t t, const int8_t *xq, const float *xd, const float *xs,
                     int64_t nb, float *res) {
    if (f->is_signed) {
        if (nr == KVQ_TILE_ROWS)
            tile_dot_impl(1, 0, KVQ_TILE_ROWS, t, xq, xd, xs, nb, res);
        else
            tile_dot_impl(1, 0, nr, t, xq, xd, xs, nb, res);
    } else {
        if (nr == KVQ_TILE_ROWS)
            tile_dot_impl(0, 1, KVQ_TILE_ROWS, t, xq, xd, xs, nb, res);
        else
            tile_dot_impl(0, 1, nr, t, xq, xd, xs, nb, res);
    }
}

/* ---- direct kernels for few activation rows (decode) ----
 *
 * With M <= 4 the tile path spends more time unpacking a tile than the tile saves, and decode
 * must stream the weight at memory bandwidth. So for few rows Q4_0, Q4_1, Q5_0 and Q8_0 are dotted
 * straight from their block bytes, 8 blocks (256 values) of a weight row per step, with as few
 * instructions per block as possible (the one-block-at-a-time form was compute-bound at about
 * half the streaming-read rate):
 *   - The activation row is first rearranged once per call (direct_prep) into what the step
 *     loads: its codes (for Q4, two blocks' low halves, then their high halves, per 32 bytes),
 *     its scales d_x in the lane order of the step's block sums, and the offset-term sums
 *     (s0 + s1 per block, times -8 for Q4_0), zero-padded to whole steps.
 *   - Q4: the 16 nibble bytes of two blocks load as one register; vpmaddubsw of the low and the
 *     high nibbles, one 16-bit add, then 3 vphaddw and one vpmaddwd reduce 8 blocks to 8 int32
 *     block sums (exact: at most 16 * 15 * 127 per 16-bit lane). Q5_0 as Q4_0 with each
 *     nibble's 5th bit from qh (two bytes of qh spread over 16 code bytes by a shuffle, a bit
 *     mask and a compare) and offset -16 d; its codes up to 31 would overflow the 16-bit vphaddw
 *     tree, so each pair's sums widen at once (vpmaddwd) and 3 vphaddd reduce them, in the same
 *     lane order. Q8_0 (signed codes): the sign
 *     trick, vpmaddubsw + vpmaddwd per block, then a vphaddd tree to the 8 block sums.
 *   - The 8 blocks' fp16 headers come in with one gather and one F16C convert (d, and for Q4_1
 *     m), the combined scale is one multiply d_w * d_x for 8 blocks, one convert and one FMA
 *     accumulate the 8 block sums, and Q4_1's m (Q4_0's -8 d) times the stored activation block
 *     sums is one more FMA.
 * NR weight rows share each activation load and MR activation rows share each unpacked weight
 * step. Each (weight row, activation row) pair has its own accumulators and the same operation
 * sequence whatever NR and MR are, so an output value never depends on how rows were grouped or
 * split between threads. */

#if defined(KVQ_AVX2)
#define DIRECT_MAX_M 4
#define DIRECT_G 8       /* blocks per step */
#ifndef DIRECT_PF
#define DIRECT_PF 2048 /* at least this many bytes ahead prefetched (0: none) */
#endif
#define DIRECT_STACK 32768
#ifndef DIRECT_NR1_Q8
#define DIRECT_NR1_Q8 4
#endif
#define DIRECT_NR1(qt) ((qt) == KVQ_Q8_0 ? DIRECT_NR1_Q8 : 4) /* weight rows per group for M = 1 */
/* Q8_0 at M = 1 over a share of at least this many weight bytes (far beyond the caches) goes
 * one row at a time: one sequential stream. Gemma 3's tied head (262144 x 640, 178 MB) took
 * 10.8 ms instead of 18.8 on one AVX2 core (EPYC), 4096 x 4096 0.88 instead of 1.01 ms; shares
 * that stay in the caches (1 MB: 0.084 vs 0.075 ms) keep the row groups. Same values either way
 * (each row has its own accumulators). */
#ifndef DIRECT_STREAM_BYTES
#define DIRECT_STREAM_BYTES (4 << 20)
#endif

/* Position of block i of a step in the lane order of its block sums: Q4's vphaddw tree yields
 * blocks 0, 2, 4, 6, 1, 3, 5, 7; Q8_0's is in order. */
static inline int direct_pos(int qtype, int i) { return qtype == KVQ_Q8_0 ? i : (i & 1) * 4 + (i >> 1); }

/* The block in lane l (the inverse of direct_pos). */
static inline int direct_blk(int qtype, int l) { return qtype == KVQ_Q8_0 ? l : (l & 3) * 2 + (l >> 2); }

typedef struct {
    const uint8_t *q; /* 256 code bytes per step */
    const float *dx;  /* 8 scales per step */
    const float *sx;  /* 8 offset-term sums per step */
} dact_t;

static inline int64_t direct_act_bytes(int64_t nb) { return (nb + DIRECT_G - 1) / DIRECT_G * (256 + 64); }

static void direct_prep(int qtype, const uint8_t *row, int64_t K, uint8_t *buf, dact_t *da) {
    const int64_t nb = K / KVQ_QK, ns = (nb + DIRECT_G - 1) / DIRECT_G;
    const int8_t *q = (const int8_t *)row;
    const float *d = (const float *)(row + K), *s = d + nb;
    uint8_t *xq = buf;
    float *dx = (float *)(buf + ns * 256), *sx = dx + ns * DIRECT_G;
    memset(buf, 0, (size_t)direct_act_bytes(nb));
    for (int64_t b = 0; b < nb; b++) {
        int64_t o = b / DIRECT_G;
        int i = (int)(b % DIRECT_G), pos = direct_pos(qtype, i);
        dx[o * DIRECT_G + pos] = d[b];
        float sb = s[2 * b] + s[2 * b + 1];
        sx[o * DIRECT_G + pos] = qtype == KVQ_Q4_0 ? -8.0f * sb : qtype == KVQ_Q5_0 ? -16.0f * sb : sb;
        uint8_t *dst = xq + o * 256;
        if (qtype == KVQ_Q8_0) {
            memcpy(dst + 32 * i, q + 32 * b, 32);
        } else { /* pair j = i / 2: [lo halves of blocks 2j, 2j+1][hi halves of blocks 2j, 2j+1] */
            int j = i >> 1, h = i & 1;
            memcpy(dst + 64 * j + 16 * h, q + 32 * b, 16);
            memcpy(dst + 64 * j + 32 + 16 * h, q + 32 * b + 16, 16);
        }
    }
    da->q = xq, da->dx = dx, da->sx = sx;
}

/* u8 x s8 dot of 32 values as 8 int32 lane sums. Exact (no int16 saturation) for |w| <= 128
 * after the sign trick, so VNNI and vpmaddubsw agree bit for bit. */
static inline __attribute__((always_inline)) __m256i dotu8_avx2(__m256i w, __m256i x) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, x);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1));
#endif
}

/* One step of nv (<= 8) blocks at block index 8 * o for NR weight rows x MR activation rows. */
static inline __attribute__((always_inline)) void direct_step(int qtype, int NR, int MR, int nv, const uint8_t *w,
                                                              int64_t wrb, const dact_t *xa, int64_t o,
                                                              int64_t pfd, __m256 acc[][KVQ_TILE_ROWS]) {
    const int bb = qtype == KVQ_Q8_0 ? 34 : qtype == KVQ_Q4_1 ? 20 : qtype == KVQ_Q5_0 ? 22 : 18;
    const int hdr = qtype == KVQ_Q4_1 ? 4 : qtype == KVQ_Q5_0 ? 6 : 2;
    const __m256i ones = _mm256_set1_epi16(1);
    /* per 128-bit lane: the 4 low 16-bit halves (d), then the 4 high ones (Q4_1's m) */
    const __m256i dmsh = _mm256_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15, 0, 1, 4, 5, 8, 9, 12,
                                          13, 2, 3, 6, 7, 10, 11, 14, 15);
    _Pragma("GCC unroll 8")
    for (int r = 0; r < NR; r++) {
        const uint8_t *p = w + r * wrb + o * DIRECT_G * bb;
        if (DIRECT_PF)
            _Pragma("GCC unroll 8")
            for (int l = 0; l < DIRECT_G * bb; l += 64) _mm_prefetch((const char *)p + pfd + l, _MM_HINT_T0);
        /* the 8 blocks' first 4 bytes (d, and Q4_1's m) in the lanes of their sums, two blocks per
         * 64-bit scalar load pair (general-purpose loads: cheaper here than gathers or broadcast +
         * blend, which compete with the dot products for the vector pipes) */
        uint64_t h2[DIRECT_G / 2];
        _Pragma("GCC unroll 8")
        for (int k = 0; k < DIRECT_G / 2; k++) {
            uint32_t lo = 0, hi = 0;
            const int i0 = direct_blk(qtype, 2 * k), i1 = direct_blk(qtype, 2 * k + 1);
            if (i0 < nv) memcpy(&lo, p + i0 * bb, 4);
            if (i1 < nv) memcpy(&hi, p + i1 * bb, 4);
            h2[k] = lo | (uint64_t)hi << 32;
        }
        const __m256i g = _mm256_set_m128i(_mm_insert_epi64(_mm_cvtsi64_si128((long long)h2[2]), (long long)h2[3], 1),
                                           _mm_insert_epi64(_mm_cvtsi64_si128((long long)h2[0]), (long long)h2[1], 1));
        const __m256i dm = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(g, dmsh), 0xd8);
        const __m256 dw = _mm256_cvtph_ps(_mm256_castsi256_si128(dm));
        if (qtype == KVQ_Q8_0) {
            _Pragma("GCC unroll 8")
            for (int a = 0; a < MR; a++) {
                const uint8_t *xq = xa[a].q + o * 256;
                __m256i ps[DIRECT_G];
                _Pragma("GCC unroll 8")
                for (int i = 0; i < DIRECT_G; i++) {
                    if (i < nv) {
                        const __m256i q = _mm256_loadu_si256((const __m256i *)(p + i * bb + 2));
                        const __m256i x = _mm256_loadu_si256((const __m256i *)(xq + 32 * i));
                        ps[i] = dotu8_avx2(_mm256_sign_epi8(q, q), _mm256_sign_epi8(x, q));
                    } else {
                        ps[i] = _mm256_setzero_si256();
                    }
                }
                /* lanes of h: blocks 0-3 (values 0-15 | values 16-31), then blocks 4-7 */
                const __m256i h0 = _mm256_hadd_epi32(_mm256_hadd_epi32(ps[0], ps[1]), _mm256_hadd_epi32(ps[2], ps[3]));
                const __m256i h1 = _mm256_hadd_epi32(_mm256_hadd_epi32(ps[4], ps[5]), _mm256_hadd_epi32(ps[6], ps[7]));
                const __m256i v = _mm256_add_epi32(_mm256_permute2x128_si256(h0, h1, 0x20),
                                                   _mm256_permute2x128_si256(h0, h1, 0x31));
                const __m256 sc = _mm256_mul_ps(dw, _mm256_loadu_ps(xa[a].dx + o * DIRECT_G));
                acc[a][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(v), sc, acc[a][r]);
            }
        } else {
            const __m256i m4 = _mm256_set1_epi8(0x0f);
            __m256i s[DIRECT_MAX_M][DIRECT_G / 2];
            _Pragma("GCC unroll 8")
            for (int j = 0; j < DIRECT_G / 2; j++) {
                const uint8_t *b0 = p + 2 * j * bb + hdr;
                __m256i raw;
                if (2 * j + 1 < nv)
                    raw = _mm256_loadu2_m128i((const __m128i *)(b0 + bb), (const __m128i *)b0);
                else if (2 * j < nv)
                    raw = _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i *)b0));
                else
                    raw = _mm256_setzero_si256();
                __m256i wl = _mm256_and_si256(raw, m4), wh = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
                if (qtype == KVQ_Q5_0) { /* | 16 where the value's bit of qh (LE uint32) is set */
                    uint32_t qa = 0, qb = 0;
                    if (2 * j < nv) memcpy(&qa, p + 2 * j * bb + 2, 4);
                    if (2 * j + 1 < nv) memcpy(&qb, p + (2 * j + 1) * bb + 2, 4);
                    const __m256i qh = _mm256_setr_epi32((int)qa, 0, 0, 0, (int)qb, 0, 0, 0);
                    const __m256i lo8 = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0,
                                                         0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
                    const __m256i hi8 = _mm256_add_epi8(lo8, _mm256_set1_epi8(2));
                    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL), b16 = _mm256_set1_epi8(16);
                    const __m256i hl = _mm256_cmpeq_epi8(_mm256_and_si256(_mm256_shuffle_epi8(qh, lo8), bit), bit);
                    const __m256i hh = _mm256_cmpeq_epi8(_mm256_and_si256(_mm256_shuffle_epi8(qh, hi8), bit), bit);
                    wl = _mm256_or_si256(wl, _mm256_and_si256(hl, b16));
                    wh = _mm256_or_si256(wh, _mm256_and_si256(hh, b16));
                }
                _Pragma("GCC unroll 8")
                for (int a = 0; a < MR; a++) {
                    const __m256i *xq = (const __m256i *)(xa[a].q + o * 256);
                    s[a][j] = _mm256_add_epi16(_mm256_maddubs_epi16(wl, _mm256_loadu_si256(xq + 2 * j)),
                                               _mm256_maddubs_epi16(wh, _mm256_loadu_si256(xq + 2 * j + 1)));
                    if (qtype == KVQ_Q5_0) s[a][j] = _mm256_madd_epi16(s[a][j], ones); /* int32 at once */
                }
            }
            const __m256 mw = qtype == KVQ_Q4_1 ? _mm256_cvtph_ps(_mm256_extracti128_si256(dm, 1)) : dw;
            _Pragma("GCC unroll 8")
            for (int a = 0; a < MR; a++) {
                __m256i v;
                if (qtype == KVQ_Q5_0) {
                    v = _mm256_hadd_epi32(_mm256_hadd_epi32(s[a][0], s[a][1]), _mm256_hadd_epi32(s[a][2], s[a][3]));
                } else {
                    const __m256i u =
                        _mm256_hadd_epi16(_mm256_hadd_epi16(s[a][0], s[a][1]), _mm256_hadd_epi16(s[a][2], s[a][3]));
                    v = _mm256_madd_epi16(u, ones);
                }
                const __m256 sc = _mm256_mul_ps(dw, _mm256_loadu_ps(xa[a].dx + o * DIRECT_G));
                acc[a][r] = _mm256_fmadd_ps(mw, _mm256_loadu_ps(xa[a].sx + o * DIRECT_G), acc[a][r]);
                acc[a][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(v), sc, acc[a][r]);
            }
        }
    }
}

/* out[a * out_stride + r] = row r of w . activation row a, for r < NR, a < MR. */
static inline __attribute__((always_inline)) void direct_avx2(int qtype, int NR, int MR, const uint8_t *w,
                                                              int64_t wrb, const dact_t *xa, int64_t nb,
                                                              float *out, int64_t out_stride, int64_t pfd) {
    __m256 acc[DIRECT_MAX_M][KVQ_TILE_ROWS];
    _Pragma("GCC unroll 8")
    for (int a = 0; a < MR; a++)
        _Pragma("GCC unroll 8")
        for (int r = 0; r < NR; r++) acc[a][r] = _mm256_setzero_ps();
    const int64_t nfull = nb / DIRECT_G;
    for (int64_t o = 0; o < nfull; o++) {
#ifdef DIRECT_MCA /* marks the step for llvm-mca -mcpu=znver3 (on gcc -S output) */
        __asm volatile("# LLVM-MCA-BEGIN q%c0_nr%c1_mr%c2" ::"i"(qtype), "i"(NR), "i"(MR));
#endif
        direct_step(qtype, NR, MR, DIRECT_G, w, wrb, xa, o, pfd, acc);
#ifdef DIRECT_MCA
        __asm volatile("# LLVM-MCA-END");
#endif
    }
    switch (nb % DIRECT_G) { /* the last, partial step */
    case 1: direct_step(qtype, NR, MR, 1, w, wrb, xa, nfull, pfd, acc); break;
    case 2: direct_step(qtype, NR, MR, 2, w, wrb, xa, nfull, pfd, acc); break;
    case 3: direct_step(qtype, NR, MR, 3, w, wrb, xa, nfull, pfd, acc); break;
    case 4: direct_step(qtype, NR, MR, 4, w, wrb, xa, nfull, pfd, acc); break;
    case 5: direct_step(qtype, NR, MR, 5, w, wrb, xa, nfull, pfd, acc); break;
    case 6: direct_step(qtype, NR, MR, 6, w, wrb, xa, nfull, pfd, acc); break;
    case 7: direct_step(qtype, NR, MR, 7, w, wrb, xa, nfull, pfd, acc); break;
    default: break;
    }
    _Pragma("GCC unroll 8")
    for (int a = 0; a < MR; a++)
        _Pragma("GCC unroll 8")
        for (int r = 0; r < NR; r++) out[a * out_stride + r] = hsum256(acc[a][r]);
}

/* Row groups per activation-row count: accumulators stay within the 16 ymm registers. */
#define DIRECT_CASE(QT)                                                                                           \
    case QT:                                                                                                      \
        if (mr == 1 && nr == DIRECT_NR1(QT)) direct_avx2(QT, DIRECT_NR1(QT), 1, w, wrb, xa, nb, out, os, pfd);                                 \
        else if (mr == 1) direct_avx2(QT, 1, 1, w, wrb, xa, nb, out, os, pfd);                                       \
        else if (mr == 2 && nr == 2) direct_avx2(QT, 2, 2, w, wrb, xa, nb, out, os, pfd);                            \
        else if (mr == 2) direct_avx2(QT, 1, 2, w, wrb, xa, nb, out, os, pfd);                                       \
        else if (mr == 3) direct_avx2(QT, 1, 3, w, wrb, xa, nb, out, os, pfd);                                       \
        else direct_avx2(QT, 1, 4, w, wrb, xa, nb, out, os, pfd);                                                    \
        break;

static void direct_group(int qtype, int nr, int mr, const uint8_t *w, int64_t wrb, const dact_t *xa, int64_t nb,
                         float *out, int64_t os, int64_t pfd) {
    switch (qtype) {
        DIRECT_CASE(KVQ_Q4_0)
        DIRECT_CASE(KVQ_Q4_1)
        DIRECT_CASE(KVQ_Q8_0)
        DIRECT_CASE(KVQ_Q5_0)
    default:
        break;
    }
}

/* Activation rows beyond DIRECT_MAX_M take the direct kernels DIRECT_MAX_M at a time over each
 * weight row group (the group's bytes are still in L1 for the next activation group, so the
 * weight streams from memory once), up to a per-format bound where that beat the tile path
 * (which unpacks every tile into int8 first). Measured on a Zen 3 core (AVX2), µs per product:
 * Q4_1 3072 x 576 at 5-16 rows 0.70-0.85x the tile path's time, at 24-47 rows (2 threads)
 * 0.57-0.83x; Q4_1 576 x 1536 at 24-47 rows 0.71-1.07x; Q8_0 0.92-1.0x at 5-16 rows and
 * 1.1-1.4x (slower) above, so Q8_0 stays at DIRECT_MAX_M (benchmarks/RESULTS.md) here; from 5
 * rows it takes q8rows_row below instead (0.67-0.9x the tile path's time). */
#define DIRECT_MAX_ACT 48

static int direct_max_rows(int qtype) {
    switch (qtype) {
    case KVQ_Q4_0:
    case KVQ_Q4_1: return DIRECT_MAX_ACT;
#if defined(KVQ_VNNI512)
    case KVQ_Q5_0: return DIRECT_MAX_ACT; /* gemm_zdirect: 0.5-0.8x the tile path's time at 17-47 rows */
#else
    case KVQ_Q5_0: return 16;
#endif
#if defined(KVQ_VNNI512)
    case KVQ_Q8_0: return 1; /* from 2 rows gemm_zq8rows (at 2-4 rows 0.53-0.8x this kernel's time) */
#else
    case KVQ_Q8_0: return DIRECT_MAX_M;
#endif
    default: return 0;
    }
}

static int direct_ok(int qtype, int64_t M) { return M <= direct_max_rows(qtype); }

#if defined(KVQ_VNNI512)
/* ---- AVX-512 VNNI direct kernels for Q4_0, Q4_1 and Q5_0 ----
 *
 * The AVX2 step above spends about 20 vector operations per activation row on 8 blocks (8
 * vpmaddubsw, 4 adds, the vphaddw tree, the widening and the float work), so on AVX-512 every
 * extra row of a verify or batched step cost about 0.4 of a one-row step. Here a zmm holds 4
 * blocks' 16 nibble bytes (one 128-bit lane per block):
 *   - low nibbles (values 0-15 of each block) and high nibbles (16-31) are two zmm of codes;
 *     two vpdpbusd against the activation's matching halves leave 4 exact int32 sums per block
 *     (no reduction tree: the float accumulator keeps 4 lanes per block, reduced once per row,
 *     8 accumulators at a time by zreduce8).
 *   - Q4_0's -8 offset (Q5_0's -16) is folded into the integers: the first vpdpbusd accumulates
 *     onto -8 (-16) times the activation block's code sum (in the block's first lane), prepared
 *     once per call, so neither needs an offset FMA. Q4_1's m times the stored block sums is one
 *     ymm FMA per 8 blocks into a second accumulator. Q5_0's 5th bits: each block's two 16-bit
 *     halves of qh are the byte masks of a masked add of 16 to the low / high nibble codes.
 *   - Per 4 blocks and activation row: 2 vpdpbusd, one convert, one multiply d_w * d_x (both
 *     spread to the block's 4 lanes: d_x by the preparation, d_w once per weight row and step by
 *     one vpermps shared by every activation row) and one FMA.
 *   - A weight row's step of 8 blocks comes in as whole 64-byte loads: permutes pick the code
 *     bytes and the fp16 headers out of them (no per-block scalar loads or inserts).
 * The activation is rearranged once per call (zdirect_prep) into steps of 8 blocks: the two
 * 4-block groups' low and high code halves, d_x per lane, Q4_0's integer offset per lane, Q4_1's
 * block sums. Groups: 4 weight rows at M = 1, 2 at M = 2-3 (more independent accumulator
 * chains), else one weight row unpacked per step and shared by up to ZDIRECT_MR activation rows.
 * Every (weight row, activation row) pair has its own accumulators and the same operation
 * sequence whatever the grouping, so outputs do not depend on M, on the row groups or on the
 * thread split (they differ from the AVX2 build's: other float sums).
 * Measured on the 2-core AMD EPYC (Zen 5, AVX-512 VNNI) machine, benchmarks/cpu_quant_kernels.py
 * (cold weights, best of 5, load ~1), µs per product at M = 1 / 2 / 4 / 6 / 8 / 16 / 32 rows,
 * the AVX2 direct kernels (before) -> these:
 *   Q4_1 1536 x 576, 1 thread  25.3 / 32.8 / 52.9 / 83.8 / 101 / 212 / 413
 *                           -> 25.5 / 22.9 / 35.8 / 43.5 / 53.5 / 108 / 219
 *                   2 threads  17.1 / 26.5 / 30.5 / 45.7 / 71.2 / 108 / 212
 *                           -> 15.5 / 18.4 / 21.2 / 31.1 / 36.0 / 56.6 / 117
 *   Q4_1 576 x 1536, 1 thread  19.0 / 31.9 / 42.6 / 68.0 / 83.1 / 171 / 424
 *                           -> 18.5 / 26.8 / 24.0 / 32.5 / 41.4 / 90.3 / 176
 *   Q4_0 1536 x 576, 1 thread  31.5 / 32.1 / 53.7 / 115 / 102 / 206 / 415
 *                           -> 21.9 / 20.7 / 47.3 / 59.0 / 58.2 / 118 / 238
 *   Q5_0 2048 x 640 (Gemma 3's gate/up, cpu_quant_kernels.py --gemma), 1 thread, M = 1 / 2 / 4 /
 *   8 / 16 / 32 (above 16 rows the tile path before)  62.6 / 70.7 / 125 / 207 / 420 / 708
 *                                                  -> 39.9 / 39.5 / 59.4 / 83.8 / 168 / 333
 * (timings on this shared virtual machine vary by up to ~1.3x between runs; before and after
 * ran interleaved in one process), so an extra row costs 0.16-0.24 of a one-row product instead
 * of 0.32-0.48, and the one-row case stays at the memory-bound rate. Tried and dropped: 8 blocks
 * per zmm with 2 lanes per block (one float convert, multiply and FMA per 8 blocks instead of
 * 2): no faster at K = 1536 and slower at K = 576, whose last step of 2 blocks then costs a full
 * one (timed before the prepared steps were padded to whole cache lines). */
#define ZDIRECT_MR 8
#ifndef ZDIRECT_WBYTES
#define ZDIRECT_WBYTES 32768
#endif
/* bytes per prepared step: codes 256, d_x per lane 128, integer offsets 128, Q4_1's sums 32, and
 * padding to whole cache lines (a 544-byte step left every other step's loads split over two
 * lines: 1.25x the time at 24 and 32 rows) */
#define ZSTEP 576

static inline int64_t zdirect_act_bytes(int64_t nb) { return (nb + DIRECT_G - 1) / DIRECT_G * ZSTEP; }

static void zdirect_prep(int qtype, const uint8_t *row, int64_t K, uint8_t *buf) {
    const int64_t nb = K / KVQ_QK;
    const int8_t *q = (const int8_t *)row;
    const float *d = (const float *)(row + K), *s = d + nb;
    memset(buf, 0, (size_t)zdirect_act_bytes(nb));
    for (int64_t b = 0; b < nb; b++) {
        uint8_t *st = buf + b / DIRECT_G * ZSTEP;
        const int i = (int)(b % DIRECT_G), g = i / 4, l = i % 4;
        memcpy(st + 128 * g + 16 * l, q + 32 * b, 16);
        memcpy(st + 128 * g + 64 + 16 * l, q + 32 * b + 16, 16);
        float *dxe = (float *)(st + 256) + 16 * g + 4 * l;
        for (int k = 0; k < 4; k++) dxe[k] = d[b];
        int32_t sum = 0;
        for (int k = 0; k < KVQ_QK; k++) sum += q[32 * b + k];
        if (qtype != KVQ_Q4_1) ((int32_t *)(st + 384))[16 * g + 4 * l] = (qtype == KVQ_Q5_0 ? -16 : -8) * sum;
        ((float *)(st + 512))[i] = s[2 * b] + s[2 * b + 1];
    }
}

/* The 16-lane sums of 8 accumulators at once (a row's final reduction, once per weight row and
 * activation row, cost as much as a 576-value row's dot when done one register at a time): each
 * slot's lanes are added in the same tree, lane k + lane k+8, then k+4, k+2, k+1, whatever slot
 * it occupies. Slot i's sum lands in res[zslot(i)]. */
static inline int zslot(int i) { return i < 4 ? 4 * i : 4 * (i - 4) + 2; }

static inline __attribute__((always_inline)) void zreduce8(const __m512 v[8], float *res) {
    __m512 t[4], u[2];
    _Pragma("GCC unroll 4")
    for (int i = 0; i < 4; i++) /* [v2i lanes k + k+8 | v2i+1 lanes k + k+8], k < 8 */
        t[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                             _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xee));
    _Pragma("GCC unroll 2")
    for (int i = 0; i < 2; i++) /* 128-bit lane j: slot 4i + j, its lanes k + k+4, k < 4 */
        u[i] = _mm512_add_ps(_mm512_shuffle_f32x4(t[2 * i], t[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(t[2 * i], t[2 * i + 1], 0xdd));
    /* per 128-bit lane j: [slot j: k + k+2, k < 2 | slot j+4: the same] */
    const __m512 w = _mm512_add_ps(_mm512_shuffle_ps(u[0], u[1], 0x44), _mm512_shuffle_ps(u[0], u[1], 0xee));
    _mm512_store_ps(res, _mm512_add_ps(w, _mm512_permute_ps(w, 0xb1)));
}

/* The first n bytes of a 64-byte load (n may be <= 0 or >= 64). */
static inline __mmask64 zmask(int n) { return n <= 0 ? 0 : n >= 64 ? ~(__mmask64)0 : ((__mmask64)1 << n) - 1; }

/* Q4_0's 16-bit permutes (no _mm512_setr_epi16 in older compilers): a group's code words (block i:
 * words 9i+1 .. 9i+8 of its span; from word 32 on, of the load at byte 8) and the 8 headers. */
static const int16_t zq40_codes[32] = {1,  2,  3,  4,  5,  6,  7,  8,  10, 11, 12, 13, 14, 15, 16, 17,
                                       19, 20, 21, 22, 23, 24, 25, 26, 28, 29, 30, 31, 60, 61, 62, 63};
static const int16_t zq40_heads[32] = {0, 9, 18, 27, 32, 41, 50, 59};
/* Q5_0 (block i: words 11i .. 11i+10 of a group's 88-byte span; from word 32 on, of the load at
 * byte 24): the code words, and [qh's low words | qh's high words | d] of the 4 blocks. */
static const int16_t zq50_codes[32] = {3,  4,  5,  6,  7,  8,  9,  10, 14, 15, 16, 17, 18, 19, 20, 21,
                                       25, 26, 27, 28, 29, 30, 31, 52, 56, 57, 58, 59, 60, 61, 62, 63};
static const int16_t zq50_heads[32] = {1, 12, 23, 54, 2, 13, 24, 55, 0, 11, 22, 53};

/* One step of nv (<= 8) blocks at block index 8 * o for NR weight rows x MR activation rows. */
static inline __attribute__((always_inline)) void zdirect_step(int qtype, int NR, int MR, int nv, const uint8_t *w,
                                                               int64_t wrb, const uint8_t *const *xa, int64_t o,
                                                               int64_t pfd, __m512 acc[][4], __m256 accm[][4]) {
    const int bb = qtype == KVQ_Q4_1 ? 20 : qtype == KVQ_Q5_0 ? 22 : 18, hoff = 4 * bb - 64;
    const __m512i m4 = _mm512_set1_epi8(0x0f);
    _Pragma("GCC unroll 4")
    for (int r = 0; r < NR; r++) {
        const uint8_t *p = w + r * wrb + o * DIRECT_G * bb;
        if (DIRECT_PF)
            _Pragma("GCC unroll 8")
            for (int l = 0; l < DIRECT_G * bb; l += 64) _mm_prefetch((const char *)p + pfd + l, _MM_HINT_T0);
        /* Group g's 4 blocks span q[0, 4 bb) (q = p + 4 g bb): two loads, at 0 and 4 bb - 64 bytes
         * (both inside the span; masked for a partial step), and one 32- (Q4_1: codes dword-aligned) or
         * 16-bit (Q4_0) two-source permute give the 4 x 16 code bytes; the first loads of the two
         * groups hold all 8 headers (d, m), gathered by one more permute. */
        __m512i lo[2], wl[2], wh[2], qd[2];
        _Pragma("GCC unroll 2")
        for (int g = 0; g < 2; g++) {
            if (4 * g >= nv) break;
            const uint8_t *q = p + 4 * g * bb;
            const int valid = (nv - 4 * g) * bb; /* bytes of this group's blocks present */
            const __m512i hi = nv - 4 * g >= 4 ? _mm512_loadu_si512((const void *)(q + hoff))
                                               : _mm512_maskz_loadu_epi8(zmask(valid - hoff), q + hoff);
            lo[g] = valid >= 64 ? _mm512_loadu_si512((const void *)q) : _mm512_maskz_loadu_epi8(zmask(valid), q);
            const __m512i raw = qtype == KVQ_Q4_1
                                    ? _mm512_permutex2var_epi32(lo[g], _mm512_setr_epi32(1, 2, 3, 4, 6, 7, 8, 9, 11, 12, 13, 14,
                                                                                       16 + 12, 16 + 13, 16 + 14, 16 + 15),
                                                                hi)
                                    : _mm512_permutex2var_epi16(
                                          lo[g], _mm512_loadu_si512((const void *)(qtype == KVQ_Q5_0 ? zq50_codes : zq40_codes)),
                                          hi);
            wl[g] = _mm512_and_si512(raw, m4);
            wh[g] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), m4);
            if (qtype == KVQ_Q5_0) { /* + 16 where the value's bit of qh is set: qh's words are byte masks */
                qd[g] = _mm512_permutex2var_epi16(lo[g], _mm512_loadu_si512((const void *)zq50_heads), hi);
                const __m128i qh = _mm512_castsi512_si128(qd[g]);
                const __m512i b16 = _mm512_set1_epi8(16);
                wl[g] = _mm512_mask_add_epi8(wl[g], _cvtu64_mask64((uint64_t)_mm_cvtsi128_si64(qh)), wl[g], b16);
                wh[g] = _mm512_mask_add_epi8(wh[g], _cvtu64_mask64((uint64_t)_mm_extract_epi64(qh, 1)), wh[g], b16);
            }
        }
        if (nv <= 4) lo[1] = qd[1] = _mm512_setzero_si512();
        __m512 dwe[2];
        __m256 mw = _mm256_setzero_ps();
        if (qtype == KVQ_Q4_1) { /* d0 m0 d1 m1 ... d7 m7 */
            const __m512 hf = _mm512_cvtph_ps(_mm512_castsi512_si256(
                _mm512_permutex2var_epi32(lo[0], _mm512_setr_epi32(0, 5, 10, 15, 16, 21, 26, 31, 0, 0, 0, 0, 0, 0, 0, 0), lo[1])));
            dwe[0] = _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2, 4, 4, 4, 4, 6, 6, 6, 6), hf);
            dwe[1] = _mm512_permutexvar_ps(_mm512_setr_epi32(8, 8, 8, 8, 10, 10, 10, 10, 12, 12, 12, 12, 14, 14, 14, 14), hf);
            mw = _mm512_castps512_ps256(
                _mm512_permutexvar_ps(_mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 1, 3, 5, 7, 9, 11, 13, 15), hf));
        } else { /* d0 .. d7 */
            const __m128i h = qtype == KVQ_Q5_0
                                  ? _mm_unpacklo_epi64(_mm512_extracti32x4_epi32(qd[0], 1), _mm512_extracti32x4_epi32(qd[1], 1))
                                  : _mm512_castsi512_si128(_mm512_permutex2var_epi16(
                                        lo[0], _mm512_loadu_si512((const void *)zq40_heads), lo[1]));
            const __m512 hf = _mm512_castps256_ps512(_mm256_cvtph_ps(h));
            dwe[0] = _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3), hf);
            dwe[1] = _mm512_permutexvar_ps(_mm512_setr_epi32(4, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 6, 7, 7, 7, 7), hf);
        }
        _Pragma("GCC unroll 8")
        for (int a = 0; a < MR; a++) {
            const uint8_t *st = xa[a] + o * ZSTEP;
            _Pragma("GCC unroll 2")
            for (int g = 0; g < 2; g++) {
                if (4 * g >= nv) break;
                __m512i i = qtype != KVQ_Q4_1 ? _mm512_loadu_si512((const void *)(st + 384 + 64 * g))
                                              : _mm512_setzero_si512();
                i = _mm512_dpbusd_epi32(i, wl[g], _mm512_loadu_si512((const void *)(st + 128 * g)));
                i = _mm512_dpbusd_epi32(i, wh[g], _mm512_loadu_si512((const void *)(st + 128 * g + 64)));
                const __m512 sc = _mm512_mul_ps(dwe[g], _mm512_loadu_ps((const float *)(st + 256) + 16 * g));
                acc[a][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i), sc, acc[a][r]);
            }
            if (qtype == KVQ_Q4_1)
                accm[a][r] = _mm256_fmadd_ps(mw, _mm256_loadu_ps((const float *)(st + 512)), accm[a][r]);
        }
    }
}

/* out[a * out_stride + r] = row r of w . activation row a, for r < NR, a < MR. */
static inline __attribute__((always_inline)) void zdirect_rows(int qtype, int NR, int MR, const uint8_t *w,
                                                               int64_t wrb, const uint8_t *const *xa, int64_t nb,
                                                               float *out, int64_t out_stride, int64_t pfd) {
    __m512 acc[ZDIRECT_MR][4];
    __m256 accm[ZDIRECT_MR][4];
    _Pragma("GCC unroll 8")
    for (int a = 0; a < MR; a++)
        _Pragma("GCC unroll 4")
        for (int r = 0; r < NR; r++) acc[a][r] = _mm512_setzero_ps(), accm[a][r] = _mm256_setzero_ps();
    const int64_t nfull = nb / DIRECT_G;
    for (int64_t o = 0; o < nfull; o++) {
#ifdef DIRECT_MCA
        __asm volatile("# LLVM-MCA-BEGIN z%c0_nr%c1_mr%c2" ::"i"(qtype), "i"(NR), "i"(MR));
#endif
        zdirect_step(qtype, NR, MR, DIRECT_G, w, wrb, xa, o, pfd, acc, accm);
#ifdef DIRECT_MCA
        __asm volatile("# LLVM-MCA-END");
#endif
    }
    switch (nb % DIRECT_G) { /* the last, partial step */
    case 1: zdirect_step(qtype, NR, MR, 1, w, wrb, xa, nfull, pfd, acc, accm); break;
    case 2: zdirect_step(qtype, NR, MR, 2, w, wrb, xa, nfull, pfd, acc, accm); break;
    case 3: zdirect_step(qtype, NR, MR, 3, w, wrb, xa, nfull, pfd, acc, accm); break;
    case 4: zdirect_step(qtype, NR, MR, 4, w, wrb, xa, nfull, pfd, acc, accm); break;
    case 5: zdirect_step(qtype, NR, MR, 5, w, wrb, xa, nfull, pfd, acc, accm); break;
    case 6: zdirect_step(qtype, NR, MR, 6, w, wrb, xa, nfull, pfd, acc, accm); break;
    case 7: zdirect_step(qtype, NR, MR, 7, w, wrb, xa, nfull, pfd, acc, accm); break;
    default: break;
    }
    __m512 v[8];
    _Pragma("GCC unroll 8")
    for (int a = 0; a < MR; a++)
        _Pragma("GCC unroll 4")
        for (int r = 0; r < NR; r++)
            v[a * NR + r] = qtype == KVQ_Q4_1 ? _mm512_add_ps(acc[a][r], _mm512_zextps256_ps512(accm[a][r])) : acc[a][r];
    _Pragma("GCC unroll 8")
    for (int i = MR * NR; i < 8; i++) v[i] = _mm512_setzero_ps();
    _Alignas(64) float res[16];
    zreduce8(v, res);
    _Pragma("GCC unroll 8")
    for (int a = 0; a < MR; a++)
        _Pragma("GCC unroll 4")
        for (int r = 0; r < NR; r++) out[a * out_stride + r] = res[zslot(a * NR + r)];
}

#define ZDIRECT_CASE(QT)                                                                                          \
    case QT:                                                                                                      \
        if (nr == 4) zdirect_rows(QT, 4, 1, w, wrb, xa, nb, out, os, pfd);                                        \
        else if (nr == 2 && mr == 2) zdirect_rows(QT, 2, 2, w, wrb, xa, nb, out, os, pfd);                        \
        else if (nr == 2) zdirect_rows(QT, 2, 3, w, wrb, xa, nb, out, os, pfd);                                   \
        else switch (mr) {                                                                                        \
            case 1: zdirect_rows(QT, 1, 1, w, wrb, xa, nb, out, os, pfd); break;                                  \
            case 2: zdirect_rows(QT, 1, 2, w, wrb, xa, nb, out, os, pfd); break;                                  \
            case 3: zdirect_rows(QT, 1, 3, w, wrb, xa, nb, out, os, pfd); break;                                  \
            case 4: zdirect_rows(QT, 1, 4, w, wrb, xa, nb, out, os, pfd); break;                                  \
            case 5: zdirect_rows(QT, 1, 5, w, wrb, xa, nb, out, os, pfd); break;                                  \
            case 6: zdirect_rows(QT, 1, 6, w, wrb, xa, nb, out, os, pfd); break;                                  \
            case 7: zdirect_rows(QT, 1, 7, w, wrb, xa, nb, out, os, pfd); break;                                  \
            default: zdirect_rows(QT, 1, 8, w, wrb, xa, nb, out, os, pfd); break;                                 \
            }                                                                                                     \
        break;

/* nr weight rows x mr activation rows: (4, 1), (2, 2), (2, 3) or (1, any up to ZDIRECT_MR). */
static void zdirect_group(int qtype, int nr, int mr, const uint8_t *w, int64_t wrb, const uint8_t *const *xa,
                          int64_t nb, float *out, int64_t os, int64_t pfd) {
    switch (qtype) {
        ZDIRECT_CASE(KVQ_Q4_0)
        ZDIRECT_CASE(KVQ_Q4_1)
        ZDIRECT_CASE(KVQ_Q5_0)
    default:
        break;
    }
}

/* Rows [n0, n1) of Q4_0 / Q4_1 for M <= DIRECT_MAX_ACT activation rows. */
static void gemm_zdirect(int qtype, const uint8_t *w, int64_t wrb, const uint8_t *x, const float *bias, float *out,
                         int64_t out_stride, int64_t M, int64_t K, int64_t n0, int64_t n1) {
    const int64_t xstride = kvq_act_stride(K), nb = K / KVQ_QK, ab = zdirect_act_bytes(nb);
    _Alignas(64) uint8_t stack[DIRECT_STACK];
    uint8_t *buf = M * ab <= DIRECT_STACK ? stack : (uint8_t *)aligned_alloc(64, (size_t)(M * ab));
    if (buf == NULL) return;
    const uint8_t *xa[DIRECT_MAX_ACT];
    for (int64_t m = 0; m < M; m++) zdirect_prep(qtype, x + m * xstride, K, buf + m * ab), xa[m] = buf + m * ab;
    const int mr = (int)M, step = mr == 1 ? 4 : mr <= 3 ? 2 : 1;
    const int64_t gbytes = step * wrb, pfd = (DIRECT_PF + gbytes - 1) / gbytes * gbytes;
    /* More than ZDIRECT_MR rows: each group of activation rows goes over a block of weight rows
     * (ZDIRECT_WBYTES; 8 and 32 KB timed alike, 32 a little faster at K = 1536) before the next
     * group, so that the group's prepared rows (576 bytes per 8 blocks each) stay in L1 instead
     * of every group's passing through it per weight row (at 32 rows 0.7x the time). */
    const int64_t blk = mr <= ZDIRECT_MR ? n1 - n0 : (ZDIRECT_WBYTES + wrb - 1) / wrb;
    for (int64_t lo = n0; lo < n1; lo += blk) {
        const int64_t hi = n1 - lo < blk ? n1 : lo + blk;
        for (int a0 = 0; a0 < mr; a0 += ZDIRECT_MR) {
            const int ma = mr - a0 < ZDIRECT_MR ? mr - a0 : ZDIRECT_MR;
            for (int64_t n = lo; n < hi;) {
                const int nr = hi - n >= step ? step : 1;
                zdirect_group(qtype, nr, ma, w + n * wrb, wrb, xa + a0, nb, out + a0 * out_stride + n, out_stride, pfd);
                n += nr;
            }
        }
    }
    if (bias != NULL)
        for (int64_t m = 0; m < M; m++)
            for (int64_t n = n0; n < n1; n++) out[m * out_stride + n] += bias[n];
    if (buf != stack) free(buf);
}
#endif

/* Rows [n0, n1) for M <= DIRECT_MAX_ACT activation rows, front to back in groups of rows. */
static void gemm_direct(int qtype, const uint8_t *w, int64_t wrb, const uint8_t *x, const float *bias, float *out,
                        int64_t out_stride, int64_t M, int64_t K, int64_t n0, int64_t n1) {
#if defined(KVQ_VNNI512)
    if (qtype == KVQ_Q4_0 || qtype == KVQ_Q4_1 || qtype == KVQ_Q5_0) {
        gemm_zdirect(qtype, w, wrb, x, bias, out, out_stride, M, K, n0, n1);
        return;
    }
#endif
    const int64_t xstride = kvq_act_stride(K), nb = K / KVQ_QK, ab = direct_act_bytes(nb);
    _Alignas(64) uint8_t stack[DIRECT_STACK];
    uint8_t *buf = M * ab <= DIRECT_STACK ? stack : (uint8_t *)malloc((size_t)(M * ab));
    if (buf == NULL) return;
    dact_t xa[DIRECT_MAX_ACT];
    for (int64_t m = 0; m < M; m++) direct_prep(qtype, x + m * xstride, K, buf + m * ab, &xa[m]);
    const int stream = qtype == KVQ_Q8_0 && (n1 - n0) * wrb >= DIRECT_STREAM_BYTES;
    const int mr = (int)M, step = mr == 1 ? (stream ? 1 : DIRECT_NR1(qtype)) : mr == 2 ? 2 : 1;
    /* prefetch the same bytes of the row group whole groups ahead, at least DIRECT_PF bytes */
    const int64_t gbytes = step * wrb, pfd = (DIRECT_PF + gbytes - 1) / gbytes * gbytes;
    for (int64_t n = n0; n < n1;) {
        int nr = n1 - n >= step ? step : 1;
        for (int a0 = 0; a0 < mr; a0 += DIRECT_MAX_M) {
            const int ma = mr - a0 < DIRECT_MAX_M ? mr - a0 : DIRECT_MAX_M;
            direct_group(qtype, nr, ma, w + n * wrb, wrb, xa + a0, nb, out + a0 * out_stride + n, out_stride, pfd);
        }
        if (bias != NULL)
            for (int64_t m = 0; m < M; m++)
                for (int r = 0; r < nr; r++) out[m * out_stride + n + r] += bias[n + r];
        n += nr;
    }
    if (buf != stack) free(buf);
}

/* ---- direct kernels for the K formats (Q4_K, Q5_K, Q6_K) ----
 *
 * Same idea as above for the 256-value super-blocks, which the tile path unpacked at 3-5 GB/s:
 * each 32-value sub-block's codes come out of the block bytes in a few register operations and
 * are dotted with the activation codes as they lie in the quantized row (sub-block j of super-
 * block b is activation block 8b + j, so no per-call rearrangement is needed):
 *   - Q4_K: one 32-byte load holds sub-blocks 2p (low nibbles) and 2p+1 (high nibbles); Q5_K
 *     ORs in each code's 5th bit (bit j of qh[l], brought to bit 4 by one 16-bit shift and a
 *     mask); Q6_K builds 4 sub-blocks of 6-bit codes from 2 x 32 bytes of ql and 32 of qh.
 *   - vpmaddubsw (codes u8 < 64 x activations s8: 16-bit pair sums, exact) and then vpmaddwd by
 *     the sub-block's integer weight scale (Q4_K/Q5_K: its 6-bit scale in all 16 lanes; Q6_K:
 *     the scales of its two 16-value halves, one per 128-bit lane) give 8 exact int32 partial
 *     sums already weighted by the weight scale.
 *   - One convert and one FMA by the activation block's scale d_x per sub-block accumulate a
 *     super-block in float; times the super-block's d, plus the offset term (Q4_K/Q5_K:
 *     -dmin * min_j, Q6_K: -32 d * scale_g) times the activation's stored 16-value sums (which
 *     include d_x), two FMAs over 16 lanes.
 * One weight row at a time, up to 4 activation rows sharing each unpacked sub-block (more rows
 * go 4 at a time over the same weight row, which is in L1 by then); each (weight row,
 * activation row) pair has its own accumulators and the same operation sequence whatever the
 * grouping, so outputs do not depend on how rows were split. */

#ifndef Q8ROWS
#define Q8ROWS 1 /* 0: Q8_0 above DIRECT_MAX_M rows takes the tile path (for timing the two) */
#endif
/* Up to this many activation rows (the Python side dequantizes from 48). Measured on a Zen 3
 * EPYC core (AVX2), one thread, µs per product against the tile path (cold weights,
 * benchmarks/cpu_quant_kernels.py --gemma): Q4_K 640 x 2048 at 1 / 4 / 8 / 32 rows 58.8 / 126 /
 * 250 / 1010 vs 183 / 286 / 423 / 1242; Q6_K 640 x 2048 75.5 / 156 / 297 / 1179 vs 189 / 296 /
 * 432 / 1250; Q8_0 262144 x 640 (Gemma 3's head) at 8 / 32 rows 39.7 / 175 ms vs 57.3 / 187. */
#ifndef KDIRECT_MAX_ACT
#define KDIRECT_MAX_ACT 48
#endif

typedef struct {
    const uint8_t *q; /* codes, K bytes */
    const float *d;   /* one scale per 32 values */
    const float *s;   /* d * (sum of 16 codes), per 16 values */
} kact_t;

/* 8 x 6-bit scales (lo) and mins (hi) of a Q4_K/Q5_K scales[12] field, one byte each:
 * j < 4: sc = s[j] & 63, mn = s[j+4] & 63; j >= 4: sc = (s[j+4] & 15) | (s[j-4] >> 6) << 4,
 * mn = (s[j+4] >> 4) | (s[j] >> 6) << 4 (kvq_scale_min in kvq_blocks.c), four at a time. */
static inline void kdirect_scales(const uint8_t *s, uint64_t *sc, uint64_t *mn) {
    uint32_t u0, u1, u2;
    memcpy(&u0, s, 4), memcpy(&u1, s + 4, 4), memcpy(&u2, s + 8, 4);
    const uint32_t lo6 = 0x3f3f3f3fu, lo4 = 0x0f0f0f0fu, lo2 = 0x03030303u;
    *sc = (uint64_t)(u0 & lo6) | (uint64_t)((u2 & lo4) | ((u0 >> 6) & lo2) << 4) << 32;
    *mn = (uint64_t)(u1 & lo6) | (uint64_t)(((u2 >> 4) & lo4) | ((u1 >> 6) & lo2) << 4) << 32;
}

/* Super-block sb of one weight row for MR activation rows: acc[a] += d * (sum over its sub-blocks of
 * d_x * integer dot), accm[a] += the offset term (a second chain: shorter dependencies). */
static inline __attribute__((always_inline)) void kdirect_sb(int qtype, int MR, const uint8_t *row, int64_t sb,
                                                             const kact_t *xa, int64_t pfd, __m256 *acc, __m256 *accm) {
    const int bb = qtype == KVQ_Q4_K ? 144 : qtype == KVQ_Q5_K ? 176 : 210;
    const uint8_t *p = row + sb * bb;
    if (DIRECT_PF)
        _Pragma("GCC unroll 4")
        for (int l = 0; l < bb; l += 64) _mm_prefetch((const char *)p + pfd + l, _MM_HINT_T0);
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    __m256 t[DIRECT_MAX_M];
    _Pragma("GCC unroll 4")
    for (int a = 0; a < MR; a++) t[a] = _mm256_setzero_ps();
    __m256 off_lo, off_hi, dw;
#define KDIRECT_DOT(J, W, SC)                                                                                       \
    _Pragma("GCC unroll 4") for (int a = 0; a < MR; a++) {                                                        \
        const __m256i x_ = _mm256_loadu_si256((const __m256i *)(xa[a].q + 256 * sb + 32 * (J)));                   \
        const __m256i i_ = _mm256_madd_epi16(_mm256_maddubs_epi16((W), x_), (SC));                                \
        t[a] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i_), _mm256_broadcast_ss(xa[a].d + 8 * sb + (J)), t[a]);          \
    }
    if (qtype == KVQ_Q6_K) {
        const uint8_t *ql = p, *qh = p + 128;
        const float d = kvq_h2f(kvq_rd16(p + 208));
        const __m128i s8 = _mm_loadu_si128((const __m128i *)(p + 192));
        const __m256i s16 = _mm256_cvtepi8_epi16(s8); /* dword j: scales 2j, 2j+1 */
        /* [scale 2j x 8 | scale 2j+1 x 8] from the dword j broadcast to every lane */
        const __m256i pick = _mm256_setr_epi8(0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 2, 3, 2, 3, 2, 3, 2, 3, 2,
                                              3, 2, 3, 2, 3, 2, 3);
        const __m256i m30 = _mm256_set1_epi8(0x30);
        _Pragma("GCC unroll 2")
        for (int h = 0; h < 2; h++) {
            const __m256i l0 = _mm256_loadu_si256((const __m256i *)(ql + 64 * h));
            const __m256i l1 = _mm256_loadu_si256((const __m256i *)(ql + 64 * h + 32));
            const __m256i hb = _mm256_loadu_si256((const __m256i *)(qh + 32 * h));
            const __m256i w0 = _mm256_or_si256(_mm256_and_si256(l0, m4), _mm256_and_si256(_mm256_slli_epi16(hb, 4), m30));
            const __m256i w1 = _mm256_or_si256(_mm256_and_si256(l1, m4), _mm256_and_si256(_mm256_slli_epi16(hb, 2), m30));
            const __m256i w2 =
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4), _mm256_and_si256(hb, m30));
            const __m256i w3 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4),
                                               _mm256_and_si256(_mm256_srli_epi16(hb, 2), m30));
            const __m256i c0 = _mm256_shuffle_epi8(_mm256_permutevar8x32_epi32(s16, _mm256_set1_epi32(4 * h)), pick);
            KDIRECT_DOT(4 * h, w0, c0)
            const __m256i c1 = _mm256_shuffle_epi8(_mm256_permutevar8x32_epi32(s16, _mm256_set1_epi32(4 * h + 1)), pick);
            KDIRECT_DOT(4 * h + 1, w1, c1)
            const __m256i c2 = _mm256_shuffle_epi8(_mm256_permutevar8x32_epi32(s16, _mm256_set1_epi32(4 * h + 2)), pick);
            KDIRECT_DOT(4 * h + 2, w2, c2)
            const __m256i c3 = _mm256_shuffle_epi8(_mm256_permutevar8x32_epi32(s16, _mm256_set1_epi32(4 * h + 3)), pick);
            KDIRECT_DOT(4 * h + 3, w3, c3)
        }
        const __m256 m32 = _mm256_set1_ps(-32.0f * d);
        off_lo = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(s8)), m32);
        off_hi = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(s8, 8))), m32);
        dw = _mm256_set1_ps(d);
    } else {
        const float d = kvq_h2f(kvq_rd16(p)), dmin = kvq_h2f(kvq_rd16(p + 2));
        uint64_t sc, mn;
        kdirect_scales(p + 4, &sc, &mn);
        /* scale j in every 16-bit lane: byte j of sc (and a zero byte) broadcast */
        const __m256i scb = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(_mm_cvtsi64_si128((long long)sc)));
        const uint8_t *qs = qtype == KVQ_Q5_K ? p + 48 : p + 16;
        __m256i qh = _mm256_setzero_si256();
        if (qtype == KVQ_Q5_K) qh = _mm256_loadu_si256((const __m256i *)(p + 16));
        const __m256i m10 = _mm256_set1_epi8(0x10);
        _Pragma("GCC unroll 4")
        for (int j = 0; j < 8; j += 2) {
            const __m256i raw = _mm256_loadu_si256((const __m256i *)(qs + 16 * j));
            __m256i w0 = _mm256_and_si256(raw, m4), w1 = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
            if (qtype == KVQ_Q5_K) { /* bit j of qh[l] -> bit 4 of code l (16-bit shifts, then the mask) */
                const __m256i h0 = j < 4 ? _mm256_slli_epi16(qh, 4 - j) : j == 4 ? qh : _mm256_srli_epi16(qh, j - 4);
                const __m256i h1 = j + 1 < 4 ? _mm256_slli_epi16(qh, 3 - j) : j + 1 == 4 ? qh
                                                                                      : _mm256_srli_epi16(qh, j - 3);
                w0 = _mm256_or_si256(w0, _mm256_and_si256(h0, m10));
                w1 = _mm256_or_si256(w1, _mm256_and_si256(h1, m10));
            }
            const __m256i c0 = _mm256_shuffle_epi8(scb, _mm256_set1_epi16((short)(0xff00 | (2 * j))));
            KDIRECT_DOT(j, w0, c0)
            const __m256i c1 = _mm256_shuffle_epi8(scb, _mm256_set1_epi16((short)(0xff00 | (2 * j + 2))));
            KDIRECT_DOT(j + 1, w1, c1)
        }
        const __m128i mn2 = _mm_unpacklo_epi8(_mm_cvtsi64_si128((long long)mn), _mm_cvtsi64_si128((long long)mn));
        const __m256 nm = _mm256_set1_ps(-dmin);
        off_lo = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(mn2)), nm);
        off_hi = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(mn2, 8))), nm);
        dw = _mm256_set1_ps(d);
    }
#undef KDIRECT_DOT
    _Pragma("GCC unroll 4")
    for (int a = 0; a < MR; a++) {
        acc[a] = _mm256_fmadd_ps(t[a], dw, acc[a]);
        accm[a] = _mm256_fmadd_ps(off_lo, _mm256_loadu_ps(xa[a].s + 16 * sb), accm[a]);
        accm[a] = _mm256_fmadd_ps(off_hi, _mm256_loadu_ps(xa[a].s + 16 * sb + 8), accm[a]);
    }
}

/* out[a * os] = weight row . activation row a, for a < MR. */
static inline __attribute__((always_inline)) void kdirect_row(int qtype, int MR, const uint8_t *row,
                                                              const kact_t *xa, int64_t nsb, float *out, int64_t os,
                                                              int64_t pfd) {
    __m256 acc[DIRECT_MAX_M], accm[DIRECT_MAX_M];
    _Pragma("GCC unroll 4")
    for (int a = 0; a < MR; a++) acc[a] = _mm256_setzero_ps(), accm[a] = _mm256_setzero_ps();
    for (int64_t sb = 0; sb < nsb; sb++) {
#ifdef DIRECT_MCA
        __asm volatile("# LLVM-MCA-BEGIN k%c0_mr%c1" ::"i"(qtype), "i"(MR));
#endif
        kdirect_sb(qtype, MR, row, sb, xa, pfd, acc, accm);
#ifdef DIRECT_MCA
        __asm volatile("# LLVM-MCA-END");
#endif
    }
    _Pragma("GCC unroll 4")
    for (int a = 0; a < MR; a++) out[a * os] = hsum256(_mm256_add_ps(acc[a], accm[a]));
}

/* The fp16 scales d of the nv (<= 8) Q8_0 blocks at p (34 bytes each) as floats, 0 past nv. */
static inline __attribute__((always_inline)) __m256 q8_scales8(const uint8_t *p, int nv) {
    __m128i h = _mm_setzero_si128();
    h = _mm_insert_epi16(h, kvq_rd16(p), 0);
    if (nv > 1) h = _mm_insert_epi16(h, kvq_rd16(p + 34), 1);
    if (nv > 2) h = _mm_insert_epi16(h, kvq_rd16(p + 68), 2);
    if (nv > 3) h = _mm_insert_epi16(h, kvq_rd16(p + 102), 3);
    if (nv > 4) h = _mm_insert_epi16(h, kvq_rd16(p + 136), 4);
    if (nv > 5) h = _mm_insert_epi16(h, kvq_rd16(p + 170), 5);
    if (nv > 6) h = _mm_insert_epi16(h, kvq_rd16(p + 204), 6);
    if (nv > 7) h = _mm_insert_epi16(h, kvq_rd16(p + 238), 7);
    return _mm256_cvtph_ps(h);
}

/* Q8_0 for more than DIRECT_MAX_M activation rows: one weight row at a time, 4 activation rows
 * sharing each block's |w| (the sign trick's weight half), and per 8 blocks one multiply of the 8
 * weight scales by the activation row's 8 scales, stored and broadcast back per block (a load,
 * not an ALU operation): per block and activation row a sign, vpmaddubsw, vpmaddwd, convert and
 * FMA, against the tile path's 8 operations. Each activation row has its own accumulator and the
 * same operation sequence whatever the grouping. */
static inline __attribute__((always_inline)) void q8rows_row(int MR, const uint8_t *row, const kact_t *xa, int64_t nb,
                                                             float *out, int64_t os, int64_t pfd) {
    __m256 acc[DIRECT_MAX_M];
    _Alignas(32) float sc[DIRECT_MAX_M][8];
    const __m256i ones = _mm256_set1_epi16(1);
    _Pragma("GCC unroll 4")
    for (int a = 0; a < MR; a++) acc[a] = _mm256_setzero_ps();
    for (int64_t g = 0; g < nb; g += 8) {
        const int nv = nb - g < 8 ? (int)(nb - g) : 8;
        const uint8_t *p = row + g * 34;
        if (DIRECT_PF)
            _Pragma("GCC unroll 5")
            for (int l = 0; l < 8 * 34; l += 64) _mm_prefetch((const char *)p + pfd + l, _MM_HINT_T0);
        const __m256 dw = q8_scales8(p, nv);
        _Pragma("GCC unroll 4")
        for (int a = 0; a < MR; a++) { /* past the last block: the row's next floats, never used */
            _mm256_store_ps(sc[a], _mm256_mul_ps(dw, _mm256_loadu_ps(xa[a].d + g)));
        }
        for (int b = 0; b < nv; b++) {
#ifdef DIRECT_MCA
            __asm volatile("# LLVM-MCA-BEGIN q8rows_mr%c0" ::"i"(MR));
#endif
            const __m256i w = _mm256_loadu_si256((const __m256i *)(p + 34 * b + 2));
            const __m256i aw = _mm256_sign_epi8(w, w);
            _Pragma("GCC unroll 4")
            for (int a = 0; a < MR; a++) {
                const __m256i x = _mm256_loadu_si256((const __m256i *)(xa[a].q + 32 * (g + b)));
                const __m256i i = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(x, w)), ones);
                acc[a] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), _mm256_broadcast_ss(&sc[a][b]), acc[a]);
            }
#ifdef DIRECT_MCA
            __asm volatile("# LLVM-MCA-END");
#endif
        }
    }
    _Pragma("GCC unroll 4")
    for (int a = 0; a < MR; a++) out[a * os] = hsum256(acc[a]);
}

#define KDIRECT_CASE(QT)                                                                                          \
    case QT:                                                                                                      \
        if (mr == 1) kdirect_row(QT, 1, row, xa, nsb, out, os, pfd);                                              \
        else if (mr == 2) kdirect_row(QT, 2, row, xa, nsb, out, os, pfd);                                         \
        else if (mr == 3) kdirect_row(QT, 3, row, xa, nsb, out, os, pfd);                                         \
        else kdirect_row(QT, 4, row, xa, nsb, out, os, pfd);                                                      \
        break;

static void kdirect_group(int qtype, int mr, const uint8_t *row, const kact_t *xa, int64_t nsb, float *out, int64_t os,
                          int64_t pfd) {
    switch (qtype) {
        KDIRECT_CASE(KVQ_Q4_K)
        KDIRECT_CASE(KVQ_Q5_K)
        KDIRECT_CASE(KVQ_Q6_K)
    case KVQ_Q8_0:
        if (mr == 1) q8rows_row(1, row, xa, nsb, out, os, pfd);
        else if (mr == 2) q8rows_row(2, row, xa, nsb, out, os, pfd);
        else if (mr == 3) q8rows_row(3, row, xa, nsb, out, os, pfd);
        else q8rows_row(4, row, xa, nsb, out, os, pfd);
        break;
    default:
        break;
    }
}

static int kdirect_ok(int qtype, int64_t M) {
    if (qtype == KVQ_Q8_0) return Q8ROWS && M <= KDIRECT_MAX_ACT;
    return (qtype == KVQ_Q4_K || qtype == KVQ_Q5_K || qtype == KVQ_Q6_K) && M <= KDIRECT_MAX_ACT;
}

#if defined(KVQ_VNNI512)
/* Q8_0 (kvq_gemm_rows at every row count, kvq_gemm above DIRECT_MAX_M rows) on AVX-512 VNNI: one
 * weight row at a time, two blocks per zmm, up to ZDIRECT_MR activation rows sharing it. The
 * signed x signed product goes through vpdpbusd by storing the activation codes biased by +128
 * (unsigned; once per call): dpbusd(-128 sum w, x + 128, w) = sum x w exactly, where -128 sum w
 * (4 codes per int32 lane) is one vpdpbusd of 128s and a negation per weight block pair, shared
 * by every activation row. Per block pair and activation row: one vpdpbusd, one convert, the pair's
 * two scales d_w d_x spread over their 8 lanes (one vpermps of the 8 blocks' products) and one
 * FMA, against 10 operations for q8rows_row's two blocks. Each activation row has its own
 * accumulator and the same operation sequence whatever MR is. Measured on the 2-core Zen 5
 * EPYC, SmolLM2's head (Q8_0 49152 x 576, benchmarks/cpu_quant_kernels.py, load ~1), ms at 6 /
 * 8 / 16 / 32 rows, q8rows_row -> this: 1 thread 3.36 / 4.16 / 8.33 / 17.1 -> 1.83 / 2.25 / 4.40
 * / 8.95, 2 threads 1.67 / 2.06 / 7.63 / 12.7 -> 0.92 / 1.12 / 2.29 / 6.62; as kvq_gemm_rows at
 * 2 threads (load ~1) 0.72 / 0.87 / 1.30 at 1 / 2 / 4 rows -> 0.72 / 0.83 / 1.09. */
static inline __attribute__((always_inline)) void zq8rows_row(int MR, const uint8_t *row, const uint8_t *const *xu,
                                                              const kact_t *xa, int64_t nb, float *out, int64_t os,
                                                              int64_t pfd) {
    __m512 acc[ZDIRECT_MR];
    const __m512i c128 = _mm512_set1_epi8((char)0x80);
    _Pragma("GCC unroll 8")
    for (int a = 0; a < MR; a++) acc[a] = _mm512_setzero_ps();
    for (int64_t g = 0; g < nb; g += 8) {
        const int nv = nb - g < 8 ? (int)(nb - g) : 8;
        const uint8_t *p = row + g * 34;
        if (DIRECT_PF)
            _Pragma("GCC unroll 5")
            for (int l = 0; l < 8 * 34; l += 64) _mm_prefetch((const char *)p + pfd + l, _MM_HINT_T0);
        const __m256 dw = q8_scales8(p, nv); /* 0 past the last block */
        __m512 sc[ZDIRECT_MR];
        _Pragma("GCC unroll 8")
        for (int a = 0; a < MR; a++) { /* past the last block: 0 times the row's next floats, never used */
            sc[a] = _mm512_castps256_ps512(_mm256_mul_ps(dw, _mm256_loadu_ps(xa[a].d + g)));
        }
        for (int b = 0; b < nv; b += 2) {
            const int two = b + 1 < nv;
            const __m256i lo = _mm256_loadu_si256((const __m256i *)(p + 34 * b + 2));
            const __m512i w = two ? _mm512_inserti64x4(_mm512_castsi256_si512(lo),
                                                       _mm256_loadu_si256((const __m256i *)(p + 34 * b + 36)), 1)
                                  : _mm512_zextsi256_si512(lo);
            const __m512i nc = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_dpbusd_epi32(_mm512_setzero_si512(), c128, w));
            const __m512i pick = _mm512_setr_epi32(b, b, b, b, b, b, b, b, b + 1, b + 1, b + 1, b + 1, b + 1, b + 1,
                                                   b + 1, b + 1);
            _Pragma("GCC unroll 8")
            for (int a = 0; a < MR; a++) {
                /* a lone last block: the zero upper half of w meets the padded row */
                const __m512i i = _mm512_dpbusd_epi32(nc, _mm512_loadu_si512((const void *)(xu[a] + 32 * (g + b))), w);
                const __m512 s = two ? _mm512_permutexvar_ps(pick, sc[a]) : _mm512_maskz_permutexvar_ps(0x00ff, pick, sc[a]);
                acc[a] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i), s, acc[a]);
            }
        }
    }
    _Alignas(64) float res[16];
    __m512 v[8];
    _Pragma("GCC unroll 8")
    for (int a = 0; a < 8; a++) v[a] = a < MR ? acc[a] : _mm512_setzero_ps();
    zreduce8(v, res);
    _Pragma("GCC unroll 8")
    for (int a = 0; a < MR; a++) out[a * os] = res[zslot(a)];
}

/* Rows [n0, n1) of Q8_0 for M <= KDIRECT_MAX_ACT activation rows, one weight row at a time. */
static void gemm_zq8rows(const uint8_t *w, int64_t wrb, const uint8_t *x, const float *bias, float *out,
                         int64_t out_stride, int64_t M, int64_t K, int64_t n0, int64_t n1) {
    const int64_t xstride = kvq_act_stride(K), nb = K / KVQ_QK, ub = (K + 32 + 63) / 64 * 64;
    _Alignas(64) uint8_t stack[DIRECT_STACK];
    uint8_t *buf = M * ub <= DIRECT_STACK ? stack : (uint8_t *)aligned_alloc(64, (size_t)(M * ub));
    if (buf == NULL) return;
    kact_t xa[KDIRECT_MAX_ACT];
    const uint8_t *xu[KDIRECT_MAX_ACT];
    for (int64_t m = 0; m < M; m++) {
        const uint8_t *r = x + m * xstride;
        uint8_t *u = buf + m * ub;
        for (int64_t k = 0; k < K; k++) u[k] = r[k] ^ 0x80;
        memset(u + K, 0, (size_t)(ub - K)); /* an odd block count's last pair reads 32 bytes past K */
        xa[m].q = r, xa[m].d = (const float *)(r + K), xa[m].s = xa[m].d + nb, xu[m] = u;
    }
    const int64_t pfd = (DIRECT_PF + wrb - 1) / wrb * wrb;
    for (int64_t n = n0; n < n1; n++) {
        for (int64_t a0 = 0; a0 < M; a0 += ZDIRECT_MR) {
            const int ma = M - a0 < ZDIRECT_MR ? (int)(M - a0) : ZDIRECT_MR;
            const uint8_t *row = w + n * wrb;
            float *o = out + a0 * out_stride + n;
            switch (ma) {
            case 1: zq8rows_row(1, row, xu + a0, xa + a0, nb, o, out_stride, pfd); break;
            case 2: zq8rows_row(2, row, xu + a0, xa + a0, nb, o, out_stride, pfd); break;
            case 3: zq8rows_row(3, row, xu + a0, xa + a0, nb, o, out_stride, pfd); break;
            case 4: zq8rows_row(4, row, xu + a0, xa + a0, nb, o, out_stride, pfd); break;
            case 5: zq8rows_row(5, row, xu + a0, xa + a0, nb, o, out_stride, pfd); break;
            case 6: zq8rows_row(6, row, xu + a0, xa + a0, nb, o, out_stride, pfd); break;
            case 7: zq8rows_row(7, row, xu + a0, xa + a0, nb, o, out_stride, pfd); break;
            default: zq8rows_row(8, row, xu + a0, xa + a0, nb, o, out_stride, pfd); break;
            }
        }
        if (bias != NULL)
            for (int64_t m = 0; m < M; m++) out[m * out_stride + n] += bias[n];
    }
    if (buf != stack) free(buf);
}
#endif

/* Rows [n0, n1) for M <= KDIRECT_MAX_ACT activation rows, one weight row at a time. */
static void gemm_kdirect(int qtype, const uint8_t *w, int64_t wrb, const uint8_t *x, const float *bias, float *out,
                         int64_t out_stride, int64_t M, int64_t K, int64_t n0, int64_t n1) {
#if defined(KVQ_VNNI512)
    if (qtype == KVQ_Q8_0) {
        gemm_zq8rows(w, wrb, x, bias, out, out_stride, M, K, n0, n1);
        return;
    }
#endif
    /* nsb: super-blocks, or for Q8_0 its 32-value blocks */
    const int64_t xstride = kvq_act_stride(K), nb = K / KVQ_QK, nsb = qtype == KVQ_Q8_0 ? nb : K / KVQ_QK_K;
    kact_t xa[KDIRECT_MAX_ACT];
    for (int64_t m = 0; m < M; m++) {
        const uint8_t *r = x + m * xstride;
        xa[m].q = r, xa[m].d = (const float *)(r + K), xa[m].s = xa[m].d + nb;
    }
    const int64_t pfd = (DIRECT_PF + wrb - 1) / wrb * wrb; /* the same bytes whole rows ahead */
    for (int64_t n = n0; n < n1; n++) {
        for (int64_t a0 = 0; a0 < M; a0 += DIRECT_MAX_M) {
            const int ma = M - a0 < DIRECT_MAX_M ? (int)(M - a0) : DIRECT_MAX_M;
            kdirect_group(qtype, ma, w + n * wrb, xa + a0, nsb, out + a0 * out_stride + n, out_stride, pfd);
        }
        if (bias != NULL)
            for (int64_t m = 0; m < M; m++) out[m * out_stride + n] += bias[n];
    }
}
#endif

/* ---- GEMM drivers ---- */

/* rowwise (kvq_gemm_rows): one kernel for every row count up to 48, so an output value is the
 * same bits whatever M is. Q8_0 goes one weight row at a time (q8rows_row; AVX-512 VNNI
 * zq8rows_row) at every M instead of
 * the direct kernels' row groups at 1-4 rows (for a vocabulary-sized head also the faster one:
 * SmolLM2's 49152 x 576 on one Zen 3 core 1.71 / 2.25 / 3.54 / 6.80 ms at 1 / 2 / 4 / 8 rows
 * against 1.96 / 2.67 / 4.73 / 6.96, benchmarks/head_rows_bench.py); Q5_0 stays on the direct
 * kernels above 16 rows instead of the tile path. */
static void gemm_range(int qtype, const void *w, int64_t w_row_bytes, const void *xq, const float *bias, float *out,
                       int64_t out_stride, int64_t M, int64_t K, int64_t n0, int64_t n1, int rowwise) {
    const kvq_format *f = kvq_format_of(qtype);
    if (f == NULL || K % f->block_size != 0) return;
#if defined(KVQ_AVX2)
    if (rowwise && qtype == KVQ_Q8_0 && kdirect_ok(qtype, M)) {
        gemm_kdirect(qtype, (const uint8_t *)w, w_row_bytes, (const uint8_t *)xq, bias, out, out_stride, M, K, n0, n1);
        return;
    }
    if (direct_ok(qtype, M) || (rowwise && qtype != KVQ_Q8_0 && direct_max_rows(qtype) > 0 && M <= DIRECT_MAX_ACT)) {
        gemm_direct(qtype, (const uint8_t *)w, w_row_bytes, (const uint8_t *)xq, bias, out, out_stride, M, K, n0, n1);
        return;
    }
#if defined(KVQ_VNNI512)
    /* Above DIRECT_MAX_ACT rows Q4_0 / Q4_1 / Q5_0 take gemm_zdirect over even chunks of at most
     * DIRECT_MAX_ACT rows (the weight streams once per chunk) instead of the tile path: Zen 5, 1
     * thread, Q4_1 576 x 1536 at 64 / 128 / 256 rows 1.36 / 2.82 / 5.27 ms on the tile path
     * against ~0.48 ms per 48-row chunk (DEQUANT_MIN_ROWS in kernels/cpu_quant.py). */
    if (direct_max_rows(qtype) == DIRECT_MAX_ACT) {
        const int64_t chunks = (M + DIRECT_MAX_ACT - 1) / DIRECT_MAX_ACT, xstride = kvq_act_stride(K);
        for (int64_t c = 0, m0 = 0; c < chunks; c++) {
            const int64_t m1 = M * (c + 1) / chunks;
            gemm_direct(qtype, (const uint8_t *)w, w_row_bytes, (const uint8_t *)xq + m0 * xstride, bias,
                        out + m0 * out_stride, out_stride, m1 - m0, K, n0, n1);
            m0 = m1;
        }
        return;
    }
#endif
    if (kdirect_ok(qtype, M)) {
        gemm_kdirect(qtype, (const uint8_t *)w, w_row_bytes, (const uint8_t *)xq, bias, out, out_stride, M, K, n0, n1);
        return;
    }
#endif
    _Alignas(64) int8_t tq[KVQ_TILE_ROWS * TQ_STRIDE];
    _Alignas(64) float tsc[KVQ_TILE_ROWS * TSC_STRIDE];
    _Alignas(64) float toff[KVQ_TILE_ROWS * TOFF_STRIDE];
    const tile_t t = {tq, tsc, toff};
    const int64_t xstride = kvq_act_stride(K), nbk = K / KVQ_QK;
    const uint8_t *x = (const uint8_t *)xq;
    for (int64_t n = n0; n < n1; n += KVQ_TILE_ROWS) {
        int nr = n1 - n < KVQ_TILE_ROWS ? (int)(n1 - n) : KVQ_TILE_ROWS;
        for (int64_t k0 = 0; k0 < K; k0 += KVQ_CHUNK) {
            int64_t kc = K - k0 < KVQ_CHUNK ? K - k0 : KVQ_CHUNK, nb = kc / KVQ_QK, b0 = k0 / KVQ_QK;
            for (int r = 0; r < nr; r++)
                kvq_unpack(f, (const uint8_t *)w + (n + r) * w_row_bytes, k0, kc, tq + r * TQ_STRIDE,
                           tsc + r * TSC_STRIDE, toff + r * TOFF_STRIDE);
            for (int64_t m = 0; m < M; m++) {
                const uint8_t *row = x + m * xstride;
                const float *xd = (const float *)(row + K);
                float res[KVQ_TILE_ROWS];
                tile_dot(f, nr, t, (const int8_t *)row + k0, xd + b0, xd + nbk + 2 * b0, nb, res);
                float *o = out + m * out_stride + n;
                for (int r = 0; r < nr; r++) o[r] = k0 == 0 ? res[r] : o[r] + res[r];
            }
        }
        if (bias != NULL)
            for (int64_t m = 0; m < M; m++)
                for (int r = 0; r < nr; r++) out[m * out_stride + n + r] += bias[n + r];
    }
}

void kvq_gemm_range(int qtype, const void *w, int64_t w_row_bytes, const void *xq, const float *bias, float *out,
                    int64_t out_stride, int64_t M, int64_t N, int64_t K, int64_t n0, int64_t n1) {
    (void)N;
    gemm_range(qtype, w, w_row_bytes, xq, bias, out, out_stride, M, K, n0, n1, 0);
}

static void gemm_parallel(int qtype, const void *w, int64_t w_row_bytes, const void *xq, const float *bias,
                          float *out, int64_t out_stride, int64_t M, int64_t N, int64_t K, int rowwise) {
    /* Each thread takes one contiguous share of whole tiles: sequential weight streams. */
    const int64_t tiles = (N + KVQ_TILE_ROWS - 1) / KVQ_TILE_ROWS;
#pragma omp parallel if (N * K >= 65536)
    {
        int64_t nt = 1, id = 0;
#if defined(_OPENMP)
        nt = omp_get_num_threads(), id = omp_get_thread_num();
#endif
        int64_t n0 = tiles * id / nt * KVQ_TILE_ROWS, n1 = tiles * (id + 1) / nt * KVQ_TILE_ROWS;
        if (n1 > N) n1 = N;
        if (n0 < n1) gemm_range(qtype, w, w_row_bytes, xq, bias, out, out_stride, M, K, n0, n1, rowwise);
    }
}

void kvq_gemm(int qtype, const void *w, int64_t w_row_bytes, const void *xq, const float *bias, float *out,
              int64_t out_stride, int64_t M, int64_t N, int64_t K) {
    gemm_parallel(qtype, w, w_row_bytes, xq, bias, out, out_stride, M, N, K, 0);
}

void kvq_gemm_rows(int qtype, const void *w, int64_t w_row_bytes, const void *xq, const float *bias, float *out,
                   int64_t out_stride, int64_t M, int64_t N, int64_t K) {
    gemm_parallel(qtype, w, w_row_bytes, xq, bias, out, out_stride, M, N, K, 1);
}
