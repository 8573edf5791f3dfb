/* Row operations and decode attention of the quantized decoder stack (decoder_stack_f32.c):
 * fp32, portable C written for the compiler's vectorizer (AVX2, AVX-512, NEON alike). Private to
 * the stack; every function computes a row the same way whichever thread runs it.
 */
#ifndef KVSERVE_STACK_OPS_H
#define KVSERVE_STACK_OPS_H

#include <math.h>
#include <stdint.h>
#include <string.h>

/* GCC keeps loops with float compares (clamps, maxima) scalar unless FP compares may be assumed
 * not to trap; nothing here relies on FP exceptions. (Clang assumes it by default.) */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

#if defined(__GNUC__)
#define KVQS_INLINE static inline __attribute__((always_inline))
#else
#define KVQS_INLINE static inline
#endif

/* The library is built with -ffp-contract=off (the dequantization must round like the gguf
 * package), so products are fused explicitly where the hardware has FMA; elsewhere fmaf would be
 * a libm call, so it is a plain multiply-add there. */
#if defined(__FMA__) || defined(__ARM_FEATURE_FMA) || defined(__aarch64__)
#define KVQS_FMA(a, b, c) fmaf((a), (b), (c))
#else
#define KVQS_FMA(a, b, c) ((a) * (b) + (c))
#endif

/* Eight fp32 lanes for the attention loops, whose accumulators must stay in registers (arrays
 * indexed in a loop stay in memory: the compiler cannot prove the cache rows don't alias them):
 * one AVX2 register, two NEON registers, or plain C arrays at the baseline. */
