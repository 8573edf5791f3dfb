/* Private helpers shared by the kvq_*.c files: GGML block geometry, fp16 conversion, the
 * layout of quantized activations, and the "canonical tile" that every weight format is
 * unpacked into before the integer dot products run.
 *
 * Why a canonical tile: six block formats times four instruction sets would be 24 dot kernels.
 * Instead each format only knows how to unpack a few rows of its blocks into one common form
 * (per 32 values: int8 codes, 8 float lane scales, 2 float offsets), which stays in L1, and one
 * dot kernel per instruction set multiplies that form by every activation row. Unpacking once
 * per weight row and reusing it for all M activation rows is also what makes batched decode
 * read the weight only once.
 */
#ifndef KVSERVE_KVQ_INTERNAL_H
#define KVSERVE_KVQ_INTERNAL_H

#include <stdint.h>
#include <string.h>

#include "kvq.h"

#if defined(__F16C__) && !defined(KVQ_SCALAR)
#include <immintrin.h>
#endif

#define KVQ_ABI_VERSION 1
#define KVQ_QK 32     /* values per canonical sub-block (and per activation block) */
#define KVQ_QK_K 256  /* values per K-format super-block */
#define KVQ_TILE_ROWS 4
#define KVQ_CHUNK 2048 /* values of K unpacked at a time (a multiple of KVQ_QK_K) */

typedef struct {
    int qtype;
    int block_size;  /* values per block */
    int block_bytes; /* bytes per block */
    int is_signed;   /* canonical codes are signed (Q8_0) rather than in [0, 64) */
    int has_offset;  /* canonical offsets are non-zero */
} kvq_format;

const kvq_format *kvq_format_of(int qtype);

static inline float kvq_h2f(uint16_t h) {
#if defined(__F16C__) && !defined(KVQ_SCALAR)
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, u;
    if (exp == 0) {
        if (man == 0) {
            u = sign;
        } else { /* subnormal: normalise the mantissa */
            exp = 113;
            while (!(man & 0x400u)) {
                man <<= 1;
                exp--;
            }
            u = sign | (exp << 23) | ((man & 0x3ffu) << 13);
        }
    } else if (exp == 31) {
        u = sign | 0x7f800000u | (man << 13);
    } else {
        u = sign | ((exp + 112) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
#endif
}

/* fp32 -> fp16, round to nearest even (numpy's astype(float16)), portable bit arithmetic. */
static inline uint16_t kvq_f2h(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
    if (ax >= 0x47800000u) /* >= 65536, inf or nan */
        return (uint16_t)(sign | (ax > 0x7f800000u ? 0x7e00u : 0x7c00u));
    if (ax < 0x38800000u) { /* result is subnormal or zero: let the FPU round at 2^-24 */
        float a, magic = 0.5f;
        memcpy(&a, &ax, 4);
        a += magic;
        uint32_t u;
        memcpy(&u, &a, 4);
        return (uint16_t)(sign | (u - 0x3f000000u));
    }
    uint32_t odd = (ax >> 13) & 1u;
    ax += 0xc8000fffu + odd; /* rebias exponent (-112 << 23) and round half to even */
    return (uint16_t)(sign | (ax >> 13));
}

static inline uint16_t kvq_rd16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }

/* Quantized activations: per row [int8 q[K]][float d[K/32]][float s[2*K/32]], s = d * (sum of
 * the 16 codes of each half block); rows are kvq_act_stride(K) bytes apart. */
static inline int64_t kvq_act_stride(int64_t K) {
    int64_t nb = K / KVQ_QK, b = K + nb * 12;
    return (b + 63) & ~(int64_t)63;
}

/* The canonical tile of one weight row chunk of `nb` 32-value sub-blocks: value i of sub-block
 * b is sc[8b + 4*(i/16)] * q[32b + i] + off[2b + i/16]. (The 8 lane scales repeat each half's
 * scale 4 times, the lane layout of a 32-byte multiply-add result.) */
void kvq_unpack(const kvq_format *f, const uint8_t *row, int64_t k0, int64_t kc, int8_t *q, float *sc,
                float *off);

#endif
