/* The whole decoder stack of a Llama-family model (Llama, Mistral, Qwen2, SmolLM2; no q/k
 * norm) for a CPU decode step of a few rows, in one call: GGML-quantized weights multiplied in
 * their block bytes (kvq.h), fp32 activations, an fp32 paged KV cache.
 *
 * Batch-1 decode reads every weight once per token; what it costs beyond that is fixed per-op
 * overhead, ~100 us of Python and ctypes per layer when called op by op. Here one OpenMP
 * parallel region runs all layers; the threads split each linear's weight rows (one contiguous
 * share each, over all of the linear's parts), the row ops (norms, RoPE, the K/V write, the
 * activation quantization) are split by rows, the attention items (row x KV head x context
 * split) are shared out, and a barrier separates phases:
 *
 *   residual = embed(ids);  h = input_norm(residual)                (layer 0)
 *   residual = x + residual;  h = input_norm(residual)              (later layers)
 *   qkv = h W_qkv (+ b);  q, k = rope(q, k);  cache[slot] = k, v;  a = attention(q)
 *   o = a W_o (+ b);  residual = o + residual;  h = post_norm(residual)
 *   x = (silu(h W_gate) * (h W_up)) W_down
 *   out = final_norm(x + residual)
 *
 * Each activation is quantized once per distinct dot type of the parts that read it
 * (kvq_quantize_act_range), then kvq_gemm_range runs over the thread's share of rows.
 * No allocation: the caller passes scratch of kvq_decoder_stack_scratch bytes.
 *
 * Portable C (no intrinsics): the loops are written so the compiler vectorizes them for the
 * ISA level the library is built for (AVX2, AVX-512, NEON); reductions use `omp simd`.
 * Without OpenMP it runs on one thread.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "kvq.h"

#ifdef _OPENMP
#include <omp.h>
#define KVQS_PRAGMA(x) _Pragma(#x)
#else
static inline int omp_get_thread_num(void) { return 0; }
static inline int omp_get_num_threads(void) { return 1; }
static inline int omp_get_max_threads(void) { return 1; }
#define KVQS_PRAGMA(x)
#endif

/* ------------------------------------------------------------------------------------------
 * Public API (kvserve/kernels/cpu_quant_stack.py binds it; proposed for kvq.h's end).
 * ------------------------------------------------------------------------------------------ */

/* Per-layer int64 table, KVQS_LAYER_COLS columns: the two norm weights, the layer's K and V
 * caches ([num_blocks, block_size, Hkv, D] fp32 each), then five linears of KVQS_LIN_COLS
 * columns each: number of parts (1..3), bias pointer (fp32 [rows of all parts] or 0), then per
 * part its weight pointer, qtype, row stride in bytes and row count. A linear's output is its
 * parts' outputs concatenated; every part has the linear's input width K. */
enum { KVQS_INPUT_NORM, KVQS_POST_NORM, KVQS_K_CACHE, KVQS_V_CACHE, KVQS_LINEARS };
enum { KVQS_QKV, KVQS_O, KVQS_GATE, KVQS_UP, KVQS_DOWN, KVQS_NUM_LINEARS };
enum { KVQS_MAX_PARTS = 3, KVQS_PART_COLS = 4, KVQS_LIN_COLS = 2 + KVQS_MAX_PARTS * KVQS_PART_COLS };
#define KVQS_LAYER_COLS (KVQS_LINEARS + KVQS_NUM_LINEARS * KVQS_LIN_COLS)

enum {
    KVQS_MAX_ROWS = 64,   /* rows of one step */
    KVQS_MAX_HEAD_DIM = 256,
    KVQS_MAX_GROUP = 16,  /* query heads per KV head */
    KVQS_MAX_SPLITS = 8,  /* context splits of one (row, KV head) attention item */
};

/* Error codes of kvq_decoder_stack_f32. */
enum { KVQS_OK = 0, KVQS_EARG = -1, KVQS_EID = -2, KVQS_ESEQ = -3, KVQS_ESCRATCH = -4 };

/* The model: shapes, the embedding, the final norm, RoPE's inverse frequencies and the layer
 * table. Built once by the caller; every pointer stays valid while it is used. */