#if !defined(KVQ_SCALAR) && defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
typedef __m256 kvqs_v8;
KVQS_INLINE kvqs_v8 v8_zero(void) { return _mm256_setzero_ps(); }
KVQS_INLINE kvqs_v8 v8_load(const float *p) { return _mm256_loadu_ps(p); }
KVQS_INLINE void v8_store(float *p, kvqs_v8 v) { _mm256_storeu_ps(p, v); }
KVQS_INLINE kvqs_v8 v8_set1(float x) { return _mm256_set1_ps(x); }
KVQS_INLINE kvqs_v8 v8_fma(kvqs_v8 a, kvqs_v8 b, kvqs_v8 c) { return _mm256_fmadd_ps(a, b, c); }
KVQS_INLINE kvqs_v8 v8_mul(kvqs_v8 a, kvqs_v8 b) { return _mm256_mul_ps(a, b); }
KVQS_INLINE kvqs_v8 v8_add(kvqs_v8 a, kvqs_v8 b) { return _mm256_add_ps(a, b); }
KVQS_INLINE float v8_sum(kvqs_v8 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
/* AVX-512 builds run the attention's lane-wise loops on 16 lanes (the same values: each lane's
 * operations are the 8-lane code's) and score two keys per register (pair_scores16). */
#if defined(__AVX512F__)
#define KVQS_ZMM 1
#endif
#elif !defined(KVQ_SCALAR) && defined(__aarch64__) && defined(__ARM_NEON)
#include <arm_neon.h>
typedef struct { float32x4_t lo, hi; } kvqs_v8;
KVQS_INLINE kvqs_v8 v8_zero(void) { kvqs_v8 r = {vdupq_n_f32(0.f), vdupq_n_f32(0.f)}; return r; }
KVQS_INLINE kvqs_v8 v8_load(const float *p) { kvqs_v8 r = {vld1q_f32(p), vld1q_f32(p + 4)}; return r; }
KVQS_INLINE void v8_store(float *p, kvqs_v8 v) { vst1q_f32(p, v.lo), vst1q_f32(p + 4, v.hi); }
KVQS_INLINE kvqs_v8 v8_set1(float x) { kvqs_v8 r = {vdupq_n_f32(x), vdupq_n_f32(x)}; return r; }
KVQS_INLINE kvqs_v8 v8_fma(kvqs_v8 a, kvqs_v8 b, kvqs_v8 c) {
    kvqs_v8 r = {vfmaq_f32(c.lo, a.lo, b.lo), vfmaq_f32(c.hi, a.hi, b.hi)};
    return r;
}
KVQS_INLINE kvqs_v8 v8_mul(kvqs_v8 a, kvqs_v8 b) { kvqs_v8 r = {vmulq_f32(a.lo, b.lo), vmulq_f32(a.hi, b.hi)}; return r; }
KVQS_INLINE kvqs_v8 v8_add(kvqs_v8 a, kvqs_v8 b) { kvqs_v8 r = {vaddq_f32(a.lo, b.lo), vaddq_f32(a.hi, b.hi)}; return r; }
KVQS_INLINE float v8_sum(kvqs_v8 v) { return vaddvq_f32(vaddq_f32(v.lo, v.hi)); }
#else
typedef struct { float x[8]; } kvqs_v8;
KVQS_INLINE kvqs_v8 v8_zero(void) { kvqs_v8 r; for (int l = 0; l < 8; ++l) r.x[l] = 0.f; return r; }
KVQS_INLINE kvqs_v8 v8_load(const float *p) { kvqs_v8 r; memcpy(r.x, p, sizeof r.x); return r; }
KVQS_INLINE void v8_store(float *p, kvqs_v8 v) { memcpy(p, v.x, sizeof v.x); }
KVQS_INLINE kvqs_v8 v8_set1(float x) { kvqs_v8 r; for (int l = 0; l < 8; ++l) r.x[l] = x; return r; }
KVQS_INLINE kvqs_v8 v8_fma(kvqs_v8 a, kvqs_v8 b, kvqs_v8 c) {
    for (int l = 0; l < 8; ++l) c.x[l] = KVQS_FMA(a.x[l], b.x[l], c.x[l]);
    return c;
}
KVQS_INLINE kvqs_v8 v8_mul(kvqs_v8 a, kvqs_v8 b) { for (int l = 0; l < 8; ++l) a.x[l] *= b.x[l]; return a; }
KVQS_INLINE kvqs_v8 v8_add(kvqs_v8 a, kvqs_v8 b) { for (int l = 0; l < 8; ++l) a.x[l] += b.x[l]; return a; }
KVQS_INLINE float v8_sum(kvqs_v8 v) {
    float s = 0.f;
    for (int l = 0; l < 8; ++l) s += v.x[l];
    return s;
}
#endif

enum {
    KVQS_MAX_HEAD_DIM = 256,
    KVQS_MAX_GROUP = 16, /* query heads per KV head */
    KVQS_TILE = 32,      /* keys per online-softmax step */
    KVQS_LANES = 8,      /* accumulator lanes of the dot products (one AVX2 register, two NEON) */
    KVQS_MAX_SPLITS = 8, /* context splits of one (row, KV head) attention item */
};

/* exp(x) in plain float arithmetic the vectorizer can turn into SIMD (libm's expf stays scalar
 * without -ffast-math): x = n ln2 + r with |r| <= ln2 / 2, e^r by its degree-6 Taylor
 * polynomial (relative error < 2e-7), 2^n put into the exponent bits. x is clamped to the range
 * where the result is a normal float. */
KVQS_INLINE float kvqs_exp(float x) {
    x = x < -87.3f ? -87.3f : (x > 88.3f ? 88.3f : x);
    const float n = (x * 1.44269504f + 12582912.f) - 12582912.f; /* round to nearest (1.5 * 2^23) */
    const float r = (x - n * 0.693145752f) - n * 1.42860677e-6f;  /* ln2 split for exact n * ln2_hi */
    float p = 1.f / 720;
    p = p * r + 1.f / 120;
    p = p * r + 1.f / 24;
    p = p * r + 1.f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.f;
    p = p * r + 1.f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return p * scale;
}

/* out[i] <- residual[i] * inv * w[i], i < n; in 8-lane steps (the compiler left the plain loops
 * scalar: it cannot rule out that the rows overlap). */
KVQS_INLINE void scale_row(const float *residual, float inv, const float *w, float *out, int64_t n) {
    const kvqs_v8 iv = v8_set1(inv);
    int64_t i = 0;
    for (; i + KVQS_LANES <= n; i += KVQS_LANES) v8_store(out + i, v8_mul(v8_mul(v8_load(residual + i), iv), v8_load(w + i)));
    for (; i < n; ++i) out[i] = residual[i] * inv * w[i];
}

/* residual <- x + residual (x NULL: unchanged); out <- rmsnorm(residual) * w, fp32 like F.rms_norm.
 * Lane l of the sum of squares takes the values i = l mod 8 in order. */
static void add_rmsnorm(const float *x, float *residual, const float *w, float *out, int64_t n, float eps) {
    float lanes[KVQS_LANES];
    kvqs_v8 acc = v8_zero();
    int64_t i = 0;
    for (; i + KVQS_LANES <= n; i += KVQS_LANES) {
        const kvqs_v8 r = x ? v8_add(v8_load(x + i), v8_load(residual + i)) : v8_add(v8_zero(), v8_load(residual + i));
        v8_store(residual + i, r);
        acc = v8_fma(r, r, acc);
    }
    v8_store(lanes, acc);
    float ss = 0.f;
    for (; i < n; ++i) {
        const float r = (x ? x[i] : 0.f) + residual[i];
        residual[i] = r;
        ss += r * r;
    }
    for (int l = 0; l < KVQS_LANES; ++l) ss += lanes[l];
    scale_row(residual, 1.f / sqrtf(ss / (float)n + eps), w, out, n);
}

/* out <- rmsnorm(x) * w (add_rmsnorm's arithmetic, x left as it is). */
static void rmsnorm(const float *x, const float *w, float *out, int64_t n, float eps) {
    float lanes[KVQS_LANES];
    kvqs_v8 acc = v8_zero();
    int64_t i = 0;
    for (; i + KVQS_LANES <= n; i += KVQS_LANES) acc = v8_fma(v8_load(x + i), v8_load(x + i), acc);
    v8_store(lanes, acc);
    float ss = 0.f;
    for (; i < n; ++i) ss += x[i] * x[i];
    for (int l = 0; l < KVQS_LANES; ++l) ss += lanes[l];
    scale_row(x, 1.f / sqrtf(ss / (float)n + eps), w, out, n);
}

/* HF's rotate-half RoPE of nh heads of D values: out = x rotated; cs = [cos | sin], D/2 each. */
static void rope_heads(const float *x, float *out, int nh, int D, const float *cs) {
    const int half = D / 2;
    const float *c = cs, *s = cs + half;
    for (int h = 0; h < nh; ++h) {
        const float *x1 = x + (int64_t)h * D, *x2 = x1 + half;
        float *o1 = out + (int64_t)h * D, *o2 = o1 + half;
        for (int i = 0; i < half; ++i) {
            const float a = x1[i], b = x2[i];
            o1[i] = a * c[i] - b * s[i];
            o2[i] = b * c[i] + a * s[i];
        }
    }
}

/* rope_heads after a per-head RMSNorm by w [D] (q_norm / k_norm); w NULL: rope_heads. */
static void norm_rope_heads(const float *x, float *out, int nh, int D, const float *cs, const float *w, float eps) {
    if (!w) {
        rope_heads(x, out, nh, D, cs);
        return;
    }
    float t[KVQS_MAX_HEAD_DIM];
    for (int h = 0; h < nh; ++h) {
        rmsnorm(x + (int64_t)h * D, w, t, D, eps);
        rope_heads(t, out + (int64_t)h * D, 1, D, cs);
    }
}

/* Scores of up to KVQS_TILE keys for one query head: s[j] = q . k[j] * scale, four keys at a
 * time in register accumulators (DV = D / 8 lane groups). */
KVQS_INLINE void tile_scores(const float *q, const float *const *k, int n, const int DV, float scale, float *s) {
    int j = 0;
    for (; j + 4 <= n; j += 4) {
        kvqs_v8 a0 = v8_zero(), a1 = v8_zero(), a2 = v8_zero(), a3 = v8_zero();
        const float *k0 = k[j], *k1 = k[j + 1], *k2 = k[j + 2], *k3 = k[j + 3];
        for (int c = 0; c < DV; ++c) {
            const kvqs_v8 qv = v8_load(q + 8 * c);
            a0 = v8_fma(qv, v8_load(k0 + 8 * c), a0);
            a1 = v8_fma(qv, v8_load(k1 + 8 * c), a1);
            a2 = v8_fma(qv, v8_load(k2 + 8 * c), a2);
            a3 = v8_fma(qv, v8_load(k3 + 8 * c), a3);
        }
        s[j] = v8_sum(a0) * scale, s[j + 1] = v8_sum(a1) * scale;
        s[j + 2] = v8_sum(a2) * scale, s[j + 3] = v8_sum(a3) * scale;
    }
    for (; j < n; ++j) {
        kvqs_v8 a = v8_zero();
        for (int c = 0; c < DV; ++c) a = v8_fma(v8_load(q + 8 * c), v8_load(k[j] + 8 * c), a);
        s[j] = v8_sum(a) * scale;
    }
}

/* acc [DV lane groups] += sum over j < n of p[j] * v[j]; acc stays in registers for constant DV. */
KVQS_INLINE void accumulate_values(float *acc, const float *p, const float *const *v, int n, const int DV,
                                   float alpha) {
    enum { MAXV = KVQS_MAX_HEAD_DIM / 8 };
    kvqs_v8 a[MAXV];
    const kvqs_v8 al = v8_set1(alpha);
    for (int c = 0; c < DV; ++c) a[c] = alpha != 1.f ? v8_mul(v8_load(acc + 8 * c), al) : v8_load(acc + 8 * c);
    for (int j = 0; j < n; ++j) {
        const kvqs_v8 pj = v8_set1(p[j]);
        for (int c = 0; c < DV; ++c) a[c] = v8_fma(pj, v8_load(v[j] + 8 * c), a[c]);
    }
    for (int c = 0; c < DV; ++c) v8_store(acc + 8 * c, a[c]);
}

/* The online-softmax update of a query head's running partial pg [D + 2] (weighted values, max
 * score, sum of exp) by a tile of n keys whose scores are sc: the rescale by the new max, the
 * values. */
KVQS_INLINE void tile_softmax(float *pg, const float *const *vp, int n, const int D, float *sc) {
    float mx = pg[D];
    for (int j = 0; j < n; ++j) mx = sc[j] > mx ? sc[j] : mx;
    const float alpha = pg[D] == -INFINITY ? 0.f : kvqs_exp(pg[D] - mx);
    for (int j = 0; j < n; ++j) sc[j] = kvqs_exp(sc[j] - mx);
    float sum = 0.f;
    for (int j = 0; j < n; ++j) sum += sc[j];
    pg[D] = mx;
    pg[D + 1] = pg[D + 1] * alpha + sum;
    accumulate_values(pg, sc, vp, n, D / 8, alpha);
}

#ifdef KVQS_ZMM
/* kvqs_exp on 16 lanes, the same operations (the clamps keep a NaN as the compares do). */
KVQS_INLINE __m512 kvqs_exp16(__m512 x) {
    x = _mm512_max_ps(_mm512_set1_ps(-87.3f), _mm512_min_ps(_mm512_set1_ps(88.3f), x));
    const __m512 big = _mm512_set1_ps(12582912.f);
    const __m512 n = _mm512_sub_ps(_mm512_add_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), big), big);
    const __m512 r = _mm512_sub_ps(_mm512_sub_ps(x, _mm512_mul_ps(n, _mm512_set1_ps(0.693145752f))),
                                   _mm512_mul_ps(n, _mm512_set1_ps(1.42860677e-6f)));
    __m512 p = _mm512_set1_ps(1.f / 720);
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.f / 120));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.f / 24));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.f / 6));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(0.5f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.f));
    const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvttps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(p, _mm512_castsi512_ps(bits));
}

