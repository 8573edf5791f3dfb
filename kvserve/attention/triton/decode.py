"""Paged decode attention (one query token per sequence), flash-decoding style.

Grid `(S, num_kv_heads, num_splits)`. A program owns one sequence, one KV head and *all* query
heads of that head's group (padded to at least 16 rows so the score product runs on tensor
cores), so each K/V tile crosses memory once per group rather than once per query head.

Long contexts are split across `num_splits` programs. Split `j` takes key tiles
`j, j + num_splits, j + 2 * num_splits, ...` (strided rather than contiguous ranges) so that the
split count never depends on the sequence lengths: a CUDA graph captured at one context length
stays correct at any other. Each split writes its unnormalised accumulator with its running max
and denominator; a small reduce kernel merges them. With one split the decode kernel writes the
output directly and no reduce runs.

`num_splits` is an upper bound: a sequence whose context has fewer key tiles than that uses one
split per tile (`_live_splits`, computed on the device from its length), so a graph captured
with many splits does not pay for empty ones at short contexts: the spare programs exit at once,
a sequence left with one split is written directly, and the reduce reads only the live splits.
An eager step, which caps the count at the longest context's tiles, gets the same live count for
every sequence as a replay of a graph captured at its batch size, so the two give the same bits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvserve.attention.triton.online_softmax import fold_tile
from kvserve.models import pdl

_LOG2E = 1.4426950408889634


# Arguments that change from step to step are not specialized (Triton would otherwise compile a
# new variant the first time one of them is 1, a multiple of 16, or a pointer off 16-byte
# alignment), so the few variants the engine uses are all compiled by its start-up warm-up.
_VARYING = ["block_tables_ptr", "seq_lens_ptr", "query_start_loc_ptr", "num_splits", "stride_bt"]


@triton.jit
def _live_splits(seq_len, sliding_window, num_splits, BLOCK_N: tl.constexpr, SLIDING: tl.constexpr):
    """(first key tile, key tiles, splits actually used) of a context of `seq_len` tokens: at
    most one split per key tile, at least one (a padding row of length 0 has no tile)."""
    num_tiles = tl.cdiv(seq_len, BLOCK_N)
    first_tile = num_tiles * 0
    if SLIDING:
        first_tile = tl.maximum(seq_len - sliding_window, 0) // BLOCK_N
    live = tl.maximum(tl.minimum(num_tiles - first_tile, num_splits), 1)
    return first_tile, num_tiles, live


@triton.jit
def _tile_positions(tile, seq_len, sliding_window, BLOCK_N: tl.constexpr, SLIDING: tl.constexpr):
    """Key positions [BLOCK_N] of key tile `tile` and which of them the query attends to."""
    pos = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    in_range = pos < seq_len
    if SLIDING:
        in_range = in_range & (pos >= seq_len - sliding_window)
    return pos, in_range


@triton.jit
def _attend_tile(
    q, k_base, v_base, blk, pos, in_range, m_i, l_i, acc, qk_scale, stride_slot,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """One key tile (its cache blocks `blk`, one per position) folded into the running max
    `m_i`, denominator `l_i` and accumulator `acc` of the query heads `q` [G_PAD, HEAD_DIM]."""
    slot = blk.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE
    kv_off = slot[:, None] * stride_slot + tl.arange(0, HEAD_DIM)[None, :]  # [BLOCK_N, HEAD_DIM]
    k = tl.load(k_base + kv_off, mask=in_range[:, None], other=0.0)
    v = tl.load(v_base + kv_off, mask=in_range[:, None], other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)  # [G_PAD, BLOCK_N], unscaled
    s = tl.where(in_range[None, :], s, float("-inf"))
    return fold_tile(s, v, m_i, l_i, acc, qk_scale, DOT_PREC)


@triton.jit(do_not_specialize=_VARYING[3:], do_not_specialize_on_alignment=_VARYING[:3])
def _decode_kernel(
    q_ptr,
    cache_ptr,
    out_ptr,
    part_acc_ptr,  # [S, num_heads, num_splits, HEAD_DIM] fp32
    part_m_ptr,  # [S, num_heads, num_splits] fp32 (log2 units)
    part_l_ptr,  # [S, num_heads, num_splits] fp32
    block_tables_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    sinks_ptr,  # [num_heads] sink logits (gpt-oss), read only when HAS_SINKS
    qk_scale,
    sliding_window,
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
    G: tl.constexpr,
    G_PAD: tl.constexpr,  # >= 16
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    SLIDING: tl.constexpr,
    MIXED: tl.constexpr,  # batch also holds prefills: find the row via query_start_loc
    DIRECT: tl.constexpr,  # num_splits == 1: normalise and write the output here
    DOT_PREC: tl.constexpr,
    PDL: tl.constexpr,
    HAS_SINKS: tl.constexpr = False,
):
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    # Before the wait: the step's inputs (lengths, block tables), uploaded before its first
    # kernel started, and this split's first block-table entries; the exits come after it.
    if MIXED:
        q_row = tl.load(query_start_loc_ptr + seq)
        q_len = tl.load(query_start_loc_ptr + seq + 1) - q_row
    else:
        q_row = seq  # a pure-decode batch has query_start_loc == arange(S + 1)
    seq_len = tl.load(seq_lens_ptr + seq)
    first_tile, num_tiles, live = _live_splits(seq_len, sliding_window, num_splits, BLOCK_N, SLIDING)
    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    tile = first_tile + split
    pos, in_range = _tile_positions(tile, seq_len, sliding_window, BLOCK_N, SLIDING)
    blk = tl.load(bt_row + pos // BLOCK_SIZE, mask=in_range, other=0)
    pdl.wait(PDL)
    if MIXED:
        if q_len != 1:
            return
    if split >= live:
        return  # a spare split of a short context: the reduce does not read its slot

    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    head = kvh * G + offs_g  # [G_PAD]
    head_valid = offs_g < G
    q_row64 = q_row.to(tl.int64)
    q = tl.load(
        q_ptr + q_row64 * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
        mask=head_valid[:, None],
        other=0.0,
    )  # [G_PAD, HEAD_DIM]

    m_i = tl.full([G_PAD], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([G_PAD], dtype=tl.float32)
    acc = tl.zeros([G_PAD, HEAD_DIM], dtype=tl.float32)
    k_base = cache_ptr + kvh * stride_head
    v_base = k_base + stride_plane
    # The first tile (a length-0 padding row's is all masked and adds nothing), then the rest.
    m_i, l_i, acc = _attend_tile(q, k_base, v_base, blk, pos, in_range, m_i, l_i, acc, qk_scale,
                                 stride_slot, HEAD_DIM, BLOCK_SIZE, DOT_PREC)
    for tile in range(first_tile + split + live, num_tiles, live):
        pos, in_range = _tile_positions(tile, seq_len, sliding_window, BLOCK_N, SLIDING)
        blk = tl.load(bt_row + pos // BLOCK_SIZE, mask=in_range, other=0)
        m_i, l_i, acc = _attend_tile(q, k_base, v_base, blk, pos, in_range, m_i, l_i, acc, qk_scale,
                                     stride_slot, HEAD_DIM, BLOCK_SIZE, DOT_PREC)

    if DIRECT or live == 1:
        if HAS_SINKS:  # the sink's exp joins the denominator (log2 units, like m_i)
            sink = tl.load(sinks_ptr + head, mask=head_valid, other=0.0).to(tl.float32) * 1.4426950408889634
            l_i = l_i + tl.math.exp2(tl.minimum(sink - m_i, 126.0))  # capped: no inf in empty rows
        # seq_len 0 only occurs for CUDA-graph padding rows: write zeros rather than NaN.
        l_safe = tl.where(l_i > 0.0, l_i, 1.0)
        tl.store(
            out_ptr + q_row64 * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
            (acc / l_safe[:, None]).to(out_ptr.dtype.element_ty),
            mask=head_valid[:, None],
        )
    else:
        part = (seq.to(tl.int64) * num_heads + head) * num_splits + split  # [G_PAD]
        tl.store(part_m_ptr + part, m_i, mask=head_valid)
        tl.store(part_l_ptr + part, l_i, mask=head_valid)
        tl.store(
            part_acc_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=head_valid[:, None]
        )


@triton.jit(
    do_not_specialize=["num_splits"],
    do_not_specialize_on_alignment=["seq_lens_ptr", "query_start_loc_ptr", "groups_ptr"],
)
def _decode_reduce_kernel(
    out_ptr,
    part_acc_ptr,
    part_m_ptr,
    part_l_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    sinks_ptr,
    sliding_window,
    num_splits,
    num_heads,
    stride_ot,
    stride_oh,
    groups_ptr,  # GROUPED: `AttentionMetadata.verify_groups` (verify.py); else unused
    SPLITS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SLIDING: tl.constexpr,
    MIXED: tl.constexpr,
    PDL: tl.constexpr,
    HAS_SINKS: tl.constexpr = False,
    GROUPED: tl.constexpr = False,  # splits follow the length of the row's group's last row
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    # The step's inputs before the wait (as in _decode_kernel); the exits after it.
    if MIXED:
        q_row = tl.load(query_start_loc_ptr + seq)
        q_len = tl.load(query_start_loc_ptr + seq + 1) - q_row
    else:
        q_row = seq
    split_len = tl.load(seq_lens_ptr + seq)
    if GROUPED:  # the group's first row holds its row count, the others -(their offset)
        first = seq + tl.minimum(tl.load(groups_ptr + seq), 0)
        split_len = tl.load(seq_lens_ptr + first + tl.load(groups_ptr + first) - 1)
    _, _, live = _live_splits(split_len, sliding_window, num_splits, BLOCK_N, SLIDING)
    pdl.wait(PDL)
    if MIXED:
        if q_len != 1:
            return
    if live == 1:
        return  # the decode kernel wrote this sequence's output itself
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    valid = offs_s < live
    base = (seq.to(tl.int64) * num_heads + head) * num_splits
    # Every live split has at least one key tile, so every slot read here was written.
    m = tl.load(part_m_ptr + base + offs_s, mask=valid, other=-1.0e30)  # [SPLITS_PAD]
    l = tl.load(part_l_ptr + base + offs_s, mask=valid, other=0.0)
    acc = tl.load(
        part_acc_ptr + (base + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
        mask=valid[:, None],
        other=0.0,
    )  # [SPLITS_PAD, HEAD_DIM]
    m_max = tl.max(m, 0)
    w = tl.math.exp2(m - m_max)  # [SPLITS_PAD]
    denom = tl.sum(w * l, 0)
    if HAS_SINKS:
        sink = tl.load(sinks_ptr + head).to(tl.float32) * 1.4426950408889634
        denom += tl.math.exp2(tl.minimum(sink - m_max, 126.0))
    denom = tl.where(denom > 0.0, denom, 1.0)
    out = tl.sum(w[:, None] * acc, 0) / denom  # [HEAD_DIM]
    tl.store(
        out_ptr + q_row.to(tl.int64) * stride_ot + head * stride_oh + offs_d,
        out.to(out_ptr.dtype.element_ty),
    )


def _decode_config(head_dim: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages). Llama-3.1-8B shapes on an H200, us per call: batch 32
    at 4k, (64, 4, 3) 135 vs (128, 8, 3) 140 and (32, 4, 3) 148; batch 1 at 8k, 17.1 vs 15.5."""
    if dtype == torch.float32 or head_dim > 128:
        return 32, 4, 2
    return 64, 4, 3


