/* The whole decoder stack of a Llama-family model (Llama, Mistral, Qwen2, SmolLM2) or of Gemma 3
 * (text) for a CPU decode step of a few rows, in one call: GGML-quantized weights multiplied in
 * their block bytes (kvq.h), fp32 activations, an fp32 paged KV cache.
 *
 * Batch-1 decode reads every weight once per token; what it costs beyond that is fixed per-op
 * overhead, ~100 us of Python and ctypes per layer when called op by op. Here one OpenMP
 * parallel region runs all layers, with five barriers a layer: the threads split each linear's
 * weight rows (one contiguous share each, over all of the linear's parts) and share out the
 * attention items (row x KV head x context split; each rotates its q heads and k, and the one
 * holding the token's position writes k and v to the cache; the rows of one sequence in a
 * speculative verify step are split as their one-row decodes would be, and their items that
 * start at the same position run as one, reading each K/V tile once). The cheap row ops between
 * (residual adds, RMSNorms, merging the attention splits, activation quantization) every thread
 * does for all rows into its own buffers, rather than one thread between two more barriers:
 *
 *   residual = embed(ids);  h = input_norm(residual)                (layer 0)
 *   residual = x + residual;  h = input_norm(residual)              (later layers)
 *   qkv = h W_qkv (+ b);  q, k = rope(q, k);  cache[slot] = k, v;  a = attention(q)
 *   o = a W_o (+ b);  residual = o + residual;  h = post_norm(residual)
 *   x = (silu(h W_gate) * (h W_up)) W_down
 *   out = final_norm(x + residual)
 *
 * Gemma 3 (model flags): the embedding times embed_scale; q and k heads RMS-normed (q_norm,
 * k_norm) before RoPE; "sandwich" norms: o and x are normed on their own before they join the
 * residual, and the MLP's input norm is its own (pre_ff_norm); GELU-tanh instead of SiLU; each
 * layer its own window (0: full) and RoPE set (local layers: local_inv_freq):
 *
 *   residual = post_ff_norm(x) + residual;  h = input_norm(residual)
 *   qkv = h W_qkv;  q, k = rope(q_norm(q), k_norm(k));  ...;  a = attention(q)
 *   residual = post_norm(a W_o) + residual;  h = pre_ff_norm(residual)
 *   x = (gelu_tanh(h W_gate) * (h W_up)) W_down
 *   out = final_norm(post_ff_norm(x) + residual)
 *
 * Norm weights are the factors applied (Gemma's 1 + weight is added by the caller).
 * Each activation is quantized once per distinct dot type of the parts that read it
 * (kvq_quantize_act_range), then kvq_gemm_range runs over the thread's share of rows.
 * No allocation: the caller passes scratch of kvq_decoder_stack_scratch bytes.
 *
 * Portable C (stack_ops.h): the loops are written for the compiler's vectorizer at the ISA level
 * the library is built for (AVX2, AVX-512, NEON); the attention's 8-lane accumulators and the
 * RMSNorm and merge loops use intrinsics (AVX2 or NEON, plain C at the baseline), and AVX-512
 * builds run the attention's softmax and value sums on 16 lanes and score joint verify rows two
 * keys a register (same values as the 8-lane code). Without OpenMP it runs on one thread.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "kvq.h"
#include "stack_ops.h"

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
 * parts' outputs concatenated; every part has the linear's input width K. Then the columns
 * the model flags read (0 where unused): the pre- and post-feedforward norms ([hidden]), the
 * q and k norms ([head_dim]), the layer's window (> 0; 0: the model's) and its RoPE set (0 the
 * model's inv_freq, 1 local_inv_freq). */
enum { KVQS_INPUT_NORM, KVQS_POST_NORM, KVQS_K_CACHE, KVQS_V_CACHE, KVQS_LINEARS };
enum { KVQS_QKV, KVQS_O, KVQS_GATE, KVQS_UP, KVQS_DOWN, KVQS_NUM_LINEARS };
enum { KVQS_MAX_PARTS = 3, KVQS_PART_COLS = 4, KVQS_LIN_COLS = 2 + KVQS_MAX_PARTS * KVQS_PART_COLS };
enum {
    KVQS_PRE_FF_NORM = KVQS_LINEARS + KVQS_NUM_LINEARS * KVQS_LIN_COLS,
    KVQS_POST_FF_NORM,
    KVQS_Q_NORM,
    KVQS_K_NORM,
    KVQS_WINDOW,
    KVQS_ROPE_SET,
    KVQS_LAYER_COLS
};