/* tile_softmax for NH (<= 3) query heads at once, partials pg + h * stride and scores
 * sc + h * KVQS_TILE, D a multiple of 16, on 16 lanes: each head's values are tile_softmax's
 * (the same operations in the same order per value lane), but the heads' dependency chains (the
 * sum of exp, each lane's multiply-adds over the keys: 32 long) are independent and overlap
 * instead of one head waiting on its own latency, and each value row is loaded once for all. */
KVQS_INLINE void tile_softmax_heads(float *pg, int64_t stride, const float *const *vp, int n, const int D, float *sc,
                                    const int NH) {
    enum { MAXZ = KVQS_MAX_HEAD_DIM / 16 };
    float alpha[3], sum[3];
    for (int h = 0; h < NH; ++h) {
        float *p = pg + h * stride, *s = sc + h * KVQS_TILE;
        /* the max (of lanes that ignore NaN scores, as the plain loop does), then exp on 16 lanes */
        __m512 m = _mm512_set1_ps(p[D]);
        for (int j = 0; j < n; j += 16) {
            const __mmask16 k = n - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - j)) - 1);
            m = _mm512_mask_max_ps(m, k, _mm512_maskz_loadu_ps(k, s + j), m);
        }
        const float mx = _mm512_reduce_max_ps(m);
        alpha[h] = p[D] == -INFINITY ? 0.f : kvqs_exp(p[D] - mx);
        for (int j = 0; j < n; j += 16) {
            const __mmask16 k = n - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - j)) - 1);
            _mm512_mask_storeu_ps(s + j, k, kvqs_exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + j), _mm512_set1_ps(mx))));
        }
        p[D] = mx;
        sum[h] = 0.f;
    }
    for (int j = 0; j < n; ++j)
        for (int h = 0; h < NH; ++h) sum[h] += sc[h * KVQS_TILE + j];
    __m512 z[3][MAXZ];
    for (int h = 0; h < NH; ++h) {
        float *p = pg + h * stride;
        p[D + 1] = p[D + 1] * alpha[h] + sum[h];
        const __m512 al = _mm512_set1_ps(alpha[h]);
        for (int c = 0; c < D / 16; ++c)
            z[h][c] = alpha[h] != 1.f ? _mm512_mul_ps(_mm512_loadu_ps(p + 16 * c), al) : _mm512_loadu_ps(p + 16 * c);
    }
    for (int j = 0; j < n; ++j) {
        __m512 pj[3];
        for (int h = 0; h < NH; ++h) pj[h] = _mm512_set1_ps(sc[h * KVQS_TILE + j]);
        for (int c = 0; c < D / 16; ++c) {
            const __m512 v = _mm512_loadu_ps(vp[j] + 16 * c);
            for (int h = 0; h < NH; ++h) z[h][c] = _mm512_fmadd_ps(pj[h], v, z[h][c]);
        }
    }
    for (int h = 0; h < NH; ++h)
        for (int c = 0; c < D / 16; ++c) _mm512_storeu_ps(pg + h * stride + 16 * c, z[h][c]);
}

