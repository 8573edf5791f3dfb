/* kvserve's quantized CPU kernels: GGML block formats kept in their bytes and multiplied
 * directly (the contract between csrc/quant/*.c and kvserve/kernels/cpu_quant.py).
 *
 * Weights: a [N, K] matrix is N rows of K/block_size GGML blocks, byte-identical to the GGUF
 * file's tensor data (row stride `w_row_bytes`, normally kvq_row_bytes(qtype, K)). qtype ids are
 * GGML's: Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14.
 *
 * Activations: fp32 rows are first quantized to 8-bit blocks (the "dot type" of the weight's
 * format: 32-value blocks with a scale, and for Q4_1 the block sum as well; 256-value blocks with
 * 16-value partial sums for the K formats), then integer dot products run over the blocks, as
 * llama.cpp does. The layout of quantized activations is private to the C code: callers only
 * size the scratch with kvq_act_bytes.
 *
 * Portability: every function has a plain-C path; AVX2 (+FMA, F16C), AVX-512 (+VNNI) and ARM
 * NEON (+dotprod) paths are chosen at compile time (#if __AVX2__ / __AVX512VNNI__ /
 * __ARM_FEATURE_DOTPROD ...). The Python side builds one library per instruction-set level the
 * CPU has and can force the plain-C one (KVSERVE_CPU_ISA=baseline).
 *
 * Threading: functions named *_range do only rows [n0, n1) of the output and never start
 * threads (for callers that already run inside an OpenMP region, e.g. a fused decoder stack);
 * the others split the work over OpenMP threads themselves. An output value depends only on
 * its weight row and its activation row, never on how rows were split between threads.
 */
#ifndef KVSERVE_KVQ_H
#define KVSERVE_KVQ_H

#include <stdint.h>

#define KVQ_Q4_0 2
#define KVQ_Q4_1 3
#define KVQ_Q5_0 6
#define KVQ_Q8_0 8
#define KVQ_Q4_K 12
#define KVQ_Q5_K 13
#define KVQ_Q6_K 14

int kvq_abi_version(void);
/* The instruction-set path compiled into this build: "avx512vnni", "avx512", "avx2",
 * "neon-dotprod", "neon" or "scalar". */
const char *kvq_isa(void);

/* Bytes of one row of K values in `qtype` (-1: unsupported type or K not a multiple of the
 * block size). */
int64_t kvq_row_bytes(int qtype, int64_t K);
/* Bytes of scratch for M quantized activation rows of K values, for weights of `qtype`. */
int64_t kvq_act_bytes(int qtype, int64_t M, int64_t K);

/* x: [M, K] fp32 (row stride x_stride floats) -> xq (kvq_act_bytes(qtype, M, K) bytes). */
void kvq_quantize_act(int qtype, const float *x, int64_t x_stride, void *xq, int64_t M, int64_t K);
void kvq_quantize_act_range(int qtype, const float *x, int64_t x_stride, void *xq, int64_t M, int64_t K,
                            int64_t m0, int64_t m1);

/* out[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]) for the quantized activations xq of x.
 * out is [M, N] fp32 with row stride out_stride; bias may be NULL. */
void kvq_gemm(int qtype, const void *w, int64_t w_row_bytes, const void *xq, const float *bias,
              float *out, int64_t out_stride, int64_t M, int64_t N, int64_t K);
void kvq_gemm_range(int qtype, const void *w, int64_t w_row_bytes, const void *xq, const float *bias,
                    float *out, int64_t out_stride, int64_t M, int64_t N, int64_t K, int64_t n0, int64_t n1);
/* kvq_gemm whose output rows are the same bits whatever M is, up to 48 rows (kvq_gemm's are for
 * every format but Q8_0 and Q5_0, which change kernels above 4 and 16 rows; in AVX-512 VNNI
 * builds Q8_0 above 1 row, Q5_0 not): Q8_0 goes one weight row at a time at every M, Q5_0 keeps
 * its direct kernel. For LM heads (a speculative verify step's k + 1 rows then give the logits
 * of k + 1 one-row decodes); for a vocabulary-sized Q8_0 head it is also the faster kernel at
 * 1-8 rows. */
void kvq_gemm_rows(int qtype, const void *w, int64_t w_row_bytes, const void *xq, const float *bias,
                   float *out, int64_t out_stride, int64_t M, int64_t N, int64_t K);

/* W rows [0, rows) -> out [rows, K] fp32 (out row stride K). */
void kvq_dequantize(int qtype, const void *w, int64_t w_row_bytes, float *out, int64_t rows, int64_t K);
/* out[i] = dequantized W row ids[i] (an embedding lookup). Returns 0, or -1 when an id is
 * outside [0, num_rows) (nothing past that row is written). */
int kvq_get_rows(int qtype, const void *w, int64_t w_row_bytes, int64_t num_rows, const int64_t *ids,
                 int64_t n, int64_t K, float *out);

/* x [N, K] fp32 -> W [N, row_bytes] in `qtype` (Q8_0, Q4_0, Q4_1: GGML's reference rounding,
 * so the bytes equal the gguf package's quantize). Returns 0, or -1 for an unsupported type. */
int kvq_quantize_weights(int qtype, const float *x, void *w, int64_t N, int64_t K);

#endif
