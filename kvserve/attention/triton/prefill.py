"""Variable-length causal attention over the paged cache: prefill, chunked prefill, mixed batches.

One launch covers every sequence of the step. The grid's first axis enumerates query tiles of
all sequences without any host-side index tensor: sequence `i` owns the tile ids
`[qsl[i] // BLOCK_Q + i, qsl[i + 1] // BLOCK_Q + i + 1)`, a range at least
`ceil(query_len_i / BLOCK_Q)` long, so `T // BLOCK_Q + S` programs always suffice and each
program finds its sequence by a binary search over `query_start_loc`. Programs that land past
the end of their sequence's queries exit at once.

GQA: a program handles one KV head and *all* query heads of its group, packed into the M
dimension of the tile (row = token * G_PAD + head_in_group), so each K/V tile is loaded once
for the group. Keys are always read from the paged cache (the step's own K/V were written there
first), so cached prefixes and fresh chunks take the same path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvserve.attention.triton.online_softmax import fold_tile

_LOG2E = 1.4426950408889634


@triton.jit
def _attend_tile(
    q,  # [BLOCK_M, HEAD_DIM]
    acc,  # [BLOCK_M, HEAD_DIM] fp32
    m_i,  # [BLOCK_M] fp32, running max in log2 units
    l_i,  # [BLOCK_M] fp32, running denominator
    k_base,  # pointer to this KV head's K at slot 0
    v_base,  # pointer to this KV head's V at slot 0
    bt_row,  # pointer to this sequence's block-table row
    start_n,
    q_pos,  # [BLOCK_M] absolute position of each query row
    kv_end,  # keys at positions >= kv_end are never read
    qk_scale,
    sliding_window,
    stride_slot,
    offs_n,
    offs_d,
    BLOCK_SIZE: tl.constexpr,
    MASKED: tl.constexpr,
    SLIDING: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    pos = start_n + offs_n  # [BLOCK_N]
    if MASKED:
        in_range = pos < kv_end
        blk = tl.load(bt_row + pos // BLOCK_SIZE, mask=in_range, other=0)
    else:
        blk = tl.load(bt_row + pos // BLOCK_SIZE)
    slot = blk.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE  # [BLOCK_N]
    kv_off = slot[:, None] * stride_slot + offs_d[None, :]  # [BLOCK_N, HEAD_DIM]
    if MASKED:
        k = tl.load(k_base + kv_off, mask=in_range[:, None], other=0.0)
        v = tl.load(v_base + kv_off, mask=in_range[:, None], other=0.0)
    else:
        k = tl.load(k_base + kv_off)
        v = tl.load(v_base + kv_off)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)  # [BLOCK_M, BLOCK_N], unscaled
    if MASKED:
        visible = (pos[None, :] <= q_pos[:, None]) & in_range[None, :]
        if SLIDING:
            visible = visible & (pos[None, :] > q_pos[:, None] - sliding_window)
        s = tl.where(visible, s, float("-inf"))
    m_new, l_i, acc = fold_tile(s, v, m_i, l_i, acc, qk_scale, DOT_PREC)
    return acc, m_new, l_i


# Per-step values are not specialized on (see decode.py): one compiled variant per SKIP_DECODES.
@triton.jit(
    do_not_specialize=["num_seqs", "stride_bt"],
    do_not_specialize_on_alignment=["block_tables_ptr", "seq_lens_ptr", "query_start_loc_ptr"],
)
def _prefill_kernel(
    q_ptr,
    cache_ptr,
    out_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    sinks_ptr,  # [num_heads] sink logits (gpt-oss), read only when HAS_SINKS
    qk_scale,
    num_seqs,
    sliding_window,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_bt,
    stride_plane,
    stride_slot,
    stride_head,
    G: tl.constexpr,  # query heads per KV head
    G_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr,  # query tokens per tile; BLOCK_M = BLOCK_Q * G_PAD rows
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    SLIDING: tl.constexpr,
    SKIP_DECODES: tl.constexpr,  # query-length-1 sequences are left to the decode kernel
    DOT_PREC: tl.constexpr,
    HAS_SINKS: tl.constexpr = False,
):
    BLOCK_M: tl.constexpr = BLOCK_Q * G_PAD
    pid = tl.program_id(0)
    kvh = tl.program_id(1)

    # Largest sequence whose first tile id (qsl[s] // BLOCK_Q + s) is <= pid.
    lo = num_seqs * 0
    hi = num_seqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        first_tile = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if first_tile <= pid:
            lo = mid
        else:
            hi = mid - 1
    seq = lo
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    q_block = pid - (q_start // BLOCK_Q + seq)
    if q_block * BLOCK_Q >= q_len:
        return
    if SKIP_DECODES:
        if q_len == 1:
            return
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx_len = seq_len - q_len

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q_local = q_block * BLOCK_Q + offs_m // G_PAD  # [BLOCK_M] token index inside the chunk
    head_in_group = offs_m % G_PAD
    row_valid = (q_local < q_len) & (head_in_group < G)
    q_head = kvh * G + head_in_group
    q_pos = ctx_len + q_local  # [BLOCK_M]
    q_row = (q_start + q_local).to(tl.int64)
    q = tl.load(
        q_ptr + q_row[:, None] * stride_qt + q_head[:, None] * stride_qh + offs_d[None, :],
        mask=row_valid[:, None],
        other=0.0,
    )  # [BLOCK_M, HEAD_DIM]

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    k_base = cache_ptr + kvh * stride_head
    v_base = k_base + stride_plane
    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    first_pos = ctx_len + q_block * BLOCK_Q  # smallest query position in this tile
    kv_end = ctx_len + tl.minimum(q_block * BLOCK_Q + BLOCK_Q, q_len)
    if SLIDING:
        # Every tile may hold keys outside some row's window: mask them all.
        lo_key = (tl.maximum(first_pos - sliding_window + 1, 0) // BLOCK_N) * BLOCK_N
        full_end = lo_key
    else:
        lo_key = 0
        # Keys below first_pos are visible to every row of the tile: no mask needed there.
        full_end = (first_pos // BLOCK_N) * BLOCK_N

    for start_n in range(lo_key, full_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            q, acc, m_i, l_i, k_base, v_base, bt_row, start_n, q_pos, kv_end,
            qk_scale, sliding_window, stride_slot, offs_n, offs_d,
            BLOCK_SIZE, False, SLIDING, DOT_PREC,
        )
    for start_n in range(full_end, kv_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            q, acc, m_i, l_i, k_base, v_base, bt_row, start_n, q_pos, kv_end,
            qk_scale, sliding_window, stride_slot, offs_n, offs_d,
            BLOCK_SIZE, True, SLIDING, DOT_PREC,
        )

    if HAS_SINKS:  # the sink's exp joins the denominator (log2 units, like m_i)
        sink = tl.load(sinks_ptr + q_head, mask=row_valid, other=0.0).to(tl.float32) * 1.4426950408889634
        l_i = l_i + tl.math.exp2(tl.minimum(sink - m_i, 126.0))  # capped: no inf in empty rows
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(
        out_ptr + q_row[:, None] * stride_ot + q_head[:, None] * stride_oh + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_valid[:, None],
    )


def _prefill_config(head_dim: int, dtype: torch.dtype, g_pad: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) sized to fit Hopper's 227 KB of shared memory.

    head_dim 128, bf16, on an H200 (8 x 2048 causal, TFLOP/s): (128, 64, 4, 3) 305-327,
    (128, 32, 4, 4) 295-318, (128, 64, 8, 3) 252-266, (128, 128, 8, 2) 276-295.
    """
    if dtype == torch.float32:
        block_m, block_n, warps, stages = 64, 32, 4, 2
    elif head_dim <= 128:
        block_m, block_n, warps, stages = 128, 64, 4, 3
    else:
        block_m, block_n, warps, stages = 64, 32, 4, 2
    return max(block_m, g_pad), block_n, warps, stages