/* tile_softmax_heads over heads [g, g + nh) with a constant head count. */
KVQS_INLINE void tile_softmax_chunk(float *pg, int64_t stride, const float *const *vp, int n, const int D, float *sc,
                                    int nh) {
    switch (nh) {
    case 1: tile_softmax_heads(pg, stride, vp, n, D, sc, 1); break;
    case 2: tile_softmax_heads(pg, stride, vp, n, D, sc, 2); break;
    default: tile_softmax_heads(pg, stride, vp, n, D, sc, 3); break;
    }
}
#endif

/* One tile of n keys / values into a query head's running partial pg [D + 2]: the scores, then
 * tile_softmax. */
KVQS_INLINE void tile_update(float *pg, const float *q, const float *const *kp, const float *const *vp, int n,
                             const int D, float scale, float *sc) {
    tile_scores(q, kp, n, D / 8, scale, sc);
    tile_softmax(pg, vp, n, D, sc);
}

/* One attention item: the G query heads q [G, D] (rotated) of KV head kvh attend over context
 * positions [t0, t1) of a sequence, read in place from the paged caches through its block table,
 * except position tnew, whose key and value are knew and vnew (this step's token: what its slot
 * receives). The unnormalized result goes to part [G, D + 2]: per head the weighted sum of values,
 * the running max score and the sum of exp(score - max) (flash-decoding's partial, merged by
 * attn_merge). D is a multiple of 8; inlined with a constant D for the common sizes. Keys and
 * values come in tiles of KVQS_TILE positions; a tile's rows stay in L1 while each of the G heads
 * reads them. */