/* Model flags. */
enum {
    KVQS_QK_NORM = 1,   /* per-head RMSNorm of q and k before RoPE (q_norm, k_norm) */
    KVQS_SANDWICH = 2,  /* Gemma's norms around attention and MLP (post_norm, pre_ff_norm, post_ff_norm) */
    KVQS_GELU_TANH = 4, /* gelu_tanh(gate) * up instead of silu(gate) * up */
    KVQS_FLAGS = 7
};

enum {
    KVQS_MAX_ROWS = 64,   /* rows of one step */
    KVQS_JOINT_ROWS = 8,  /* rows of one sequence whose attention items run as one (verify steps) */
    KVQS_JOINT_FLOATS = 4096, /* their rotated q heads: rows * G * D at most */
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
    int32_t embed_qtype, flags;        /* 0 f32, 1 f16, 30 bf16, or a kvq qtype; KVQS_* flags */
    int64_t vocab, embed_row_bytes;
    const void *embed;                 /* [vocab, embed_row_bytes] */
    const float *final_norm;           /* [hidden] */
    const float *inv_freq;             /* [head_dim / 2] */
    const int64_t *layers;             /* [num_layers, KVQS_LAYER_COLS] */
    float embed_scale;                 /* the embedding rows times this (0 or 1: as they are) */
    int32_t reserved;
    const float *local_inv_freq;       /* [head_dim / 2] of layers with RoPE set 1, or NULL */
} kvq_stack_model;

int kvq_stack_abi_version(void);
/* Bytes of scratch for steps of up to M rows on up to `threads` OpenMP threads, or -1 if the model
 * is not one the stack runs (shapes, qtypes, row strides, part rows). The step function trusts a
 * model this accepted. */
int64_t kvq_decoder_stack_scratch(const kvq_stack_model *m, int M, int threads);
/* One decode step of M rows: ids [M] (< vocab), positions [M] (RoPE), tables [M, table_width]
 * block ids, lens [M] context lengths including this token, slots [M] cache slots of this token
 * (-1: not written; attention still sees the token's own k and v at position lens - 1).
 * out [M, hidden] = final_norm(x + residual). Runs on min(omp_get_max_threads(), the threads the
 * scratch was sized for) threads. Returns 0, or KVQS_EID for a token id out of range, KVQS_ESEQ
 * for a length, block id or slot outside the table or cache, KVQS_EARG / KVQS_ESCRATCH for M or
 * the scratch; on an error nothing is written. */
int kvq_decoder_stack_f32(const kvq_stack_model *m, int M, const int64_t *ids, const int64_t *positions,
                          const int32_t *tables, int64_t table_width, const int32_t *lens, const int64_t *slots,
                          float *out, void *scratch, int64_t scratch_bytes);

/* ------------------------------------------------------------------------------------------ */

int kvq_stack_abi_version(void) { return 3; }

#define KVQS_GGML_F32 0
#define KVQS_GGML_F16 1
#define KVQS_GGML_BF16 30
#define KVQS_ALIGN 64

static const int kQtypes[] = {KVQ_Q4_0, KVQ_Q4_1, KVQ_Q5_0, KVQ_Q8_0, KVQ_Q4_K, KVQ_Q5_K, KVQ_Q6_K};

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

