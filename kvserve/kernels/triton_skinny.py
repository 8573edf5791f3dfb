"""Skinny products on CUDA: 2..8 activation rows times a 16-bit weight, reading the weight once.

A speculative verify step at batch 1 multiplies k + 1 rows (5 at k = 4) by every weight, and a
plain decode step at batch 2..8 has as many rows. Both are bound by reading the weights, as a
one-row GEMV is, but cuBLAS reads them less efficiently at these row counts (Llama-3.1-8B, H100:
a 5-row verify step cost 1.22x a one-row step, where the weight read alone would allow ~1.0x).

`skinny` is the one-row GEMV of `kvserve.models.triton_ops` (`_gemv_kernel`) with M accumulators:
every program streams BLOCK_N whole weight rows in BLOCK_K-wide tiles (16-byte loads, the first
PRE tiles requested before the PDL wait) and adds each tile, converted to fp32 once, times each
of the M activation rows into that row's own [BLOCK_N, BLOCK_K] fp32 accumulator — the one-row
GEMV's update, term for term. M (1..8) is a constexpr: the accumulators are eight named
variables of which the first M are used (the others are folded away), so the register cost
grows with M, not with the padded 8. The accumulators' registers limit how many programs an SM
holds, and with them the weight bytes in flight, so by default the loop keeps a ring of four
tiles in flight per program (RING; the order of the sums is unchanged). With the one-row GEMV's
tile shape and warps a row's result has the bits of `triton_ops.gemv` of that row alone (same
tiles, same order, same reduction).

Epilogues, as the one-row kernels: `skinny_silu_mul` (fused gate/up: silu(gate) * up, rounded
where the unfused path rounds) and `skinny_rope_` (fused qkv: each program computes the two rows
of a head that RoPE pairs, rotates each activation row at its own position, and stores that
row's k and v in the paged cache at its own slot; slot -1 stores nothing). No host syncs; the
only allocation is the output (in the graph pool under CUDA-graph capture).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvserve.models import pdl
from kvserve.models.triton_ops import _gemv_preload, _preload_tiles, _rotate

MAX_ROWS = 8  # the kernels' named accumulators


@triton.jit
def _acc_row(acc, wf, x_ptr, stride_x, c, K, R: tl.constexpr, M: tl.constexpr, EVEN_K: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc += w * x[R] (the one-row GEMV's update) where R < M; otherwise acc unchanged."""
    if R < M:
        # x loaded as a [BLOCK_N, BLOCK_K] tile (the rows repeat the same columns): the weight
        # tile's register layout, so no shared-memory layout conversion per row and tile (a 1D
        # [BLOCK_K] load gets its own layout when BLOCK_K < 8 x the threads).
        cc = tl.broadcast_to(c[None, :], [BLOCK_N, BLOCK_K])
        if EVEN_K:
            xr = tl.load(x_ptr + R * stride_x + cc)
        else:
            xr = tl.load(x_ptr + R * stride_x + cc, mask=cc < K, other=0.0)
        acc += wf * xr.to(tl.float32)
    return acc