typedef struct {
    int32_t num_layers, hidden, num_heads, num_kv_heads, head_dim, inter;
    int32_t block_size, window;        /* window <= 0: full attention */
    int64_t num_blocks;                /* blocks of each layer's cache */
    float eps, scale;                  /* RMSNorm epsilon, attention score scale */
    int32_t embed_qtype, reserved;     /* 0 f32, 1 f16, 30 bf16, or a kvq qtype */
    int64_t vocab, embed_row_bytes;
    const void *embed;                 /* [vocab, embed_row_bytes] */
    const float *final_norm;           /* [hidden] */
    const float *inv_freq;             /* [head_dim / 2] */
    const int64_t *layers;             /* [num_layers, KVQS_LAYER_COLS] */
} kvq_stack_model;

int kvq_stack_abi_version(void);
int64_t kvq_decoder_stack_scratch(const kvq_stack_model *m, int M);
int kvq_decoder_stack_f32(const kvq_stack_model *m, int M, const int64_t *ids, const int64_t *positions,
                          const int32_t *tables, int64_t table_width, const int32_t *lens, const int64_t *slots,
                          float *out, void *scratch, int64_t scratch_bytes);

/* ------------------------------------------------------------------------------------------ */

int kvq_stack_abi_version(void) { return 1; }

#define KVQS_GGML_F32 0
#define KVQS_GGML_F16 1
#define KVQS_GGML_BF16 30
#define KVQS_ALIGN 64
#define KVQS_TILE 32 /* keys per online-softmax step */

static const int kQtypes[] = {KVQ_Q4_0, KVQ_Q4_1, KVQ_Q8_0, KVQ_Q4_K, KVQ_Q5_K, KVQ_Q6_K};

/* Which activation layout a weight type reads. Parts of one linear whose types share it read one
 * quantized copy. kvq.h has no query for it yet; a library that defines kvq_dot_type (returning
 * a representative qtype) is used, otherwise every qtype counts as its own dot type. */
#if defined(__GNUC__) && defined(__ELF__)
int kvq_dot_type(int qtype) __attribute__((weak));
static int dot_key(int qt) { return kvq_dot_type ? kvq_dot_type(qt) : qt; }
#else
static int dot_key(int qt) { return qt; }
#endif

static int known_qtype(int qt) {
    for (size_t i = 0; i < sizeof(kQtypes) / sizeof(kQtypes[0]); ++i)
        if (kQtypes[i] == qt) return 1;
    return 0;
}

static int64_t align_up(int64_t n) { return (n + KVQS_ALIGN - 1) / KVQS_ALIGN * KVQS_ALIGN; }

/* One linear (or gate + up side by side): its parts with their output columns, and the
 * quantized-activation buffer each part reads. */
typedef struct {
    const void *w;
    const float *bias;
    int64_t row_bytes, rows, col;
    int qtype, act;  /* act: index into the phase's distinct dot types */
} part_t;

typedef struct {
    int nparts, nacts;
    part_t p[2 * KVQS_MAX_PARTS];
    int act_qtype[2 * KVQS_MAX_PARTS];
} phase_t;

static void phase_add(phase_t *ph, const int64_t *lin, int64_t col0) {
    const float *bias = (const float *)(intptr_t)lin[1];
    int64_t col = col0;
    for (int i = 0; i < (int)lin[0]; ++i) {
        const int64_t *pc = lin + 2 + i * KVQS_PART_COLS;
        part_t *p = &ph->p[ph->nparts++];
        p->w = (const void *)(intptr_t)pc[0];
        p->qtype = (int)pc[1];
        p->row_bytes = pc[2];
        p->rows = pc[3];
        p->col = col;
        p->bias = bias ? bias + (col - col0) : NULL;
        col += p->rows;
        int a = 0;
        while (a < ph->nacts && dot_key(ph->act_qtype[a]) != dot_key(p->qtype)) ++a;
        if (a == ph->nacts) ph->act_qtype[ph->nacts++] = p->qtype;
        p->act = a;
    }
}

static void phase_build(phase_t *ph, const int64_t *layer, int which) {
    ph->nparts = ph->nacts = 0;
    phase_add(ph, layer + KVQS_LINEARS + which * KVQS_LIN_COLS, 0);
}

static int64_t linear_rows(const int64_t *lin) {
    int64_t n = 0;
    for (int i = 0; i < (int)lin[0]; ++i) n += lin[2 + i * KVQS_PART_COLS + 3];
    return n;
}

