"""Decode attention for speculative verify steps: one program reads each K/V tile once for all
of a request's k + 1 rows.

A verify step enters a request's k + 1 positions as k + 1 one-token rows of the same block
table with context lengths L, L + 1, ..., L + k (`spec_decode/verify_step.py`). The plain decode
kernel (`decode.py`) gives each row its own programs, so every K/V tile of the context crosses
memory k + 1 times, and its split count is planned for k + 1 sequences (a batch-1 verify step of
5 rows at 1k context: 7 splits of ~2-3 tiles each instead of one tile per program).

Here the rows come in groups (`AttentionMetadata.verify_groups`): a group's first row holds its
row count n (1..W), the others -(their offset from the first). Grid `(S, num_kv_heads,
num_splits)` as in `decode.py`; only the programs of a group's first row work, the others exit.
A program owns one group, one KV head and all query heads of that head's group for each of the
group's rows: a [W * G padded to >= 16, head_dim] query tile, so the score product stays one
tensor-core dot per key tile. The key tiles are those of the group's longest row (its last); each
row masks the keys past its own length. The split count is planned for the number of groups.

Splits take strided key tiles as in `decode.py`; the live count comes from the group's last
row's length for every row of the group (the reduce kernel finds the same count through the
group's first row), so a row with one tile fewer has one fully masked split, which the reduce
weighs by zero. Results equal the per-row kernel's within rounding (different split counts and
dot shapes), not bit for bit. The backend takes this kernel only where the query tile has at
most 64 rows and head_dim <= 128 (beyond, the sm_90 build spills). `KVSERVE_VERIFY_ATTN=rows`
keeps the per-row kernel (see `runner/cuda_graphs.py`, which fills the groups).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvserve.attention.triton.decode import (
    _LOG2E,
    _decode_reduce_kernel,
    _live_splits,
    _tile_positions,
    launch_plan,
)
from kvserve.attention.triton.online_softmax import fold_tile
from kvserve.models import pdl


@triton.jit(
    do_not_specialize=["num_splits", "stride_bt"],
    do_not_specialize_on_alignment=["block_tables_ptr", "seq_lens_ptr", "groups_ptr"],
)
def _verify_decode_kernel(
    q_ptr,
    cache_ptr,
    out_ptr,
    part_acc_ptr,  # [S, num_heads, num_splits, HEAD_DIM] fp32 (per row, as decode.py)
    part_m_ptr,
    part_l_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    groups_ptr,  # [S] int32: n >= 1 on a group's first row, -(offset) on the others
    qk_scale,
    num_splits,
    num_heads,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_bt,
    stride_plane,
    stride_slot,
    stride_head,
    G: tl.constexpr,  # query heads per KV head
    M_PAD: tl.constexpr,  # next power of two >= W * G, >= 16
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    DIRECT: tl.constexpr,
    DOT_PREC: tl.constexpr,
    PDL: tl.constexpr,
):
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    # Before the wait: the step's inputs (groups, lengths, block tables), as in decode.py.
    n = tl.load(groups_ptr + seq)
    n_rows = tl.maximum(n, 1)
    last_len = tl.load(seq_lens_ptr + seq + n_rows - 1)  # the group's longest row
    first_tile, num_tiles, live = _live_splits(last_len, 0, num_splits, BLOCK_N, False)
    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    tile = first_tile + split
    pos, in_range = _tile_positions(tile, last_len, 0, BLOCK_N, False)
    blk = tl.load(bt_row + pos // BLOCK_SIZE, mask=in_range, other=0)
    offs_m = tl.arange(0, M_PAD)
    r = offs_m // G  # [M_PAD] row of the group
    row_valid = r < n  # none on a non-first row (n <= 0)
    row = seq.to(tl.int64) + r
    row_len = tl.load(seq_lens_ptr + row, mask=row_valid, other=0)  # [M_PAD]
    pdl.wait(PDL)
    if n <= 0:
        return  # the group's first row's programs handle this row
    if split >= live:
        return

    offs_d = tl.arange(0, HEAD_DIM)
    head = kvh * G + offs_m % G  # [M_PAD]
    q = tl.load(
        q_ptr + row[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
        mask=row_valid[:, None],
        other=0.0,
    )  # [M_PAD, HEAD_DIM]
    m_i = tl.full([M_PAD], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([M_PAD], dtype=tl.float32)
    acc = tl.zeros([M_PAD, HEAD_DIM], dtype=tl.float32)
    k_base = cache_ptr + kvh * stride_head
    v_base = k_base + stride_plane
    m_i, l_i, acc = _attend_rows(q, k_base, v_base, blk, pos, in_range, row_len, m_i, l_i, acc, qk_scale,
                                 stride_slot, HEAD_DIM, BLOCK_SIZE, DOT_PREC)
    for tile in range(first_tile + split + live, num_tiles, live):
        pos, in_range = _tile_positions(tile, last_len, 0, BLOCK_N, False)
        blk = tl.load(bt_row + pos // BLOCK_SIZE, mask=in_range, other=0)
        m_i, l_i, acc = _attend_rows(q, k_base, v_base, blk, pos, in_range, row_len, m_i, l_i, acc, qk_scale,
                                     stride_slot, HEAD_DIM, BLOCK_SIZE, DOT_PREC)

    if DIRECT or live == 1:
        l_safe = tl.where(l_i > 0.0, l_i, 1.0)  # a padding row of length 0: zeros, not NaN
        tl.store(
            out_ptr + row[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
            (acc / l_safe[:, None]).to(out_ptr.dtype.element_ty),
            mask=row_valid[:, None],
        )
    else:
        part = (row * num_heads + head) * num_splits + split  # [M_PAD]
        tl.store(part_m_ptr + part, m_i, mask=row_valid)
        tl.store(part_l_ptr + part, l_i, mask=row_valid)
        tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=row_valid[:, None])


@triton.jit
def _attend_rows(
    q, k_base, v_base, blk, pos, in_range, row_len, m_i, l_i, acc, qk_scale, stride_slot,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """One key tile, read once, folded into every row of the group: row m sees the keys at
    positions below its own length `row_len[m]`."""
    slot = blk.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE
    kv_off = slot[:, None] * stride_slot + tl.arange(0, HEAD_DIM)[None, :]  # [BLOCK_N, HEAD_DIM]
    k = tl.load(k_base + kv_off, mask=in_range[:, None], other=0.0)
    v = tl.load(v_base + kv_off, mask=in_range[:, None], other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)  # [M_PAD, BLOCK_N], unscaled
    s = tl.where(pos[None, :] < row_len[:, None], s, float("-inf"))
    return fold_tile(s, v, m_i, l_i, acc, qk_scale, DOT_PREC)


def verify_decode_attention(
    q: torch.Tensor,  # [T, num_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    out: torch.Tensor,  # [T, num_heads, head_dim]
    block_tables: torch.Tensor,  # [S, max_blocks] int32 (a group's rows: one table)
    seq_lens: torch.Tensor,  # [S] int32 (a group's rows: increasing)
    query_start_loc: torch.Tensor,  # [S + 1] int32, arange (a pure-decode batch)
    groups: torch.Tensor,  # [S] int32: `AttentionMetadata.verify_groups`
    width: int,  # the most rows of a group
    num_seqs: int,
    scale: float,
    num_splits: int,
    partials: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    config: tuple[int, int, int] | None = None,
) -> None:
    """Pure-decode attention of rows grouped by request (no sliding window, no sinks: callers
    take `decode.decode_attention` for those). `partials` as in `decode.decode_attention`."""
    (num_heads, head_dim, num_kv_heads, block_size, group, block_n, warps, stages, direct,
     (part_acc, part_m, part_l), use_pdl) = launch_plan(q, kv_cache, out, num_seqs, num_splits, partials, config)
    _verify_decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, kv_cache, out, part_acc, part_m, part_l, block_tables, seq_lens, groups,
        scale * _LOG2E, num_splits, num_heads,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        kv_cache.stride(0), kv_cache.stride(2), kv_cache.stride(3),
        G=group, M_PAD=max(16, triton.next_power_of_2(width * group)), BLOCK_N=block_n, HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size, DIRECT=direct, DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
        PDL=use_pdl, num_warps=warps, num_stages=stages, launch_pdl=use_pdl,
    )
    if not direct:
        _decode_reduce_kernel[(num_seqs, num_heads)](
            out, part_acc, part_m, part_l, seq_lens, query_start_loc, out, 0, num_splits, num_heads,
            out.stride(0), out.stride(1), groups,
            SPLITS_PAD=max(64, triton.next_power_of_2(num_splits)), HEAD_DIM=head_dim, BLOCK_N=block_n,
            SLIDING=False, MIXED=False, PDL=use_pdl, HAS_SINKS=False, GROUPED=True,
            num_warps=4 if head_dim >= 128 else 2, launch_pdl=use_pdl,
        )