@triton.jit
def _acc_tile(a0, a1, a2, a3, a4, a5, a6, a7, w, x_ptr, stride_x, c, K, M: tl.constexpr, EVEN_K: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One weight tile [BLOCK_N, BLOCK_K] into the M row accumulators: converted once, used M times."""
    wf = w.to(tl.float32)
    a0 = _acc_row(a0, wf, x_ptr, stride_x, c, K, 0, M, EVEN_K, BLOCK_N, BLOCK_K)
    a1 = _acc_row(a1, wf, x_ptr, stride_x, c, K, 1, M, EVEN_K, BLOCK_N, BLOCK_K)
    a2 = _acc_row(a2, wf, x_ptr, stride_x, c, K, 2, M, EVEN_K, BLOCK_N, BLOCK_K)
    a3 = _acc_row(a3, wf, x_ptr, stride_x, c, K, 3, M, EVEN_K, BLOCK_N, BLOCK_K)
    a4 = _acc_row(a4, wf, x_ptr, stride_x, c, K, 4, M, EVEN_K, BLOCK_N, BLOCK_K)
    a5 = _acc_row(a5, wf, x_ptr, stride_x, c, K, 5, M, EVEN_K, BLOCK_N, BLOCK_K)
    a6 = _acc_row(a6, wf, x_ptr, stride_x, c, K, 6, M, EVEN_K, BLOCK_N, BLOCK_K)
    a7 = _acc_row(a7, wf, x_ptr, stride_x, c, K, 7, M, EVEN_K, BLOCK_N, BLOCK_K)
    return a0, a1, a2, a3, a4, a5, a6, a7


@triton.jit
def _tile(w_ptr, rows64, stride_w, c, K, MASKED: tl.constexpr):
    """Weight tile [BLOCK_N, BLOCK_K] at columns c (zeros past K where MASKED)."""
    if MASKED:
        w = tl.load(w_ptr + rows64[:, None] * stride_w + c[None, :], mask=(c < K)[None, :], other=0.0)
    else:
        w = tl.load(w_ptr + rows64[:, None] * stride_w + c[None, :])
    return w


@triton.jit
def _skinny_finish(x_ptr, stride_x, w_ptr, rows64, K, stride_w, w0, w1, w2, w3, M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, PRE: tl.constexpr,
                   RING: tl.constexpr):
    """[BLOCK_N] fp32 dot products of the weight rows with each of the M activation rows (rows
    R >= M give zeros, never used), from the PRE preloaded tiles and then the rest of the rows.

    RING: the loop keeps four weight tiles in flight (w0..w3: tile t is used while tiles t + 1
    .. t + 4 load; the PRE preloaded tiles are the ring's first ones), so a thread has 4x its
    tile in flight whatever M, instead of relying on more resident programs (which the M
    accumulators' registers limit). The sums are the same, in the same order, either way."""
    cols = tl.arange(0, BLOCK_K)
    a0 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    a1 = a0
    a2 = a0
    a3 = a0
    a4 = a0
    a5 = a0
    a6 = a0
    a7 = a0
    if RING:
        # Fill the ring: tiles PRE..3 were not preloaded (masked: K may hold fewer than 4 tiles).
        if PRE < 1:
            w0 = _tile(w_ptr, rows64, stride_w, cols, K, True)
        if PRE < 2:
            w1 = _tile(w_ptr, rows64, stride_w, BLOCK_K + cols, K, True)
        if PRE < 3:
            w2 = _tile(w_ptr, rows64, stride_w, 2 * BLOCK_K + cols, K, True)
        if PRE < 4:
            w3 = _tile(w_ptr, rows64, stride_w, 3 * BLOCK_K + cols, K, True)
        for k0 in range(0, K, BLOCK_K):
            c = k0 + cols
            w = w0
            w0 = w1
            w1 = w2
            w2 = w3
            w3 = _tile(w_ptr, rows64, stride_w, 4 * BLOCK_K + c, K, True)  # past K: no lane loads
            a0, a1, a2, a3, a4, a5, a6, a7 = _acc_tile(a0, a1, a2, a3, a4, a5, a6, a7, w, x_ptr, stride_x, c, K, M,
                                                       EVEN_K, BLOCK_N, BLOCK_K)
    else:
        # Preloaded tiles are whole (PRE <= K // BLOCK_K): unmasked, as in the one-row GEMV.
        if PRE > 0:
            a0, a1, a2, a3, a4, a5, a6, a7 = _acc_tile(a0, a1, a2, a3, a4, a5, a6, a7, w0, x_ptr, stride_x, cols, K, M,
                                                       True, BLOCK_N, BLOCK_K)
        if PRE > 1:
            a0, a1, a2, a3, a4, a5, a6, a7 = _acc_tile(a0, a1, a2, a3, a4, a5, a6, a7, w1, x_ptr, stride_x,
                                                       BLOCK_K + cols, K, M, True, BLOCK_N, BLOCK_K)
        if PRE > 2:
            a0, a1, a2, a3, a4, a5, a6, a7 = _acc_tile(a0, a1, a2, a3, a4, a5, a6, a7, w2, x_ptr, stride_x,
                                                       2 * BLOCK_K + cols, K, M, True, BLOCK_N, BLOCK_K)
        if PRE > 3:
            a0, a1, a2, a3, a4, a5, a6, a7 = _acc_tile(a0, a1, a2, a3, a4, a5, a6, a7, w3, x_ptr, stride_x,
                                                       3 * BLOCK_K + cols, K, M, True, BLOCK_N, BLOCK_K)
        for k0 in range(PRE * BLOCK_K, K, BLOCK_K):
            c = k0 + cols
            if EVEN_K:
                w = _tile(w_ptr, rows64, stride_w, c, K, False)
            else:
                w = _tile(w_ptr, rows64, stride_w, c, K, True)
            a0, a1, a2, a3, a4, a5, a6, a7 = _acc_tile(a0, a1, a2, a3, a4, a5, a6, a7, w, x_ptr, stride_x, c, K, M,
                                                       EVEN_K, BLOCK_N, BLOCK_K)
    return (tl.sum(a0, 1), tl.sum(a1, 1), tl.sum(a2, 1), tl.sum(a3, 1),
            tl.sum(a4, 1), tl.sum(a5, 1), tl.sum(a6, 1), tl.sum(a7, 1))


@triton.jit
def _store_row(out_ptr, stride_o, s, b, rows, row_ok, R: tl.constexpr, M: tl.constexpr, HAS_BIAS: tl.constexpr):
    if R < M:
        if HAS_BIAS:
            s += b
        tl.store(out_ptr + R * stride_o + rows, s.to(out_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _skinny_kernel(
    x_ptr,  # [M, K], rows stride_x apart, columns contiguous
    w_ptr,  # [N, K], rows contiguous
    b_ptr,  # [N] or unused
    out_ptr,  # [M, N], rows stride_o apart
    N,
    K,
    stride_x,
    stride_w,
    stride_o,
    HAS_BIAS: tl.constexpr,
    M: tl.constexpr,  # activation rows, 1..8
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0
    PRE: tl.constexpr,  # weight tiles loaded before waiting for the previous kernel (0-4)
    RING: tl.constexpr,  # four weight tiles in flight in the loop (`_skinny_finish`)
    PDL: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = tl.where(row_ok, rows, 0).to(tl.int64)
    w0, w1, w2, w3 = _gemv_preload(w_ptr, rows64, stride_w, BLOCK_N, BLOCK_K, PRE)
    pdl.wait(PDL)
    s0, s1, s2, s3, s4, s5, s6, s7 = _skinny_finish(x_ptr, stride_x, w_ptr, rows64, K, stride_w, w0, w1, w2, w3,
                                                    M, BLOCK_N, BLOCK_K, EVEN_K, PRE, RING)
    b = s0  # placeholder without a bias
    if HAS_BIAS:
        b = tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    _store_row(out_ptr, stride_o, s0, b, rows, row_ok, 0, M, HAS_BIAS)
    _store_row(out_ptr, stride_o, s1, b, rows, row_ok, 1, M, HAS_BIAS)
    _store_row(out_ptr, stride_o, s2, b, rows, row_ok, 2, M, HAS_BIAS)
    _store_row(out_ptr, stride_o, s3, b, rows, row_ok, 3, M, HAS_BIAS)
    _store_row(out_ptr, stride_o, s4, b, rows, row_ok, 4, M, HAS_BIAS)
    _store_row(out_ptr, stride_o, s5, b, rows, row_ok, 5, M, HAS_BIAS)
    _store_row(out_ptr, stride_o, s6, b, rows, row_ok, 6, M, HAS_BIAS)
    _store_row(out_ptr, stride_o, s7, b, rows, row_ok, 7, M, HAS_BIAS)


@triton.jit
def _silu_row(out_ptr, stride_o, acc, b, out_rows, I, BLOCK_N: tl.constexpr, R: tl.constexpr, M: tl.constexpr,
              HAS_BIAS: tl.constexpr):
    """Row R's silu(gate) * up from its [2 * BLOCK_N] sums (gate rows, then the up rows), rounded
    where `_gemv_silu_mul_kernel` rounds."""
    if R < M:
        if HAS_BIAS:
            acc += b
        g, u = tl.split(tl.trans(tl.reshape(acc, [2, BLOCK_N])))
        dt = out_ptr.dtype.element_ty
        g = g.to(dt).to(tl.float32)
        u = u.to(dt).to(tl.float32)
        s = (g / (1.0 + tl.exp(-g))).to(dt)
        tl.store(out_ptr + R * stride_o + out_rows, (s.to(tl.float32) * u).to(dt), mask=out_rows < I)


@triton.jit
def _skinny_silu_mul_kernel(
    x_ptr,  # [M, K]
    w_ptr,  # [2I, K]: gate rows, then up rows
    b_ptr,  # [2I] or unused
    out_ptr,  # [M, I]
    I,
    K,
    stride_x,
    stride_w,
    stride_o,
    HAS_BIAS: tl.constexpr,
    M: tl.constexpr,
    BLOCK_N: tl.constexpr,  # gate rows per program (and as many up rows)
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    PRE: tl.constexpr,
    RING: tl.constexpr,
    PDL: tl.constexpr,
):
    r = tl.arange(0, 2 * BLOCK_N)
    is_up = r >= BLOCK_N
    rows = tl.program_id(0) * BLOCK_N + r % BLOCK_N  # [2 * BLOCK_N]: gate row index of each
    row_ok = rows < I
    w_rows = tl.where(is_up, rows + I, rows)
    rows64 = tl.where(row_ok, w_rows, 0).to(tl.int64)
    w0, w1, w2, w3 = _gemv_preload(w_ptr, rows64, stride_w, 2 * BLOCK_N, BLOCK_K, PRE)
    pdl.wait(PDL)
    s0, s1, s2, s3, s4, s5, s6, s7 = _skinny_finish(x_ptr, stride_x, w_ptr, rows64, K, stride_w, w0, w1, w2, w3,
                                                    M, 2 * BLOCK_N, BLOCK_K, EVEN_K, PRE, RING)
    b = s0
    if HAS_BIAS:
        b = tl.load(b_ptr + w_rows, mask=row_ok, other=0.0).to(tl.float32)
    out_rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    _silu_row(out_ptr, stride_o, s0, b, out_rows, I, BLOCK_N, 0, M, HAS_BIAS)
    _silu_row(out_ptr, stride_o, s1, b, out_rows, I, BLOCK_N, 1, M, HAS_BIAS)
    _silu_row(out_ptr, stride_o, s2, b, out_rows, I, BLOCK_N, 2, M, HAS_BIAS)
    _silu_row(out_ptr, stride_o, s3, b, out_rows, I, BLOCK_N, 3, M, HAS_BIAS)
    _silu_row(out_ptr, stride_o, s4, b, out_rows, I, BLOCK_N, 4, M, HAS_BIAS)
    _silu_row(out_ptr, stride_o, s5, b, out_rows, I, BLOCK_N, 5, M, HAS_BIAS)
    _silu_row(out_ptr, stride_o, s6, b, out_rows, I, BLOCK_N, 6, M, HAS_BIAS)
    _silu_row(out_ptr, stride_o, s7, b, out_rows, I, BLOCK_N, 7, M, HAS_BIAS)


@triton.jit
def _pick(v, mr, R: tl.constexpr):
    """Element R of the [M_PAD] vector v (exact: the others are replaced by zeros)."""
    return tl.sum(tl.where(mr == R, v, tl.zeros_like(v)), 0)


@triton.jit
def _rope_row(out_ptr, stride_o, acc, b, rows, pair, c_v, s_v, slot_v, mr, head, j, num_q_heads, num_heads,
              cache_ptr, stride_plane, stride_slot, stride_head, HALF: tl.constexpr, R: tl.constexpr,
              M: tl.constexpr, HAS_BIAS: tl.constexpr, WRITE_KV: tl.constexpr):
    """Row R of `_gemv_rope_kernel`'s epilogue, at the row's own position and slot."""
    if R < M:
        if HAS_BIAS:
            acc += b
        dt = out_ptr.dtype.element_ty
        o = acc.to(dt)
        of = o.to(tl.float32)
        x1 = tl.sum(tl.where(pair == 0, of, 0.0), 0)
        x2 = tl.sum(tl.where(pair == 1, of, 0.0), 0)
        r1, r2 = _rotate(x1, x2, _pick(c_v, mr, R), _pick(s_v, mr, R))
        o = tl.where(head < num_heads, tl.where(pair == 0, r1.to(dt), r2.to(dt)), o)
        tl.store(out_ptr + R * stride_o + rows, o)
        if WRITE_KV:
            slot = _pick(slot_v, mr, R)
            if (slot >= 0) & (head >= num_q_heads):  # k or v, and not a padding row
                is_v = head >= num_heads
                kv_head = tl.where(is_v, head - num_heads, head - num_q_heads).to(tl.int64)
                dst = cache_ptr + is_v.to(tl.int64) * stride_plane + slot * stride_slot + kv_head * stride_head
                tl.store(dst + j + pair * HALF, o.to(cache_ptr.dtype.element_ty))


# positions and slots are slices of the step's staging buffer (alignment varies per step).
@triton.jit(do_not_specialize_on_alignment=["pos_ptr", "slot_ptr"])
def _skinny_rope_kernel(
    x_ptr,  # [M, K]
    w_ptr,  # [(Hq + 2 Hkv) * 2 HALF, K]: the fused q, k, v projection
    b_ptr,  # [N] or unused
    out_ptr,  # [M, N]: q and k rotated, v as computed
    pos_ptr,  # [M]
    cos_sin_ptr,  # [max_pos, 2 * HALF] fp32: cos ‖ sin
    cache_ptr,  # WRITE_KV: [2, blocks, block_size, kv_heads, 2 * HALF]
    slot_ptr,  # WRITE_KV: [M] int64, -1 = no write
    K,
    stride_x,
    stride_w,
    stride_o,
    stride_cs,
    num_q_heads,
    num_heads,  # q heads + k heads: the heads that are rotated
    stride_plane,
    stride_slot,
    stride_head,
    HAS_BIAS: tl.constexpr,
    HALF: tl.constexpr,
    M: tl.constexpr,
    M_PAD: tl.constexpr,  # next power of two >= M
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    WRITE_KV: tl.constexpr,
    PRE: tl.constexpr,
    RING: tl.constexpr,
    PDL: tl.constexpr,
):
    """`_gemv_rope_kernel` for M rows: one program computes the two weight rows of a head that
    RoPE pairs (d and d + HALF) for every activation row, then rotates (and stores k / v of) each
    row at its own position (and slot)."""
    p = tl.program_id(0)
    head = p // HALF
    j = p % HALF
    pair = tl.arange(0, 2)
    rows = (head * (2 * HALF) + j + pair * HALF).to(tl.int64)  # [2]
    w0, w1, w2, w3 = _gemv_preload(w_ptr, rows, stride_w, 2, BLOCK_K, PRE)
    pdl.wait(PDL)
    # The epilogue's inputs are requested first: in flight during the dot products.
    mr = tl.arange(0, M_PAD)
    m_ok = mr < M
    pos = tl.load(pos_ptr + mr, mask=m_ok, other=0).to(tl.int64)
    c_v = tl.load(cos_sin_ptr + pos * stride_cs + j)  # [M_PAD]; padding rows read position 0
    s_v = tl.load(cos_sin_ptr + pos * stride_cs + HALF + j)
    slot_v = mr.to(tl.int64)  # placeholder without a cache
    if WRITE_KV:
        slot_v = tl.load(slot_ptr + mr, mask=m_ok, other=-1).to(tl.int64)
    b = tl.zeros([2], dtype=tl.float32)
    if HAS_BIAS:
        b = tl.load(b_ptr + rows).to(tl.float32)
    s0, s1, s2, s3, s4, s5, s6, s7 = _skinny_finish(x_ptr, stride_x, w_ptr, rows, K, stride_w, w0, w1, w2, w3,
                                                    M, 2, BLOCK_K, EVEN_K, PRE, RING)
    _rope_row(out_ptr, stride_o, s0, b, rows, pair, c_v, s_v, slot_v, mr, head, j, num_q_heads, num_heads, cache_ptr,
              stride_plane, stride_slot, stride_head, HALF, 0, M, HAS_BIAS, WRITE_KV)
    _rope_row(out_ptr, stride_o, s1, b, rows, pair, c_v, s_v, slot_v, mr, head, j, num_q_heads, num_heads, cache_ptr,
              stride_plane, stride_slot, stride_head, HALF, 1, M, HAS_BIAS, WRITE_KV)
    _rope_row(out_ptr, stride_o, s2, b, rows, pair, c_v, s_v, slot_v, mr, head, j, num_q_heads, num_heads, cache_ptr,
              stride_plane, stride_slot, stride_head, HALF, 2, M, HAS_BIAS, WRITE_KV)
    _rope_row(out_ptr, stride_o, s3, b, rows, pair, c_v, s_v, slot_v, mr, head, j, num_q_heads, num_heads, cache_ptr,
              stride_plane, stride_slot, stride_head, HALF, 3, M, HAS_BIAS, WRITE_KV)
    _rope_row(out_ptr, stride_o, s4, b, rows, pair, c_v, s_v, slot_v, mr, head, j, num_q_heads, num_heads, cache_ptr,
              stride_plane, stride_slot, stride_head, HALF, 4, M, HAS_BIAS, WRITE_KV)
    _rope_row(out_ptr, stride_o, s5, b, rows, pair, c_v, s_v, slot_v, mr, head, j, num_q_heads, num_heads, cache_ptr,
              stride_plane, stride_slot, stride_head, HALF, 5, M, HAS_BIAS, WRITE_KV)
    _rope_row(out_ptr, stride_o, s6, b, rows, pair, c_v, s_v, slot_v, mr, head, j, num_q_heads, num_heads, cache_ptr,
              stride_plane, stride_slot, stride_head, HALF, 6, M, HAS_BIAS, WRITE_KV)
    _rope_row(out_ptr, stride_o, s7, b, rows, pair, c_v, s_v, slot_v, mr, head, j, num_q_heads, num_heads, cache_ptr,
              stride_plane, stride_slot, stride_head, HALF, 7, M, HAS_BIAS, WRITE_KV)


Config = tuple  # (BLOCK_N, BLOCK_K, num_warps) or (BLOCK_N, BLOCK_K, num_warps, RING)


def skinny_config(m: int, n: int, k: int) -> tuple[int, int, int, bool]:
    """(BLOCK_N, BLOCK_K, num_warps, RING) for m rows. Up to 4 rows the one-row GEMV's tiles
    (2, 1024, 4) (4 x 16 fp32 accumulators a thread); from 5 rows half the tile width, so 8 rows
    still hold 64 accumulator registers a thread; four tiles in flight (RING). Compiled for
    sm_90 (`python -m benchmarks.skinny_sass`): 16-byte loads for weights and activations, no
    layout conversion in the loop, 89 / 130 / 85 / 125 registers at M = 2 / 4 / 5 / 8, no
    spills. Not timed on a GPU yet: `benchmarks/spec_gpu_bench.py --only kernels` sweeps these
    against other configurations (BLOCK_K = 256 gives 8-byte loads; (2, 1024, 4) at 8 rows
    needs 213 registers)."""
    block_k = min(1024 if m <= 4 else 512, triton.next_power_of_2(k))
    return 2, block_k, 4, True


def _config(config: Config | None, m: int, n: int, k: int) -> tuple[int, int, int, bool]:
    if config is None:
        return skinny_config(m, n, k)
    if len(config) == 3:  # e.g. triton_ops.gemv_config: the GEMV's plain loop
        return (*config, False)
    return tuple(config)


def _check_rows(name: str, x: torch.Tensor, weight: torch.Tensor) -> int:
    m = x.shape[0]
    if x.dim() != 2 or not 1 <= m <= MAX_ROWS:
        raise ValueError(f"{name}: x must have 1 to {MAX_ROWS} rows, got shape {tuple(x.shape)}")
    if x.shape[1] != weight.shape[1] or x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError(f"{name}: x {tuple(x.shape)} and weight {tuple(weight.shape)} need the same "
                         "contiguous last dimension")
    return m


def skinny(
    x: torch.Tensor,  # [M, K], M in 1..8, last dim contiguous
    weight: torch.Tensor,  # [N, K]
    bias: torch.Tensor | None = None,
    config: Config | None = None,  # (BLOCK_N, BLOCK_K, num_warps[, RING]); None: skinny_config
) -> torch.Tensor:  # [M, N]
    """x @ weight.T + bias, the weight read once for all rows."""
    m = _check_rows("skinny", x, weight)
    n, k = weight.shape
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    block_n, block_k, warps, ring = _config(config, m, n, k)
    use_pdl = pdl.enabled(x.device)
    _skinny_kernel[(triton.cdiv(n, block_n),)](
        x, weight, bias if bias is not None else weight, out, n, k, x.stride(0), weight.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, M=m, BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=k % block_k == 0,
        PRE=_preload_tiles(use_pdl, k, block_k), RING=ring, PDL=use_pdl, num_warps=warps, launch_pdl=use_pdl,
    )
    return out


def skinny_silu_mul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                    config: Config | None = None) -> torch.Tensor:
    """silu(gate) * up of a fused gate/up projection of M rows ([M, K] x [2I, K] -> [M, I]) in
    one kernel; `silu_and_mul(skinny(x, weight, bias))` up to the fused path's rounding (the
    same rounding points, so the same bits with the same configuration)."""
    m = _check_rows("skinny_silu_mul", x, weight)
    n2, k = weight.shape
    i = n2 // 2
    out = torch.empty((m, i), dtype=x.dtype, device=x.device)
    block_n, block_k, warps, ring = _config(config, m, n2, k)
    block_n = max(1, block_n // 2)  # as many weight rows per program as the plain product reads
    use_pdl = pdl.enabled(x.device)
    _skinny_silu_mul_kernel[(triton.cdiv(i, block_n),)](
        x, weight, bias if bias is not None else weight, out, i, k, x.stride(0), weight.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, M=m, BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=k % block_k == 0,
        PRE=_preload_tiles(use_pdl, k, block_k), RING=ring, PDL=use_pdl, num_warps=warps, launch_pdl=use_pdl,
    )
    return out


def skinny_rope_(
    x: torch.Tensor,  # [M, K]
    weight: torch.Tensor,  # [(Hq + 2 Hkv) * D, K]
    bias: torch.Tensor | None,
    positions: torch.Tensor,  # [M]
    cos_sin: torch.Tensor,  # [max_pos, D] fp32
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    kv_cache: torch.Tensor | None = None,  # [2, blocks, block_size, kv_heads, D]: also store k, v
    slot_mapping: torch.Tensor | None = None,  # [M] int64, -1 = skip
    config: Config | None = None,  # as skinny's; BLOCK_N is ignored (2 rows a program)
) -> torch.Tensor:  # [M, (Hq + 2 Hkv) * D]
    """`rope_qk_(skinny(x, weight, bias), ...)` (without q/k norm) in one kernel."""
    m = _check_rows("skinny_rope_", x, weight)
    n, k = weight.shape
    if n != (num_q_heads + 2 * num_kv_heads) * head_dim or head_dim % 2:
        raise ValueError(f"skinny_rope_: weight of {n} rows is not q, k and v heads of even size {head_dim}")
    if positions.shape[0] < m or (slot_mapping is not None and slot_mapping.shape[0] < m):
        raise ValueError(f"skinny_rope_: positions / slot_mapping need {m} entries")
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    _, block_k, warps, ring = _config(config, m, n, k)
    write = kv_cache is not None
    use_pdl = pdl.enabled(x.device)
    _skinny_rope_kernel[(n // 2,)](
        x, weight, bias if bias is not None else weight, out, positions, cos_sin,
        kv_cache if write else weight, slot_mapping if write else positions,
        k, x.stride(0), weight.stride(0), out.stride(0), cos_sin.stride(0), num_q_heads, num_q_heads + num_kv_heads,
        kv_cache.stride(0) if write else 0, kv_cache.stride(2) if write else 0, kv_cache.stride(3) if write else 0,
        HAS_BIAS=bias is not None, HALF=head_dim // 2, M=m, M_PAD=triton.next_power_of_2(m), BLOCK_K=block_k,
        EVEN_K=k % block_k == 0, WRITE_KV=write, PRE=_preload_tiles(use_pdl, k, block_k), RING=ring, PDL=use_pdl,
        num_warps=warps, launch_pdl=use_pdl,
    )
    return out