/* This thread's contiguous share [lo, hi) of n rows, in multiples of 8 rows where possible
 * (the kernels may work on row groups). */
static void thread_share(int64_t n, int64_t *lo, int64_t *hi) {
    const int nt = omp_get_num_threads(), tid = omp_get_thread_num();
    int64_t per = (n + nt - 1) / nt;
    if (n >= 8 * (int64_t)nt) per = (per + 7) / 8 * 8;
    *lo = tid * per < n ? tid * per : n;
    *hi = *lo + per < n ? *lo + per : n;
}

/* Rows [m0, m1) of x [M, K] (row stride x_stride floats) quantized for each dot type of ph. */
static void quantize_rows(const phase_t *ph, const float *x, int64_t x_stride, char *const *xq, int M, int64_t K,
                          int m0, int m1) {
    if (m0 >= m1) return;
    for (int a = 0; a < ph->nacts; ++a)
        kvq_quantize_act_range(ph->act_qtype[a], x, x_stride, xq[a], M, K, m0, m1);
}

/* out[:, col + r] for the rows r of each part that fall in [lo, hi) of the phase's rows
 * (rows are numbered across parts in order, offset by row0 for gate/up's second half). */
static void gemm_rows(const phase_t *ph, char *const *xq, float *out, int64_t out_stride, int M, int64_t K,
                      int64_t lo, int64_t hi) {
    int64_t base = 0;
    for (int i = 0; i < ph->nparts; ++i) {
        const part_t *p = &ph->p[i];
        const int64_t a = lo > base ? lo - base : 0, b = hi - base < p->rows ? hi - base : p->rows;
        if (a < b)
            kvq_gemm_range(p->qtype, p->w, p->row_bytes, xq[p->act], p->bias, out + p->col, out_stride, M, p->rows,
                           K, a, b);
        base += p->rows;
    }
}

/* residual <- x + residual (x may be NULL: residual unchanged); out <- rmsnorm(residual) * w. */
static void add_rmsnorm(const float *x, float *residual, const float *w, float *out, int64_t n, float eps) {
    float ss = 0.f;
    if (x) {
        KVQS_PRAGMA(omp simd reduction(+ : ss))
        for (int64_t i = 0; i < n; ++i) {
            const float r = x[i] + residual[i];
            residual[i] = r;
            ss += r * r;
        }
    } else {
        KVQS_PRAGMA(omp simd reduction(+ : ss))
        for (int64_t i = 0; i < n; ++i) ss += residual[i] * residual[i];
    }
    const float inv = 1.f / sqrtf(ss / (float)n + eps);
    for (int64_t i = 0; i < n; ++i) out[i] = residual[i] * inv * w[i];
}

/* HF's rotate-half RoPE of nh heads of D values in place; cs = [cos | sin], D/2 each. */
static void rope_heads(float *x, int nh, int D, const float *cs) {
    const int half = D / 2;
    const float *c = cs, *s = cs + half;
    for (int h = 0; h < nh; ++h) {
        float *x1 = x + (int64_t)h * D, *x2 = x1 + half;
        for (int i = 0; i < half; ++i) {
            const float a = x1[i], b = x2[i];
            x1[i] = a * c[i] - b * s[i];
            x2[i] = b * c[i] + a * s[i];
        }
    }
}

static float dot_f32(const float *a, const float *b, int n) {
    float s = 0.f;
    KVQS_PRAGMA(omp simd reduction(+ : s))
    for (int i = 0; i < n; ++i) s += a[i] * b[i];
    return s;
}

/* One attention item: the G query heads q [G, D] of KV head kvh attend over context positions
 * [t0, t1) of a sequence, read in place from the paged caches through its block table. The
 * unnormalized result goes to part [G, D + 2]: per head the weighted sum of values, then the
 * running max score and the sum of exp(score - max) (flash-decoding's partial, merged later). */