def choose_num_splits(
    num_seqs: int,
    num_kv_heads: int,
    num_sms: int,
    max_seq_len: int | None,
    block_n: int = 64,
    waves: float = 2.0,
    max_splits: int = 64,
) -> int:
    """Enough programs to fill the GPU `waves` times over. `max_seq_len=None` (CUDA-graph
    capture) ignores context lengths, so the captured split count suits any later length."""
    programs = max(num_seqs * num_kv_heads, 1)
    splits = max(1, min(max_splits, -(-int(waves * num_sms) // programs)))
    if max_seq_len is not None:
        splits = min(splits, max(1, -(-max_seq_len // block_n)))
    # Any count is valid (splits take strided tiles), so no rounding to a power of two.
    return splits


def launch_plan(q, kv_cache, out, num_seqs, num_splits, partials, config):
    """What a decode-attention launch needs from its arguments: (num_heads, head_dim, num_kv_heads,
    block_size, group, block_n, warps, stages, direct, (part_acc, part_m, part_l), use_pdl); the
    split partials allocated when not given (one split writes `out` directly: no partials)."""
    _, num_heads, head_dim = q.shape
    num_kv_heads, block_size = kv_cache.shape[3], kv_cache.shape[2]
    block_n, warps, stages = config or _decode_config(head_dim, q.dtype)
    direct = num_splits == 1
    if direct:
        parts = (out, out, out)  # unused by the kernel in this mode
    else:
        parts = partials if partials is not None else alloc_partials(num_seqs, num_heads, num_splits, head_dim,
                                                                     q.device)
    return (num_heads, head_dim, num_kv_heads, block_size, num_heads // num_kv_heads, block_n, warps, stages, direct,
            tuple(parts), pdl.enabled(q.device))


def decode_attention(
    q: torch.Tensor,  # [T, num_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    out: torch.Tensor,  # [T, num_heads, head_dim]
    block_tables: torch.Tensor,  # [S, max_blocks] int32
    seq_lens: torch.Tensor,  # [S] int32
    query_start_loc: torch.Tensor,  # [S + 1] int32
    num_seqs: int,
    scale: float,
    num_splits: int,
    sliding_window: int | None = None,
    mixed: bool = False,
    partials: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    config: tuple[int, int, int] | None = None,
    sinks: torch.Tensor | None = None,
) -> None:
    """`partials` = (acc [S, H, splits, D] fp32, m [S, H, splits], l [S, H, splits]) scratch,
    allocated here when not given (callers reuse one set across layers). `sinks` [num_heads]:
    per-head sink logits added to each softmax denominator (gpt-oss); None compiles the
    kernels without them."""
    (num_heads, head_dim, num_kv_heads, block_size, group, block_n, warps, stages, direct,
     (part_acc, part_m, part_l), use_pdl) = launch_plan(q, kv_cache, out, num_seqs, num_splits, partials, config)
    _decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        q,
        kv_cache,
        out,
        part_acc,
        part_m,
        part_l,
        block_tables,
        seq_lens,
        query_start_loc,
        sinks if sinks is not None else q,
        scale * _LOG2E,
        sliding_window or 0,
        num_splits,
        num_heads,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        block_tables.stride(0),
        kv_cache.stride(0),
        kv_cache.stride(2),
        kv_cache.stride(3),
        G=group,
        G_PAD=max(16, triton.next_power_of_2(group)),
        BLOCK_N=block_n,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        SLIDING=sliding_window is not None,
        MIXED=mixed,
        DIRECT=direct,
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
        PDL=use_pdl,
        HAS_SINKS=sinks is not None,
        num_warps=warps,
        num_stages=stages,
        launch_pdl=use_pdl,
    )
    if not direct:
        _decode_reduce_kernel[(num_seqs, num_heads)](
            out,
            part_acc,
            part_m,
            part_l,
            seq_lens,
            query_start_loc,
            sinks if sinks is not None else out,
            sliding_window or 0,
            num_splits,
            num_heads,
            out.stride(0),
            out.stride(1),
            seq_lens,  # groups_ptr: unused
            # One padded width for every split count up to 64: a single compiled variant.
            SPLITS_PAD=max(64, triton.next_power_of_2(num_splits)),
            HEAD_DIM=head_dim,
            BLOCK_N=block_n,
            SLIDING=sliding_window is not None,
            MIXED=mixed,
            PDL=use_pdl,
            HAS_SINKS=sinks is not None,
            num_warps=4 if head_dim >= 128 else 2,
            launch_pdl=use_pdl,
        )


def alloc_partials(
    num_seqs: int, num_heads: int, num_splits: int, head_dim: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    acc = torch.empty(num_seqs, num_heads, num_splits, head_dim, dtype=torch.float32, device=device)
    m = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=device)
    l = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=device)
    return acc, m, l