KVQS_INLINE void attn_partial_d(const float *kc, const float *vc, const float *q, const float *knew,
                                const float *vnew, int tnew, const int32_t *tab, int bs, int Hkv, int kvh,
                                const int D, int G, int t0, int t1, float scale, float *part) {
    float sc[KVQS_TILE];
    const float *kp[KVQS_TILE], *vp[KVQS_TILE];
    const int64_t stride = D + 2;
    for (int g = 0; g < G; ++g) {
        float *pg = part + g * stride;
        for (int d = 0; d < D; ++d) pg[d] = 0.f;
        pg[D] = -INFINITY;
        pg[D + 1] = 0.f;
    }
    int blk = t0 / bs, in_blk = t0 % bs; /* the block-table walk advances with t: no division per key */
    for (int ts = t0; ts < t1; ts += KVQS_TILE) {
        const int n = t1 - ts < KVQS_TILE ? t1 - ts : KVQS_TILE;
        for (int j = 0; j < n; ++j) {
            const int t = ts + j;
            const int64_t off = (((int64_t)tab[blk] * bs + in_blk) * Hkv + kvh) * D;
            kp[j] = t == tnew ? knew : kc + off;
            vp[j] = t == tnew ? vnew : vc + off;
            if (++in_blk == bs) in_blk = 0, ++blk;
        }
#ifdef KVQS_ZMM
        if (D % 16 == 0) {
            float sch[3 * KVQS_TILE];
            for (int g = 0; g < G; g += 3) {
                const int nh = G - g < 3 ? G - g : 3;
                for (int h = 0; h < nh; ++h) tile_scores(q + (int64_t)(g + h) * D, kp, n, D / 8, scale, sch + h * KVQS_TILE);
                tile_softmax_chunk(part + g * stride, stride, vp, n, D, sch, nh);
            }
            continue;
        }
#endif
        for (int g = 0; g < G; ++g) tile_update(part + g * stride, q + (int64_t)g * D, kp, vp, n, D, scale, sc);
    }
}

