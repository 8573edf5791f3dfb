/* Paged decode attention on CPU for a bf16 KV cache (x86-64 with AVX512-BF16).
 *
 * One query row per sequence; for each (sequence, KV head) item, `attn_item` (bf16_kernels.h)
 * attends its group of query heads over the sequence's keys, read in place from the paged
 * cache through its block table: no gather, no padding. Items are spread over the OpenMP
 * threads of the libgomp PyTorch already loaded.
 *
 * Cache layout (kvserve/attention/base.py): K and V each [num_blocks, block_size, Hkv, D].
 */
#include <stdlib.h>

#include "bf16_kernels.h"

int kv_decode_attn_abi_version(void) { return 3; }

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
    int failed = 0;
    if (slots) write_kv_rows(kc, vc, k_new, k_stride, v_new, v_stride, slots, B, Hkv, D);
#pragma omp parallel for collapse(2) schedule(dynamic, 1)
    for (int b = 0; b < B; ++b) {
        for (int h = 0; h < Hkv; ++h) {
            const int n = attn_span(lens[b], window);
            float *sc = (float *)malloc(sizeof(float) * (size_t)G * (size_t)(n > 0 ? n : 1));
            if (!sc) { failed = 1; continue; }
            attn_item(kc, vc, q, q_stride, out, tables, tab_stride, lens, b, h, Hq, Hkv, D, bs, scale, window, sc);
            free(sc);
        }
    }
    return failed ? -1 : 0;
}
