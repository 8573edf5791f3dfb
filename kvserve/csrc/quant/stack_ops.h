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

enum {
    KVQS_MAX_HEAD_DIM = 256,
    KVQS_MAX_GROUP = 16, /* query heads per KV head */
    KVQS_TILE = 32,      /* keys per online-softmax step */
    KVQS_LANES = 8,      /* accumulator lanes of the dot products (one AVX2 register, two NEON) */
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

/* residual <- x + residual (x NULL: unchanged); out <- rmsnorm(residual) * w, fp32 like F.rms_norm. */
static void add_rmsnorm(const float *x, float *residual, const float *w, float *out, int64_t n, float eps) {
    float lanes[KVQS_LANES] = {0};
    int64_t i = 0;
    for (; i + KVQS_LANES <= n; i += KVQS_LANES)
        for (int l = 0; l < KVQS_LANES; ++l) {
            const float r = (x ? x[i + l] : 0.f) + residual[i + l];
            residual[i + l] = r;
            lanes[l] = KVQS_FMA(r, r, lanes[l]);
        }
    float ss = 0.f;
    for (; i < n; ++i) {
        const float r = (x ? x[i] : 0.f) + residual[i];
        residual[i] = r;
        ss += r * r;
    }
    for (int l = 0; l < KVQS_LANES; ++l) ss += lanes[l];
    const float inv = 1.f / sqrtf(ss / (float)n + eps);
    for (i = 0; i < n; ++i) out[i] = residual[i] * inv * w[i];
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

/* Scores of up to KVQS_TILE keys for one query head: s[j] = q . k[j] * scale. Four keys at a
 * time, each over KVQS_LANES-wide partial sums: independent accumulators instead of one long
 * dependency chain per dot. */
KVQS_INLINE void tile_scores(const float *q, const float *const *k, int n, int D, float scale, float *s) {
    int j = 0;
    for (; j + 4 <= n; j += 4) {
        float a0[KVQS_LANES] = {0}, a1[KVQS_LANES] = {0}, a2[KVQS_LANES] = {0}, a3[KVQS_LANES] = {0};
        const float *k0 = k[j], *k1 = k[j + 1], *k2 = k[j + 2], *k3 = k[j + 3];
        for (int d = 0; d < D; d += KVQS_LANES)
            for (int l = 0; l < KVQS_LANES; ++l) {
                a0[l] = KVQS_FMA(q[d + l], k0[d + l], a0[l]);
                a1[l] = KVQS_FMA(q[d + l], k1[d + l], a1[l]);
                a2[l] = KVQS_FMA(q[d + l], k2[d + l], a2[l]);
                a3[l] = KVQS_FMA(q[d + l], k3[d + l], a3[l]);
            }
        float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
        for (int l = 0; l < KVQS_LANES; ++l) s0 += a0[l], s1 += a1[l], s2 += a2[l], s3 += a3[l];
        s[j] = s0 * scale, s[j + 1] = s1 * scale, s[j + 2] = s2 * scale, s[j + 3] = s3 * scale;
    }
    for (; j < n; ++j) {
        float a[KVQS_LANES] = {0};
        for (int d = 0; d < D; d += KVQS_LANES)
            for (int l = 0; l < KVQS_LANES; ++l) a[l] = KVQS_FMA(q[d + l], k[j][d + l], a[l]);
        float s0 = 0.f;
        for (int l = 0; l < KVQS_LANES; ++l) s0 += a[l];
        s[j] = s0 * scale;
    }
}

/* One attention item: the G query heads q [G, D] (rotated) of KV head kvh attend over context
 * positions [t0, t1) of a sequence, read in place from the paged caches through its block table,
 * except position tnew, whose key and value are knew and vnew (this step's token: what its slot
 * receives). The unnormalized result goes to part [G, D + 2]: per head the weighted sum of values,
 * the running max score and the sum of exp(score - max) (flash-decoding's partial, merged by
 * attn_merge). D is a multiple of KVQS_LANES; inlined with a constant D for the common sizes. */
KVQS_INLINE void attn_partial_d(const float *kc, const float *vc, const float *q, const float *knew,
                                const float *vnew, int tnew, const int32_t *tab, int bs, int Hkv, int kvh,
                                const int D, int G, int t0, int t1, float scale, float *part) {
    float sc[KVQS_MAX_GROUP * KVQS_TILE];
    const float *kp[KVQS_TILE], *vp[KVQS_TILE];
    const int64_t stride = D + 2;
    for (int g = 0; g < G; ++g) {
        float *pg = part + g * stride;
        for (int d = 0; d < D; ++d) pg[d] = 0.f;
        pg[D] = -INFINITY;
        pg[D + 1] = 0.f;
    }
    for (int ts = t0; ts < t1; ts += KVQS_TILE) {
        const int n = t1 - ts < KVQS_TILE ? t1 - ts : KVQS_TILE;
        for (int j = 0; j < n; ++j) {
            const int t = ts + j;
            const int64_t off = (((int64_t)tab[t / bs] * bs + t % bs) * Hkv + kvh) * D;
            kp[j] = t == tnew ? knew : kc + off;
            vp[j] = t == tnew ? vnew : vc + off;
        }
        for (int g = 0; g < G; ++g) {
            float *pg = part + g * stride, *s = sc + g * KVQS_TILE;
            tile_scores(q + (int64_t)g * D, kp, n, D, scale, s);
            float mx = pg[D];
            for (int j = 0; j < n; ++j) mx = s[j] > mx ? s[j] : mx;
            const float alpha = pg[D] == -INFINITY ? 0.f : kvqs_exp(pg[D] - mx);
            for (int j = 0; j < n; ++j) s[j] = kvqs_exp(s[j] - mx);
            float sum = 0.f;
            for (int j = 0; j < n; ++j) sum += s[j];
            pg[D] = mx;
            pg[D + 1] = pg[D + 1] * alpha + sum;
            if (alpha != 1.f)
                for (int d = 0; d < D; ++d) pg[d] *= alpha;
        }
        /* acc_g += p_gj v_j: each value row is read once for the G heads */
        for (int j = 0; j < n; ++j) {
            const float *v = vp[j];
            for (int g = 0; g < G; ++g) {
                float *pg = part + g * stride;
                const float p = sc[g * KVQS_TILE + j];
                for (int d = 0; d < D; ++d) pg[d] = KVQS_FMA(p, v[d], pg[d]);
            }
        }
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

/* out [D] <- the softmax-weighted values of one query head from its S partials (stride apart). */
static void attn_merge(const float *part, int64_t stride, int S, int D, float *out) {
    float mx = -INFINITY, sum = 0.f;
    for (int s = 0; s < S; ++s) mx = part[s * stride + D] > mx ? part[s * stride + D] : mx;
    for (int d = 0; d < D; ++d) out[d] = 0.f;
    for (int s = 0; s < S; ++s) {
        const float *p = part + s * stride;
        const float w = expf(p[D] - mx);
        sum += w * p[D + 1];
        for (int d = 0; d < D; ++d) out[d] += w * p[d];
    }
    const float inv = 1.f / sum;
    for (int d = 0; d < D; ++d) out[d] *= inv;
}

/* row[i] <- silu(row[i]) * up[i] for i in [lo, hi). */
static void silu_mul(float *row, const float *up, int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) row[i] = row[i] / (1.f + kvqs_exp(-row[i])) * up[i];
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