static void attn_partial(const float *kc, const float *vc, const float *q, const float *knew, const float *vnew,
                         int tnew, const int32_t *tab, int bs, int Hkv, int kvh, int D, int G, int t0, int t1,
                         float scale, float *part) {
    switch (D) {
    case 64:
        attn_partial_d(kc, vc, q, knew, vnew, tnew, tab, bs, Hkv, kvh, 64, G, t0, t1, scale, part);
        break;
    case 128:
        attn_partial_d(kc, vc, q, knew, vnew, tnew, tab, bs, Hkv, kvh, 128, G, t0, t1, scale, part);
        break;
    default:
        attn_partial_d(kc, vc, q, knew, vnew, tnew, tab, bs, Hkv, kvh, D, G, t0, t1, scale, part);
    }
}

/* Empty partials (sum 0, max -inf, weight 0) for the G heads of each of R rows; returns the end
 * of the longest row's span (rows end at t1[r], all start at t0). */
KVQS_INLINE int attn_rows_start(float *const *part, const int *t1, int R, int G, int D, int t0) {
    const int64_t stride = D + 2;
    int tmax = t0;
    for (int r = 0; r < R; ++r) {
        tmax = t1[r] > tmax ? t1[r] : tmax;
        for (int g = 0; g < G; ++g) {
            float *pg = part[r] + g * stride;
            for (int d = 0; d < D; ++d) pg[d] = 0.f;
            pg[D] = -INFINITY;
            pg[D + 1] = 0.f;
        }
    }
    return tmax;
}

/* attn_partial for R rows of one sequence (a speculative verify step's positions) whose items
 * start at the same position t0: row r's G query heads are q + r * G * D, its range [t0, t1[r]),
 * its own position tnew[r] with key knew + r * D and value vnew[r], its partial part[r]. Each
 * row's arithmetic is attn_partial's exactly (the same tiles from t0, the same operations in the
 * same order), so the partials are the same bits as R separate items; what is shared is the
 * reading: a tile's keys and values are fetched once for all R rows and their G heads (a one-row
 * split of the same context reads them R times, from memory once the cache outgrows L2). */
KVQS_INLINE void attn_partial_rows_d(const float *kc, const float *vc, const float *q, const float *knew,
                                     const float *const *vnew, const int *tnew, const int32_t *tab, int bs, int Hkv,
                                     int kvh, const int D, int G, int R, int t0, const int *t1, float scale,
                                     float *const *part) {
    float sc[KVQS_TILE];
    const float *kp[KVQS_TILE], *vp[KVQS_TILE];
    const int64_t stride = D + 2;
    const int tmax = attn_rows_start(part, t1, R, G, D, t0);
    int blk = t0 / bs, in_blk = t0 % bs;
    for (int ts = t0; ts < tmax; ts += KVQS_TILE) {
        const int nt = tmax - ts < KVQS_TILE ? tmax - ts : KVQS_TILE;
        for (int j = 0; j < nt; ++j) {
            const int64_t off = (((int64_t)tab[blk] * bs + in_blk) * Hkv + kvh) * D;
            kp[j] = kc + off;
            vp[j] = vc + off;
            if (++in_blk == bs) in_blk = 0, ++blk;
        }
        for (int r = 0; r < R; ++r) {
            const int n = t1[r] - ts < nt ? t1[r] - ts : nt;
            if (n <= 0) continue;
            /* this row's own position reads its new k and v, as attn_partial's does */
            const int jn = tnew[r] - ts;
            const float *ks = NULL, *vs = NULL;
            if (jn >= 0 && jn < n) ks = kp[jn], vs = vp[jn], kp[jn] = knew + (int64_t)r * D, vp[jn] = vnew[r];
            for (int g = 0; g < G; ++g)
                tile_update(part[r] + g * stride, q + ((int64_t)r * G + g) * D, kp, vp, n, D, scale, sc);
            if (ks) kp[jn] = ks, vp[jn] = vs;
        }
    }
}

#ifdef KVQS_ZMM
/* tile_scores for the 16 keys of 8 key pairs: kp2 holds pair i's step c (lanes 8c .. 8c+7 of
 * key 2i, then of key 2i+1) at kp2 + (i * DV + c) * 16, qd[c] step c of the query in both
 * halves. Each key's 8 lane sums are tile_scores' (the same fused multiply-adds in the same
 * order) and are added in v8_sum's tree, ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)), by
 * shuffles over the 8 registers at once instead of 6 operations per key. */