def prefill_attention(
    q: torch.Tensor,  # [T, num_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    out: torch.Tensor,  # [T, num_heads, head_dim], written for every row the kernel owns
    block_tables: torch.Tensor,  # [S, max_blocks] int32
    seq_lens: torch.Tensor,  # [S] int32
    query_start_loc: torch.Tensor,  # [S + 1] int32
    num_seqs: int,
    scale: float,
    sliding_window: int | None = None,
    skip_decodes: bool = False,
    config: tuple[int, int, int, int] | None = None,
    sinks: torch.Tensor | None = None,
) -> None:
    """Writes `out` rows of every sequence with query length > 1 (all sequences unless
    `skip_decodes`). `config` = (BLOCK_M, BLOCK_N, num_warps, num_stages) overrides the
    defaults (for benchmarks). `sinks` [num_heads]: per-head sink logits (gpt-oss)."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads, block_size = kv_cache.shape[3], kv_cache.shape[2]
    group = num_heads // num_kv_heads
    g_pad = triton.next_power_of_2(group)
    block_m, block_n, warps, stages = config or _prefill_config(head_dim, q.dtype, g_pad)
    block_q = max(block_m // g_pad, 1)
    grid = (num_tokens // block_q + num_seqs, num_kv_heads)
    _prefill_kernel[grid](
        q,
        kv_cache,
        out,
        block_tables,
        seq_lens,
        query_start_loc,
        sinks if sinks is not None else q,
        scale * _LOG2E,
        num_seqs,
        sliding_window or 0,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        block_tables.stride(0),
        kv_cache.stride(0),
        kv_cache.stride(2),
        kv_cache.stride(3),
        G=group,
        G_PAD=g_pad,
        BLOCK_Q=block_q,
        BLOCK_N=block_n,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        SLIDING=sliding_window is not None,
        SKIP_DECODES=skip_decodes,
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
        HAS_SINKS=sinks is not None,
        num_warps=warps,
        num_stages=stages,
    )