static void attn_partial(const float *kc, const float *vc, const float *q, const int32_t *tab, int bs, int Hkv,
                         int kvh, int D, int G, int t0, int t1, float scale, float *part) {
    float sc[KVQS_MAX_GROUP * KVQS_TILE];
    const int64_t stride = D + 2;
    for (int g = 0; g < G; ++g) {
        float *acc = part + g * stride;
        for (int d = 0; d < D; ++d) acc[d] = 0.f;
        acc[D] = -INFINITY;
        acc[D + 1] = 0.f;
    }
    for (int ts = t0; ts < t1; ts += KVQS_TILE) {
        const int n = t1 - ts < KVQS_TILE ? t1 - ts : KVQS_TILE;
        for (int j = 0; j < n; ++j) {
            const int t = ts + j;
            const float *k = kc + (((int64_t)tab[t / bs] * bs + t % bs) * Hkv + kvh) * D;
            for (int g = 0; g < G; ++g) sc[g * KVQS_TILE + j] = dot_f32(q + (int64_t)g * D, k, D) * scale;
        }
        for (int g = 0; g < G; ++g) {
            float *acc = part + g * stride, *s = sc + g * KVQS_TILE;
            float mx = acc[D];
            for (int j = 0; j < n; ++j) mx = s[j] > mx ? s[j] : mx;
            const float alpha = expf(acc[D] - mx); /* 0 on the first tile (max was -inf) */
            float sum = acc[D + 1] * alpha;
            for (int j = 0; j < n; ++j) {
                s[j] = expf(s[j] - mx);
                sum += s[j];
            }
            acc[D] = mx;
            acc[D + 1] = sum;
            if (alpha != 1.f)
                for (int d = 0; d < D; ++d) acc[d] *= alpha;
        }
        for (int j = 0; j < n; ++j) {
            const int t = ts + j;
            const float *v = vc + (((int64_t)tab[t / bs] * bs + t % bs) * Hkv + kvh) * D;
            for (int g = 0; g < G; ++g) {
                float *acc = part + g * stride;
                const float p = sc[g * KVQS_TILE + j];
                for (int d = 0; d < D; ++d) acc[d] += p * v[d];
            }
        }
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

static float silu(float x) { return x / (1.f + expf(-x)); }

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
        do { ++e; m <<= 1; } while (!(m & 0x400));
        u = sign | ((uint32_t)(112 - e) << 23) | ((m & 0x3FF) << 13);
    } else {
        u = sign;
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Scratch layout for M rows (byte offsets, each region 64-byte aligned). */
typedef struct {
    int64_t res, h, xo, qkv, att, gu, rope, part, items, xq, xq_bytes, total;
} layout_t;

static int attn_splits_max(void) { return KVQS_MAX_SPLITS; }

static layout_t scratch_layout(const kvq_stack_model *m, int M) {
    const int64_t H = m->hidden, D = m->head_dim, Hq = m->num_heads, Hkv = m->num_kv_heads, I = m->inter;
    const int64_t G = Hkv > 0 ? Hq / Hkv : 1, Oqkv = (Hq + 2 * Hkv) * D;
    const int64_t items = (int64_t)M * Hkv * attn_splits_max();
    layout_t L;
    int64_t off = 0;
#define KVQS_TAKE(field, bytes) (L.field = off, off += align_up(bytes))
    KVQS_TAKE(res, 4 * M * H);
    KVQS_TAKE(h, 4 * M * H);
    KVQS_TAKE(xo, 4 * M * H);
    KVQS_TAKE(qkv, 4 * M * Oqkv);
    KVQS_TAKE(att, 4 * M * Hq * D);
    KVQS_TAKE(gu, 4 * M * 2 * I);
    KVQS_TAKE(rope, 4 * M * D);
    KVQS_TAKE(part, 4 * items * G * (D + 2));
    KVQS_TAKE(items, 4 * 2 * (int64_t)M);
#undef KVQS_TAKE
    int64_t qb = 0;
    const int64_t Ks[3] = {H, Hq * D, I};
    for (size_t t = 0; t < sizeof(kQtypes) / sizeof(kQtypes[0]); ++t)
        for (int k = 0; k < 3; ++k) {
            const int64_t b = kvq_act_bytes(kQtypes[t], M, Ks[k]);
            qb = b > qb ? b : qb;
        }
    L.xq_bytes = align_up(qb);
    L.xq = off;
    off += 2 * KVQS_MAX_PARTS * L.xq_bytes;
    L.total = off + KVQS_ALIGN; /* room to align the caller's pointer */
    return L;
}

int64_t kvq_decoder_stack_scratch(const kvq_stack_model *m, int M) {
    if (M < 1 || M > KVQS_MAX_ROWS) return -1;
    return scratch_layout(m, M).total;
}

/* Model and step checks, so that no argument can send a read or write out of bounds. */
static int check_model(const kvq_stack_model *m) {
    const int D = m->head_dim;
    if (m->num_layers < 1 || m->hidden < 1 || m->inter < 1 || D < 2 || D % 2 || D > KVQS_MAX_HEAD_DIM ||
        m->num_kv_heads < 1 || m->num_heads < 1 || m->num_heads % m->num_kv_heads ||
        m->num_heads / m->num_kv_heads > KVQS_MAX_GROUP || m->block_size < 1 || m->num_blocks < 1)
        return 0;
    const int64_t K_of[KVQS_NUM_LINEARS] = {m->hidden, (int64_t)m->num_heads * D, m->hidden, m->hidden, m->inter};
    const int64_t N_of[KVQS_NUM_LINEARS] = {(int64_t)(m->num_heads + 2 * m->num_kv_heads) * D, m->hidden, m->inter,
                                            m->inter, m->hidden};
    for (int l = 0; l < m->num_layers; ++l) {
        const int64_t *layer = m->layers + (int64_t)l * KVQS_LAYER_COLS;
        for (int i = 0; i < KVQS_NUM_LINEARS; ++i) {
            const int64_t *lin = layer + KVQS_LINEARS + i * KVQS_LIN_COLS;
            if (lin[0] < 1 || lin[0] > KVQS_MAX_PARTS || linear_rows(lin) != N_of[i]) return 0;
            for (int p = 0; p < (int)lin[0]; ++p) {
                const int64_t *pc = lin + 2 + p * KVQS_PART_COLS;
                const int64_t rb = kvq_row_bytes((int)pc[1], K_of[i]);
                if (!known_qtype((int)pc[1]) || rb < 0 || pc[2] < rb || pc[0] == 0) return 0;
            }
        }
    }
    return 1;
}

/* Attention work items: rows' (first item, splits) pairs; each row's Hkv * splits items are
 * numbered KV head major. Splits spread one row's few KV heads over the threads (SmolLM2 has 3
 * KV heads for 2 threads) but keep at least one tile of keys each. */
static int plan_items(int M, int Hkv, const int32_t *lens, int window, int nthreads, int32_t *items) {
    int target = (2 * nthreads + M * Hkv - 1) / (M * Hkv);
    if (target > KVQS_MAX_SPLITS) target = KVQS_MAX_SPLITS;
    int total = 0;
    for (int b = 0; b < M; ++b) {
        const int L = lens[b], n = window > 0 && L > window ? window : L;
        int S = (n + KVQS_TILE - 1) / KVQS_TILE;
        S = S < target ? S : target;
        S = S < 1 ? 1 : S;
        items[2 * b] = total;
        items[2 * b + 1] = S;
        total += Hkv * S;
    }
    return total;
}

int kvq_decoder_stack_f32(const kvq_stack_model *m, int M, const int64_t *ids, const int64_t *positions,
                          const int32_t *tables, int64_t table_width, const int32_t *lens, const int64_t *slots,
                          float *out, void *scratch, int64_t scratch_bytes) {
    if (M < 1 || M > KVQS_MAX_ROWS || !check_model(m)) return KVQS_EARG;
    const int H = m->hidden, Hq = m->num_heads, Hkv = m->num_kv_heads, D = m->head_dim, I = m->inter;
    const int G = Hq / Hkv, bs = m->block_size, window = m->window, Oqkv = (Hq + 2 * Hkv) * D;
    const layout_t lay = scratch_layout(m, M);
    if (scratch_bytes < lay.total) return KVQS_ESCRATCH;
    for (int b = 0; b < M; ++b)
        if (ids[b] < 0 || ids[b] >= m->vocab) return KVQS_EID;
    const int64_t cache_slots = m->num_blocks * bs;
    for (int b = 0; b < M; ++b) {
        const int L = lens[b];
        if (L < 1 || (L + bs - 1) / bs > table_width || slots[b] < -1 || slots[b] >= cache_slots) return KVQS_ESEQ;
        const int32_t *tab = tables + (int64_t)b * table_width;
        const int n = window > 0 && L > window ? window : L;
        for (int i = (L - n) / bs; i <= (L - 1) / bs; ++i)
            if (tab[i] < 0 || tab[i] >= m->num_blocks) return KVQS_ESEQ;
    }

    char *base = (char *)(((uintptr_t)scratch + KVQS_ALIGN - 1) / KVQS_ALIGN * KVQS_ALIGN);
    float *res = (float *)(base + lay.res), *h = (float *)(base + lay.h), *xo = (float *)(base + lay.xo);
    float *qkv = (float *)(base + lay.qkv), *att = (float *)(base + lay.att), *gu = (float *)(base + lay.gu);
    float *rope = (float *)(base + lay.rope), *part = (float *)(base + lay.part);
    int32_t *items = (int32_t *)(base + lay.items);
    char *xq[2 * KVQS_MAX_PARTS];
    for (int i = 0; i < 2 * KVQS_MAX_PARTS; ++i) xq[i] = base + lay.xq + i * lay.xq_bytes;
    const int64_t pstride = (int64_t)G * (D + 2); /* floats per attention item's partial */

    /* the embeddings are the first residual */
    const int eq = m->embed_qtype;
    if (eq == KVQS_GGML_F32 || eq == KVQS_GGML_F16 || eq == KVQS_GGML_BF16) {
        for (int b = 0; b < M; ++b) {
            const char *row = (const char *)m->embed + ids[b] * m->embed_row_bytes;
            float *r = res + (int64_t)b * H;
            if (eq == KVQS_GGML_F32) {
                memcpy(r, row, sizeof(float) * (size_t)H);
            } else {
                for (int i = 0; i < H; ++i) {
                    uint16_t v;
                    memcpy(&v, row + 2 * i, 2);
                    if (eq == KVQS_GGML_F16) {
                        r[i] = half_to_float(v);
                    } else {
                        const uint32_t u = (uint32_t)v << 16;
                        memcpy(&r[i], &u, 4);
                    }
                }
            }
        }
    } else if (kvq_get_rows(eq, m->embed, m->embed_row_bytes, m->vocab, ids, M, H, res) != 0) {
        return KVQS_EID;
    }
    /* RoPE factors per row: cos and sin of position * inv_freq, fp32 as PyTorch computes them */
    for (int b = 0; b < M; ++b) {
        float *cs = rope + (int64_t)b * D;
        for (int i = 0; i < D / 2; ++i) {
            const float f = (float)positions[b] * m->inv_freq[i];
            cs[i] = cosf(f);
            cs[D / 2 + i] = sinf(f);
        }
    }
    const int nthreads = omp_get_max_threads();
    const int nitems = plan_items(M, Hkv, lens, window, nthreads, items);

    KVQS_PRAGMA(omp parallel num_threads(nthreads))
    {
        int64_t lo, hi, mlo, mhi;
        thread_share(M, &mlo, &mhi); /* this thread's rows for the row ops */
        const int m0 = (int)mlo, m1 = (int)mhi;
        phase_t ph_qkv, ph_o, ph_gu, ph_down;
        for (int l = 0; l < m->num_layers; ++l) {
            const int64_t *layer = m->layers + (int64_t)l * KVQS_LAYER_COLS;
            const float *kc = (const float *)(intptr_t)layer[KVQS_K_CACHE];
            const float *vc = (const float *)(intptr_t)layer[KVQS_V_CACHE];
            phase_build(&ph_qkv, layer, KVQS_QKV);
            phase_build(&ph_o, layer, KVQS_O);
            phase_build(&ph_down, layer, KVQS_DOWN);
            ph_gu.nparts = ph_gu.nacts = 0; /* gate rows then up rows: out columns [0, I) and [I, 2I) */
            phase_add(&ph_gu, layer + KVQS_LINEARS + KVQS_GATE * KVQS_LIN_COLS, 0);
            const int ngate = ph_gu.nparts;
            phase_add(&ph_gu, layer + KVQS_LINEARS + KVQS_UP * KVQS_LIN_COLS, I);

            /* h = input_norm(x + residual), quantized for W_qkv */
            for (int b = m0; b < m1; ++b)
                add_rmsnorm(l ? xo + (int64_t)b * H : NULL, res + (int64_t)b * H,
                            (const float *)(intptr_t)layer[KVQS_INPUT_NORM], h + (int64_t)b * H, H, m->eps);
            quantize_rows(&ph_qkv, h, H, xq, M, H, m0, m1);
            KVQS_PRAGMA(omp barrier)
            thread_share(Oqkv, &lo, &hi);
            gemm_rows(&ph_qkv, xq, qkv, Oqkv, M, H, lo, hi);
            KVQS_PRAGMA(omp barrier)
            /* RoPE on q and k, then k and v into the cache */
            for (int b = m0; b < m1; ++b) {
                float *row = qkv + (int64_t)b * Oqkv;
                rope_heads(row, Hq + Hkv, D, rope + (int64_t)b * D);
                if (slots[b] >= 0) {
                    memcpy((float *)kc + slots[b] * Hkv * D, row + Hq * D, sizeof(float) * (size_t)Hkv * D);
                    memcpy((float *)vc + slots[b] * Hkv * D, row + (Hq + Hkv) * D, sizeof(float) * (size_t)Hkv * D);
                }
            }
            KVQS_PRAGMA(omp barrier)
            KVQS_PRAGMA(omp for schedule(dynamic, 1))
            for (int it = 0; it < nitems; ++it) {
                int b = 0;
                while (b + 1 < M && items[2 * (b + 1)] <= it) ++b;
                const int S = items[2 * b + 1], local = it - items[2 * b], kvh = local / S, s = local % S;
                const int L = lens[b], n = window > 0 && L > window ? window : L, start = L - n;
                const int t0 = start + (int)((int64_t)n * s / S), t1 = start + (int)((int64_t)n * (s + 1) / S);
                attn_partial(kc, vc, qkv + (int64_t)b * Oqkv + (int64_t)kvh * G * D, tables + b * table_width, bs,
                             Hkv, kvh, D, G, t0, t1, m->scale, part + (int64_t)it * pstride);
            }
            /* (implicit barrier) merge each row's splits, quantize for W_o */
            for (int b = m0; b < m1; ++b) {
                const int first = items[2 * b], S = items[2 * b + 1];
                for (int kvh = 0; kvh < Hkv; ++kvh)
                    for (int g = 0; g < G; ++g)
                        attn_merge(part + (int64_t)(first + kvh * S) * pstride + g * (D + 2), pstride, S, D,
                                   att + ((int64_t)b * Hq + kvh * G + g) * D);
            }
            quantize_rows(&ph_o, att, (int64_t)Hq * D, xq, M, (int64_t)Hq * D, m0, m1);
            KVQS_PRAGMA(omp barrier)
            thread_share(H, &lo, &hi);
            gemm_rows(&ph_o, xq, xo, H, M, (int64_t)Hq * D, lo, hi);
            KVQS_PRAGMA(omp barrier)
            /* h = post_norm(o + residual), quantized for W_gate and W_up */
            for (int b = m0; b < m1; ++b)
                add_rmsnorm(xo + (int64_t)b * H, res + (int64_t)b * H, (const float *)(intptr_t)layer[KVQS_POST_NORM],
                            h + (int64_t)b * H, H, m->eps);
            quantize_rows(&ph_gu, h, H, xq, M, H, m0, m1);
            KVQS_PRAGMA(omp barrier)
            /* gate and up rows [lo, hi) of this thread, then silu(gate) * up over the same range,
             * written over gate (gu's first I columns) */
            {
                phase_t g = ph_gu, u = ph_gu;
                g.nparts = ngate;
                memmove(u.p, u.p + ngate, sizeof(part_t) * (size_t)(u.nparts - ngate));
                u.nparts -= ngate;
                thread_share(I, &lo, &hi);
                gemm_rows(&g, xq, gu, 2 * (int64_t)I, M, H, lo, hi);
                gemm_rows(&u, xq, gu, 2 * (int64_t)I, M, H, lo, hi);
                for (int b = 0; b < M; ++b) {
                    float *row = gu + (int64_t)b * 2 * I;
                    for (int64_t i = lo; i < hi; ++i) row[i] = silu(row[i]) * row[I + i];
                }
            }
            KVQS_PRAGMA(omp barrier)
            quantize_rows(&ph_down, gu, 2 * (int64_t)I, xq, M, I, m0, m1);
            KVQS_PRAGMA(omp barrier)
            thread_share(H, &lo, &hi);
            gemm_rows(&ph_down, xq, xo, H, M, I, lo, hi);
            KVQS_PRAGMA(omp barrier)
        }
        for (int b = m0; b < m1; ++b)
            add_rmsnorm(xo + (int64_t)b * H, res + (int64_t)b * H, m->final_norm, out + (int64_t)b * H, H, m->eps);
    }
    return KVQS_OK;
}