KVQS_INLINE void pair_scores16(const __m512 *qd, const float *kp2, const int DV, float scale, float *s) {
    __m512 a[8], c4[4], e[2];
    _Pragma("GCC unroll 8")
    for (int i = 0; i < 8; ++i) a[i] = _mm512_setzero_ps();
    for (int c = 0; c < DV; ++c)
        _Pragma("GCC unroll 8")
        for (int i = 0; i < 8; ++i) a[i] = _mm512_fmadd_ps(qd[c], _mm512_loadu_ps(kp2 + ((int64_t)i * DV + c) * 16), a[i]);
    /* 128-bit lane L of c4[i]: key 4i + L's l_k + l_k+4 */
    _Pragma("GCC unroll 4")
    for (int i = 0; i < 4; ++i)
        c4[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x88),
                              _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xdd));
    /* lane L of e[i]: [key 8i + L: t0 + t2, t1 + t3 | key 8i + 4 + L: the same] */
    _Pragma("GCC unroll 2")
    for (int i = 0; i < 2; ++i)
        e[i] = _mm512_add_ps(_mm512_shuffle_ps(c4[2 * i], c4[2 * i + 1], 0x44),
                             _mm512_shuffle_ps(c4[2 * i], c4[2 * i + 1], 0xee));
    /* element e of lane L: key 4e + L */
    const __m512 f = _mm512_add_ps(_mm512_shuffle_ps(e[0], e[1], 0x88), _mm512_shuffle_ps(e[0], e[1], 0xdd));
    const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    _mm512_storeu_ps(s, _mm512_mul_ps(_mm512_permutexvar_ps(order, f), _mm512_set1_ps(scale)));
}

/* attn_partial_rows_d on AVX-512: a tile's keys are copied once into pairs (pair_scores16's
 * layout) for all R * G query heads. Same values as the 8-lane code. */
KVQS_INLINE void attn_partial_rows_z(const float *kc, const float *vc, const float *q, const float *knew,
                                     const float *const *vnew, const int *tnew, const int32_t *tab, int bs, int Hkv,
                                     int kvh, const int D, int G, int R, int t0, const int *t1, float scale,
                                     float *const *part) {
    enum { MAXV = KVQS_MAX_HEAD_DIM / 8 };
    const int DV = D / 8;
    _Alignas(64) float kp2[KVQS_TILE * KVQS_MAX_HEAD_DIM];
    float sc[3 * KVQS_TILE];
    const float *kp[KVQS_TILE], *vp[KVQS_TILE];
    const int64_t stride = D + 2;
    const int tmax = attn_rows_start(part, t1, R, G, D, t0);
    int blk = t0 / bs, in_blk = t0 % bs;
    for (int ts = t0; ts < tmax; ts += KVQS_TILE) {
        const int nt = tmax - ts < KVQS_TILE ? tmax - ts : KVQS_TILE, n16 = (nt + 15) / 16 * 16;
        for (int j = 0; j < nt; ++j) {
            const int64_t off = (((int64_t)tab[blk] * bs + in_blk) * Hkv + kvh) * D;
            kp[j] = kc + off;
            vp[j] = vc + off;
            if (++in_blk == bs) in_blk = 0, ++blk;
        }
        for (int j = 0; j < n16; ++j) /* pairs; keys past nt are zeros (their scores unused) */
            for (int c = 0; c < DV; ++c) {
                float *dst = kp2 + (((int64_t)(j / 2) * DV + c) * 16 + (j % 2) * 8);
                _mm256_storeu_ps(dst, j < nt ? _mm256_loadu_ps(kp[j] + 8 * c) : _mm256_setzero_ps());
            }
        for (int r = 0; r < R; ++r) {
            const int n = t1[r] - ts < nt ? t1[r] - ts : nt;
            if (n <= 0) continue;
            /* this row's own position reads its new k and v, as attn_partial's does */
            const int jn = tnew[r] - ts;
            const float *vs = NULL;
            if (jn >= 0 && jn < n) vs = vp[jn], vp[jn] = vnew[r];
            for (int g = 0; g < G; g += 3) {
                const int nh = G - g < 3 ? G - g : 3;
                for (int h = 0; h < nh; ++h) {
                    const float *qg = q + ((int64_t)r * G + g + h) * D;
                    float *sh = sc + h * KVQS_TILE;
                    __m512 qd[MAXV];
                    for (int c = 0; c < DV; ++c)
                        qd[c] = _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_loadu_pd((const double *)(qg + 8 * c))));
                    for (int j = 0; j < n; j += 16) pair_scores16(qd, kp2 + (int64_t)j * DV * 8, DV, scale, sh + j);
                    if (vs) {
                        const float *kn = knew + (int64_t)r * D;
                        tile_scores(qg, &kn, 1, DV, scale, sh + jn);
                    }
                }
                tile_softmax_chunk(part[r] + g * stride, stride, vp, n, D, sc, nh);
            }
            if (vs) vp[jn] = vs;
        }
    }
}
#endif