static inline void phase_build(phase_t *ph, const int64_t *layer, int which) {
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

/* x [M, K] (row stride x_stride floats) quantized once for each dot type of ph. */
static void quantize_rows(const phase_t *ph, const float *x, int64_t x_stride, char *const *xq, int M, int64_t K) {
    for (int a = 0; a < ph->nacts; ++a) kvq_quantize_act_range(ph->act_qtype[a], x, x_stride, xq[a], M, K, 0, M);
}

/* out[:, col + r] for the rows r of each part that fall in [lo, hi) of the phase's rows
 * (numbered across its parts in order). */
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

/* Scratch layout (byte offsets, each region 64-byte aligned): the shared buffers, then one block
 * per thread. */
typedef struct {
    int64_t emb, xo, qkv, gu, rope, part, items, shared;        /* shared */
    int64_t res, h, att, tmp, xq, xq_bytes, per_thread;        /* offsets inside a thread's block */
} layout_t;

static layout_t scratch_layout(const kvq_stack_model *m, int M) {
    const int64_t H = m->hidden, D = m->head_dim, Hq = m->num_heads, Hkv = m->num_kv_heads, I = m->inter;
    const int64_t G = Hq / Hkv, Oqkv = (Hq + 2 * Hkv) * D;
    const int64_t items = (int64_t)M * Hkv * KVQS_MAX_SPLITS;
    layout_t L;
    int64_t off = 0;
#define KVQS_TAKE(field, bytes) (L.field = off, off += align_up(bytes))
    KVQS_TAKE(emb, 4 * M * H);
    KVQS_TAKE(xo, 4 * M * H);
    KVQS_TAKE(qkv, 4 * M * Oqkv);
    KVQS_TAKE(gu, 4 * M * 2 * I);
    KVQS_TAKE(rope, 4 * 2 * M * D); /* the model's cos | sin per row, then the local set's */
    KVQS_TAKE(part, 4 * items * G * (D + 2));
    KVQS_TAKE(items, 4 * 2 * 2 * (int64_t)M); /* two item plans: for two windows */
    L.shared = off;
    off = 0;
    KVQS_TAKE(res, 4 * M * H);
    KVQS_TAKE(h, 4 * M * H);
    KVQS_TAKE(att, 4 * M * Hq * D);
    KVQS_TAKE(tmp, 4 * M * H);
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
    L.per_thread = off + 2 * KVQS_MAX_PARTS * L.xq_bytes;
    return L;
}

/* Layer l's attention window (<= 0: full). */
static inline int layer_window(const kvq_stack_model *m, const int64_t *layer) {
    return layer[KVQS_WINDOW] > 0 ? (int)layer[KVQS_WINDOW] : m->window;
}

/* The distinct windows of the layers, at most two: *wa (layer 0's) and *wb (another, or wa).
 * Returns 0 where the layers have more than two. */
static int model_windows(const kvq_stack_model *m, int *wa, int *wb) {
    int a = layer_window(m, m->layers), b = a;
    for (int l = 1; l < m->num_layers; ++l) {
        const int w = layer_window(m, m->layers + (int64_t)l * KVQS_LAYER_COLS);
        const int full = w <= 0;
        if (full ? a <= 0 || b <= 0 : w == a || w == b) continue;
        if (b != a) return 0;
        b = w;
    }
    *wa = a, *wb = b;
    return 1;
}

/* The model checks, so that no step can send a read or write out of bounds. */
static int check_model(const kvq_stack_model *m) {
    const int D = m->head_dim;
    if (m->num_layers < 1 || m->hidden < 1 || m->inter < 1 || D < KVQS_LANES || D % KVQS_LANES ||
        D > KVQS_MAX_HEAD_DIM || m->num_kv_heads < 1 || m->num_heads < 1 || m->num_heads % m->num_kv_heads ||
        m->num_heads / m->num_kv_heads > KVQS_MAX_GROUP || m->block_size < 1 || m->num_blocks < 1 ||
        m->vocab < 1 || !m->embed || !m->final_norm || !m->inv_freq || !m->layers || (m->flags & ~KVQS_FLAGS))
        return 0;
    int wa, wb;
    if (!model_windows(m, &wa, &wb)) return 0;
    const int eq = m->embed_qtype;
    const int64_t erow = eq == KVQS_GGML_F32 ? 4 * (int64_t)m->hidden
                         : eq == KVQS_GGML_F16 || eq == KVQS_GGML_BF16 ? 2 * (int64_t)m->hidden
                         : known_qtype(eq) ? kvq_row_bytes(eq, m->hidden) : -1;
    if (erow < 0 || m->embed_row_bytes < erow) return 0;
    const int64_t K_of[KVQS_NUM_LINEARS] = {m->hidden, (int64_t)m->num_heads * D, m->hidden, m->hidden, m->inter};
    const int64_t N_of[KVQS_NUM_LINEARS] = {(int64_t)(m->num_heads + 2 * m->num_kv_heads) * D, m->hidden, m->inter,
                                            m->inter, m->hidden};
    for (int l = 0; l < m->num_layers; ++l) {
        const int64_t *layer = m->layers + (int64_t)l * KVQS_LAYER_COLS;
        if (!layer[KVQS_INPUT_NORM] || !layer[KVQS_POST_NORM] || !layer[KVQS_K_CACHE] || !layer[KVQS_V_CACHE])
            return 0;
        if ((m->flags & KVQS_QK_NORM) && (!layer[KVQS_Q_NORM] || !layer[KVQS_K_NORM])) return 0;
        if ((m->flags & KVQS_SANDWICH) && (!layer[KVQS_PRE_FF_NORM] || !layer[KVQS_POST_FF_NORM])) return 0;
        if (layer[KVQS_WINDOW] < 0 || layer[KVQS_WINDOW] > INT32_MAX || layer[KVQS_ROPE_SET] < 0 ||
            layer[KVQS_ROPE_SET] > 1 || (layer[KVQS_ROPE_SET] == 1 && !m->local_inv_freq))
            return 0;
        for (int i = 0; i < KVQS_NUM_LINEARS; ++i) {
            const int64_t *lin = layer + KVQS_LINEARS + i * KVQS_LIN_COLS;
            if (lin[0] < 1 || lin[0] > KVQS_MAX_PARTS || linear_rows(lin) != N_of[i]) return 0;
            for (int p = 0; p < (int)lin[0]; ++p) {
                const int64_t *pc = lin + 2 + p * KVQS_PART_COLS;
                if (!known_qtype((int)pc[1]) || !pc[0] || pc[3] < 1) return 0;
                const int64_t rb = kvq_row_bytes((int)pc[1], K_of[i]);
                if (rb < 0 || pc[2] < rb) return 0;
            }
        }
    }
    return 1;
}

int64_t kvq_decoder_stack_scratch(const kvq_stack_model *m, int M, int threads) {
    if (M < 1 || M > KVQS_MAX_ROWS || threads < 1 || !check_model(m)) return -1;
    const layout_t L = scratch_layout(m, M);
    return L.shared + (int64_t)threads * L.per_thread + KVQS_ALIGN; /* + room to align the pointer */
}

/* Attention work items: rows' (first item, splits) pairs; each row's Hkv * splits items are
 * numbered KV head major. Splits spread one row's few KV heads over the threads (SmolLM2 has 3
 * KV heads for 2 threads) but keep at least one tile of keys each. */
static int plan_items(int M, int nseq, int Hkv, const int32_t *lens, int window, int nthreads, int32_t *items) {
    /* splits per row from the number of distinct sequences, so that a speculative verify step
     * (k + 1 rows of one sequence) splits each row as a one-row decode of it would: same sums */
    int target = (2 * nthreads + nseq * Hkv - 1) / (nseq * Hkv);
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

/* First context position of split s of row b's attention (S splits; window <= 0: full). */
static inline int item_start(const int32_t *lens, int b, int window, int S, int s) {
    const int L = lens[b], n = window > 0 && L > window ? window : L;
    return L - n + (int)((int64_t)n * s / S);
}

/* Row b's split s joins row b - 1's: b continues b - 1's sequence (cont), with as many splits
 * and split s starting at the same position, so one item can read the keys for both. */
static inline int item_joins(const uint8_t *cont, const int32_t *items, const int32_t *lens, int b, int window,
                             int s) {
    return b > 0 && cont[b] && items[2 * b + 1] == items[2 * b - 1] &&
           item_start(lens, b, window, items[2 * b + 1], s) == item_start(lens, b - 1, window, items[2 * b + 1], s);
}

/* Per-thread time of thread 0 in each phase, barrier waits included (tuning builds only:
 * -DKVQS_PROFILE adds kvq_stack_profile). */
#ifdef KVQS_PROFILE
enum { KVQS_PROF_PHASES = 6 };
static double g_prof[KVQS_PROF_PHASES];
void kvq_stack_profile(double *out, int reset);
void kvq_stack_profile(double *out, int reset) {
    for (int i = 0; i < KVQS_PROF_PHASES; ++i) {
        out[i] = g_prof[i];
        if (reset) g_prof[i] = 0.0;
    }
}
#define PROF_START double prof_t = omp_get_wtime();
#define PROF(i)                                   \
    if (omp_get_thread_num() == 0) {             \
        const double prof_now = omp_get_wtime(); \
        g_prof[i] += prof_now - prof_t;          \
        prof_t = prof_now;                       \
    }
#else
#define PROF_START
#define PROF(i)
#endif

int kvq_decoder_stack_f32(const kvq_stack_model *m, int M, const int64_t *ids, const int64_t *positions,
                          const int32_t *tables, int64_t table_width, const int32_t *lens, const int64_t *slots,
                          float *out, void *scratch, int64_t scratch_bytes) {
    if (M < 1 || M > KVQS_MAX_ROWS) return KVQS_EARG;
    const int H = m->hidden, Hq = m->num_heads, Hkv = m->num_kv_heads, D = m->head_dim, I = m->inter;
    const int G = Hq / Hkv, bs = m->block_size, Oqkv = (Hq + 2 * Hkv) * D;
    const int qk_norm = m->flags & KVQS_QK_NORM, sandwich = m->flags & KVQS_SANDWICH;
    const int gelu = m->flags & KVQS_GELU_TANH;
    const layout_t lay = scratch_layout(m, M);
    const int64_t fit = (scratch_bytes - KVQS_ALIGN - lay.shared) / lay.per_thread;
    if (fit < 1) return KVQS_ESCRATCH;
    int wa, wb;
    if (!model_windows(m, &wa, &wb)) return KVQS_EARG;
    /* the widest window any layer reads: all of its blocks must be in the cache */
    const int widest = wa <= 0 || wb <= 0 ? 0 : (wa > wb ? wa : wb);
    for (int b = 0; b < M; ++b)
        if (ids[b] < 0 || ids[b] >= m->vocab) return KVQS_EID;
    const int64_t cache_slots = m->num_blocks * bs;
    for (int b = 0; b < M; ++b) {
        const int L = lens[b];
        if (L < 1 || (L + bs - 1) / bs > table_width || slots[b] < -1 || slots[b] >= cache_slots) return KVQS_ESEQ;
        const int32_t *tab = tables + (int64_t)b * table_width;
        const int n = widest > 0 && L > widest ? widest : L;
        for (int i = (L - n) / bs; i <= (L - 1) / bs; ++i)
            if (tab[i] < 0 || tab[i] >= m->num_blocks) return KVQS_ESEQ;
    }

    char *base = (char *)(((uintptr_t)scratch + KVQS_ALIGN - 1) / KVQS_ALIGN * KVQS_ALIGN);
    float *emb = (float *)(base + lay.emb), *xo = (float *)(base + lay.xo), *qkv = (float *)(base + lay.qkv);
    float *gu = (float *)(base + lay.gu), *rope = (float *)(base + lay.rope), *part = (float *)(base + lay.part);
    float *rope_local = rope + (int64_t)M * D;
    int32_t *items_a = (int32_t *)(base + lay.items), *items_b = items_a + 2 * M;
    const int64_t pstride = (int64_t)G * (D + 2); /* floats per attention item's partial */

    /* the embeddings are the first residual */
    const int eq = m->embed_qtype;
    if (eq == KVQS_GGML_F32 || eq == KVQS_GGML_F16 || eq == KVQS_GGML_BF16) {
        for (int b = 0; b < M; ++b) {
            const char *row = (const char *)m->embed + ids[b] * m->embed_row_bytes;
            float *r = emb + (int64_t)b * H;
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
    } else if (kvq_get_rows(eq, m->embed, m->embed_row_bytes, m->vocab, ids, M, H, emb) != 0) {
        return KVQS_EID;
    }
    if (m->embed_scale != 0.f && m->embed_scale != 1.f) /* Gemma: times sqrt(hidden), as PyTorch's fp32 multiply */
        for (int64_t i = 0; i < (int64_t)M * H; ++i) emb[i] *= m->embed_scale;
    /* RoPE factors per row: cos and sin of position * inv_freq, in fp32 as PyTorch computes them */
    for (int set = 0; set < (m->local_inv_freq ? 2 : 1); ++set) {
        const float *inv_freq = set ? m->local_inv_freq : m->inv_freq;
        for (int b = 0; b < M; ++b) {
            float *cs = (set ? rope_local : rope) + (int64_t)b * D;
            for (int i = 0; i < D / 2; ++i) {
                const float f = (float)positions[b] * inv_freq[i];
                cs[i] = cosf(f);
                cs[D / 2 + i] = sinf(f);
            }
        }
    }
    const int omp_threads = omp_get_max_threads();
    const int nthreads = omp_threads < fit ? omp_threads : (int)fit;
    /* Rows of one sequence (a speculative verify step sends positions L-1, L, ..., one row
     * each, with the same block table): row b continues row b-1 when its table row is the same
     * and its length is one more. Their K/V are then all written before any attention reads
     * the cache (a later row reads the earlier rows' positions). */
    int nseq = 1;
    uint8_t cont[KVQS_MAX_ROWS] = {0}; /* row b continues row b - 1's sequence */
    for (int b = 1; b < M; ++b) {
        const int same = lens[b] == lens[b - 1] + 1 &&
                         memcmp(tables + (int64_t)b * table_width, tables + (int64_t)(b - 1) * table_width,
                                sizeof(int32_t) * (size_t)((lens[b] + bs - 1) / bs)) == 0;
        cont[b] = (uint8_t)same;
        nseq += !same;
    }
    const int shared = nseq < M;
    /* Such rows' items that start at the same position run as one (attn_partial_rows), up to
     * rjoint rows each: the first row of each run of rjoint leads, the others' items are empty. */
    int rjoint = KVQS_JOINT_FLOATS / (G * D);
    rjoint = rjoint < KVQS_JOINT_ROWS ? rjoint : KVQS_JOINT_ROWS;
    if (!shared) rjoint = 1;
    /* attention items for each of the (at most two) windows of the layers */
    const int nitems_a = plan_items(M, nseq, Hkv, lens, wa, nthreads, items_a);
    const int nitems_b = wb == wa ? nitems_a : plan_items(M, nseq, Hkv, lens, wb, nthreads, items_b);
    if (wb == wa) items_b = items_a;

    /* Five barriers a layer, after each phase that writes a shared buffer (qkv, attention
     * partials, o, gate/up, down). The row ops between them (residual add, RMSNorm, merging the
     * attention splits, activation quantization) are cheap at decode sizes, so every thread does
     * them for all rows into its own buffers (the same arithmetic, so the same values) instead of
     * one thread doing them between two more barriers. */
    KVQS_PRAGMA(omp parallel num_threads(nthreads))
    {
        char *mine = base + lay.shared + (int64_t)omp_get_thread_num() * lay.per_thread;
        float *res = (float *)(mine + lay.res), *h = (float *)(mine + lay.h), *att = (float *)(mine + lay.att);
        float *tmp = (float *)(mine + lay.tmp);
        char *xq[2 * KVQS_MAX_PARTS];
        for (int i = 0; i < 2 * KVQS_MAX_PARTS; ++i) xq[i] = mine + lay.xq + i * lay.xq_bytes;
        memcpy(res, emb, sizeof(float) * (size_t)M * H);
        int64_t lo, hi;
        phase_t ph_qkv, ph_o, ph_gu, ph_down;
        const float *post_ff = NULL; /* sandwich: the previous layer's post-feedforward norm */
        PROF_START
        for (int l = 0; l < m->num_layers; ++l) {
            const int64_t *layer = m->layers + (int64_t)l * KVQS_LAYER_COLS;
            float *kc = (float *)(intptr_t)layer[KVQS_K_CACHE], *vc = (float *)(intptr_t)layer[KVQS_V_CACHE];
            const int window = layer_window(m, layer);
            const int32_t *items = window == wa || (window <= 0 && wa <= 0) ? items_a : items_b;
            const int nitems = items == items_a ? nitems_a : nitems_b;
            const float *rope_l = layer[KVQS_ROPE_SET] == 1 ? rope_local : rope;
            const float *qn = (const float *)(intptr_t)layer[KVQS_Q_NORM], *kn = (const float *)(intptr_t)layer[KVQS_K_NORM];
            phase_build(&ph_qkv, layer, KVQS_QKV);
            phase_build(&ph_o, layer, KVQS_O);
            phase_build(&ph_down, layer, KVQS_DOWN);
            ph_gu.nparts = ph_gu.nacts = 0; /* gate rows then up rows: out columns [0, I) and [I, 2I) */
            phase_add(&ph_gu, layer + KVQS_LINEARS + KVQS_GATE * KVQS_LIN_COLS, 0);
            const int ngate = ph_gu.nparts;
            phase_add(&ph_gu, layer + KVQS_LINEARS + KVQS_UP * KVQS_LIN_COLS, I);

            /* h = input_norm(x + residual) (layer 0: of the embeddings), qkv = h W_qkv (+ b) */
            for (int b = 0; b < M; ++b) {
                const float *x = l ? xo + (int64_t)b * H : NULL;
                if (x && sandwich) {
                    rmsnorm(x, post_ff, tmp + (int64_t)b * H, H, m->eps);
                    x = tmp + (int64_t)b * H;
                }
                add_rmsnorm(x, res + (int64_t)b * H, (const float *)(intptr_t)layer[KVQS_INPUT_NORM],
                            h + (int64_t)b * H, H, m->eps);
            }
            quantize_rows(&ph_qkv, h, H, xq, M, H);
            thread_share(Oqkv, &lo, &hi);
            gemm_rows(&ph_qkv, xq, qkv, Oqkv, M, H, lo, hi);
            KVQS_PRAGMA(omp barrier)
            PROF(0)
            if (shared) { /* every row's k and v into the cache first (implicit barrier) */
                KVQS_PRAGMA(omp for schedule(static))
                for (int it = 0; it < M * Hkv; ++it) {
                    const int b = it / Hkv, kvh = it % Hkv;
                    if (slots[b] < 0) continue;
                    const float *row = qkv + (int64_t)b * Oqkv;
                    float knew[KVQS_MAX_HEAD_DIM];
                    norm_rope_heads(row + (int64_t)(Hq + kvh) * D, knew, 1, D, rope_l + (int64_t)b * D,
                                    qk_norm ? kn : NULL, m->eps);
                    memcpy(kc + (slots[b] * Hkv + kvh) * D, knew, sizeof(float) * (size_t)D);
                    memcpy(vc + (slots[b] * Hkv + kvh) * D, row + (int64_t)(Hq + Hkv + kvh) * D,
                           sizeof(float) * (size_t)D);
                }
            }
            /* attention items: each rotates its q heads and k; the item holding the last position
             * writes k and v to the cache slot (unless written above) */
            KVQS_PRAGMA(omp for schedule(dynamic, 1))
            for (int it = 0; it < nitems; ++it) {
                int b = 0;
                while (b + 1 < M && items[2 * (b + 1)] <= it) ++b;
                const int S = items[2 * b + 1], local = it - items[2 * b], kvh = local / S, s = local % S;
                const int L = lens[b], n = window > 0 && L > window ? window : L, start = L - n;
                const int t0 = start + (int)((int64_t)n * s / S), t1 = start + (int)((int64_t)n * (s + 1) / S);
                if (rjoint > 1) {
                    int c = 0; /* place in its run of joining rows */
                    while (b - c > 0 && item_joins(cont, items, lens, b - c, window, s)) ++c;
                    if (c % rjoint) continue; /* a row above runs this item with its own */
                    int R = 1;
                    while (R < rjoint && b + R < M && item_joins(cont, items, lens, b + R, window, s)) ++R;
                    if (R > 1) {
                        float qs[KVQS_JOINT_FLOATS], ks[KVQS_JOINT_ROWS * KVQS_MAX_HEAD_DIM];
                        const float *vn[KVQS_JOINT_ROWS];
                        float *pr[KVQS_JOINT_ROWS];
                        int tn[KVQS_JOINT_ROWS], t1s[KVQS_JOINT_ROWS];
                        for (int r = 0; r < R; ++r) {
                            const float *rw = qkv + (int64_t)(b + r) * Oqkv, *rc = rope_l + (int64_t)(b + r) * D;
                            norm_rope_heads(rw + (int64_t)kvh * G * D, qs + (int64_t)r * G * D, G, D, rc,
                                            qk_norm ? qn : NULL, m->eps);
                            norm_rope_heads(rw + (int64_t)(Hq + kvh) * D, ks + (int64_t)r * D, 1, D, rc,
                                            qk_norm ? kn : NULL, m->eps);
                            vn[r] = rw + (int64_t)(Hq + Hkv + kvh) * D;
                            tn[r] = lens[b + r] - 1;
                            t1s[r] = item_start(lens, b + r, window, S, s + 1);
                            pr[r] = part + (int64_t)(items[2 * (b + r)] + kvh * S + s) * pstride;
                        }
                        /* the last row's table: checked for the longest context, and equal to each
                         * earlier row's over that row's context (the rows' tables were compared) */
                        attn_partial_rows(kc, vc, qs, ks, vn, tn, tables + (b + R - 1) * table_width, bs, Hkv, kvh,
                                          D, G, R, t0, t1s, m->scale, pr);
                        continue;
                    }
                }
                const float *row = qkv + (int64_t)b * Oqkv, *cs = rope_l + (int64_t)b * D;
                float q[KVQS_MAX_GROUP * KVQS_MAX_HEAD_DIM], knew[KVQS_MAX_HEAD_DIM];
                const float *vnew = row + (int64_t)(Hq + Hkv + kvh) * D;
                norm_rope_heads(row + (int64_t)kvh * G * D, q, G, D, cs, qk_norm ? qn : NULL, m->eps);
                norm_rope_heads(row + (int64_t)(Hq + kvh) * D, knew, 1, D, cs, qk_norm ? kn : NULL, m->eps);
                if (!shared && s == S - 1 && slots[b] >= 0) {
                    memcpy(kc + (slots[b] * Hkv + kvh) * D, knew, sizeof(float) * (size_t)D);
                    memcpy(vc + (slots[b] * Hkv + kvh) * D, vnew, sizeof(float) * (size_t)D);
                }
                attn_partial(kc, vc, q, knew, vnew, L - 1, tables + b * table_width, bs, Hkv, kvh, D, G, t0, t1,
                             m->scale, part + (int64_t)it * pstride);
            }
            PROF(1)
            /* (implicit barrier) merge each row's splits; o = attention W_o (+ b) */
            for (int b = 0; b < M; ++b) {
                const int first = items[2 * b], S = items[2 * b + 1];
                for (int kvh = 0; kvh < Hkv; ++kvh)
                    for (int g = 0; g < G; ++g)
                        attn_merge(part + (int64_t)(first + kvh * S) * pstride + g * (D + 2), pstride, S, D,
                                   att + ((int64_t)b * Hq + kvh * G + g) * D);
            }
            quantize_rows(&ph_o, att, (int64_t)Hq * D, xq, M, (int64_t)Hq * D);
            thread_share(H, &lo, &hi);
            gemm_rows(&ph_o, xq, xo, H, M, (int64_t)Hq * D, lo, hi);
            KVQS_PRAGMA(omp barrier)
            PROF(2)
            /* h = post_norm(o + residual) (sandwich: residual += post_norm(o); h = pre_ff_norm(residual));
             * this thread's gate and up rows, then act(gate) * up over the same range, written over
             * gate (gu's first I columns) */
            for (int b = 0; b < M; ++b) {
                if (sandwich) {
                    rmsnorm(xo + (int64_t)b * H, (const float *)(intptr_t)layer[KVQS_POST_NORM], tmp + (int64_t)b * H,
                            H, m->eps);
                    add_rmsnorm(tmp + (int64_t)b * H, res + (int64_t)b * H,
                                (const float *)(intptr_t)layer[KVQS_PRE_FF_NORM], h + (int64_t)b * H, H, m->eps);
                } else {
                    add_rmsnorm(xo + (int64_t)b * H, res + (int64_t)b * H,
                                (const float *)(intptr_t)layer[KVQS_POST_NORM], h + (int64_t)b * H, H, m->eps);
                }
            }
            quantize_rows(&ph_gu, h, H, xq, M, H);
            {
                phase_t g = ph_gu, u = ph_gu;
                g.nparts = ngate;
                memmove(u.p, u.p + ngate, sizeof(part_t) * (size_t)(u.nparts - ngate));
                u.nparts -= ngate;
                thread_share(I, &lo, &hi);
                gemm_rows(&g, xq, gu, 2 * (int64_t)I, M, H, lo, hi);
                gemm_rows(&u, xq, gu, 2 * (int64_t)I, M, H, lo, hi);
                for (int b = 0; b < M; ++b) {
                    if (gelu)
                        gelu_tanh_mul(gu + (int64_t)b * 2 * I, gu + (int64_t)b * 2 * I + I, lo, hi);
                    else
                        silu_mul(gu + (int64_t)b * 2 * I, gu + (int64_t)b * 2 * I + I, lo, hi);
                }
            }
            KVQS_PRAGMA(omp barrier)
            PROF(3)
            /* x = act W_down */
            quantize_rows(&ph_down, gu, 2 * (int64_t)I, xq, M, I);
            thread_share(H, &lo, &hi);
            gemm_rows(&ph_down, xq, xo, H, M, I, lo, hi);
            KVQS_PRAGMA(omp barrier)
            PROF(4)
            post_ff = (const float *)(intptr_t)layer[KVQS_POST_FF_NORM];
        }
        int64_t m0, m1;
        thread_share(M, &m0, &m1);
        for (int64_t b = m0; b < m1; ++b) {
            const float *x = xo + b * H;
            if (sandwich) {
                rmsnorm(x, post_ff, tmp + b * H, H, m->eps);
                x = tmp + b * H;
            }
            add_rmsnorm(x, res + b * H, m->final_norm, out + b * H, H, m->eps);
        }
    }
    return KVQS_OK;
}