static void attn_partial_rows(const float *kc, const float *vc, const float *q, const float *knew,
                              const float *const *vnew, const int *tnew, const int32_t *tab, int bs, int Hkv, int kvh,
                              int D, int G, int R, int t0, const int *t1, float scale, float *const *part) {
#ifdef KVQS_ZMM
    /* the pair copy pays off from about 4 query heads (2 rows of MHA: 1.3x the time) */
    if (R * G >= 4) switch (D) {
    case 64:
        attn_partial_rows_z(kc, vc, q, knew, vnew, tnew, tab, bs, Hkv, kvh, 64, G, R, t0, t1, scale, part);
        return;
    case 128:
        attn_partial_rows_z(kc, vc, q, knew, vnew, tnew, tab, bs, Hkv, kvh, 128, G, R, t0, t1, scale, part);
        return;
    default:
        if (D % 16 == 0) {
            attn_partial_rows_z(kc, vc, q, knew, vnew, tnew, tab, bs, Hkv, kvh, D, G, R, t0, t1, scale, part);
            return;
        }
    }
#endif
    switch (D) {
    case 64:
        attn_partial_rows_d(kc, vc, q, knew, vnew, tnew, tab, bs, Hkv, kvh, 64, G, R, t0, t1, scale, part);
        break;
    case 128:
        attn_partial_rows_d(kc, vc, q, knew, vnew, tnew, tab, bs, Hkv, kvh, 128, G, R, t0, t1, scale, part);
        break;
    default:
        attn_partial_rows_d(kc, vc, q, knew, vnew, tnew, tab, bs, Hkv, kvh, D, G, R, t0, t1, scale, part);
    }
}

/* out [D] <- the softmax-weighted values of one query head from its S (<= 8) partials (stride
 * apart). */
static void attn_merge(const float *part, int64_t stride, int S, int D, float *out) {
    float mx = -INFINITY, sum = 0.f, w[KVQS_MAX_SPLITS];
    for (int s = 0; s < S; ++s) mx = part[s * stride + D] > mx ? part[s * stride + D] : mx;
    for (int s = 0; s < S; ++s) {
        w[s] = expf(part[s * stride + D] - mx);
        sum += w[s] * part[s * stride + D + 1];
    }
    const kvqs_v8 inv = v8_set1(1.f / sum);
    for (int d = 0; d < D; d += KVQS_LANES) { /* D is a multiple of 8 */
        kvqs_v8 o = v8_zero();
        for (int s = 0; s < S; ++s) o = v8_add(o, v8_mul(v8_set1(w[s]), v8_load(part + s * stride + d)));
        v8_store(out + d, v8_mul(o, inv));
    }
}

/* row[i] <- silu(row[i]) * up[i] for i in [lo, hi). */
static void silu_mul(float *row, const float *up, int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) row[i] = row[i] / (1.f + kvqs_exp(-row[i])) * up[i];
}

/* row[i] <- gelu_tanh(row[i]) * up[i] for i in [lo, hi). gelu_tanh(x) = x (1 + tanh(y)) / 2 with
 * y = sqrt(2/pi) (x + 0.044715 x^3), which is x * sigmoid(2y): one vectorizable exp. */
static void gelu_tanh_mul(float *row, const float *up, int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
        const float x = row[i], y = 0.7978845608f * (x + 0.044715f * x * x * x);
        row[i] = x / (1.f + kvqs_exp(-2.f * y)) * up[i];
    }
}

static float half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h >> 15) << 31, exp = (h >> 10) & 0x1F, man = h & 0x3FF;
    uint32_t u;
    if (exp == 0x1F) {
        u = sign | 0x7F800000u | (man << 13);
    } else if (exp) {
        u = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man) { /* subnormal: renormalize */
        int e = -1;
        uint32_t m = man;
        do {
            ++e;
            m <<= 1;
        } while (!(m & 0x400));
        u = sign | ((uint32_t)(112 - e) << 23) | ((m & 0x3FF) << 13);
    } else {
        u = sign;
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

#endif
