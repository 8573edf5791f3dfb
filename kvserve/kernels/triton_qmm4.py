"""The 4-bit GEMM that reads the codes four bytes at a time (`triton_quant.qmm` with
KVSERVE_INT4_QMM=words|raw|auto; the weight layout is `triton_quant`'s "int4": GGML chunk
order, scale and offset per group, w = s q + m).

The code-at-a-time 4-bit tile of `triton_quant._qmm_kernel` spends 9.4 SASS instructions a
weight in its K loop (sm_90, 16 rows, bf16). Here four code bytes become fp16 / bf16 pairs by
bit operations alone (`_nibbles`: a `prmt` and an AND a pair, no int-to-float conversion), the
two nibbles of a byte feed two dots over half the tile's columns each with the activations
loaded in the matching order, and the scales are applied either in half-precision pairs
("words": s q + m, two fmas a pair) or to fp32 partials per group ("raw": the exact codes on
the tensor cores; offsets from the activations' group sums after the loop). Narrow weights at
few rows split K (atomic adds into a zeroed output). SASS counts: `python -m tests.gpu.quant_sass`;
the asm is checked bit for bit by `tests/gpu/ptx_emu.py`; timings: `benchmarks/gpu_quant_bench.py
--only qmm`. docs/gpu-quantization.md has the numbers.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kvserve.models import pdl

# Inline PTX where the kernels run on a GPU; the interpreter (TRITON_INTERPRET=1) runs none.
_PTX = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") != "1")


@triton.jit
def _nibbles(b, sc, off, ACT: tl.constexpr, RAW: tl.constexpr, PURE: tl.constexpr = True):
    """uint8 codes `b` (two 4-bit values a byte) -> (low nibbles, high nibbles), each of b's
    shape, in the activation dtype (ACT 0: fp32, 1: fp16, 2: bf16): s q + m with `sc`, `off`
    (b's shape, that dtype: each code's scale and offset), or with RAW 128 + q (16-bit; fp32:
    q), exact. On the GPU four bytes at a time become fp16 / bf16 pairs by bit operations
    alone: one `prmt` puts bytes 0 and 1 (2 and 3) in the low bytes of a word's halves with a
    magic exponent byte above each, one AND keeps the nibble: bf16 0x43 0q = 128 + q (7
    mantissa bits: the high nibbles are shifted down first, one shift a word), fp16 0x64 0q =
    1024 + q and, masked in place, 0x64 Q0 = 1024 + 16 Q (one fma / sub per pair brings both
    to 128 + q). Not RAW: one fma per pair takes the 128 off exactly, one more makes s q + m
    (rounded once)."""
    if ACT == 0 or not _PTX:  # fp32, and the interpreter (which runs no PTX)
        lo = (b & 15).to(tl.float32)
        hi = (b >> 4).to(tl.float32)
        if RAW:
            lo += 128 if ACT != 0 else 0
            hi += 128 if ACT != 0 else 0
        else:
            lo = lo * sc.to(tl.float32) + off.to(tl.float32)
            hi = hi * sc.to(tl.float32) + off.to(tl.float32)
        lo = lo.to(sc.dtype)
        hi = hi.to(sc.dtype)
    elif ACT == 1 and RAW:
        lo, hi = tl.inline_asm_elementwise(
            "{ .reg .b32 m, t0, t1, k, r, c; mov.b32 m, 0x64646464; mov.b32 k, 0x63006300; mov.b32 r, 0x2C002C00; "
            "mov.b32 c, 0x54005400; prmt.b32 t0, m, $4, 0x0504; prmt.b32 t1, m, $4, 0x0706; "
            "and.b32 $0, t0, 0xFF0FFF0F; sub.f16x2 $0, $0, k; and.b32 $1, t1, 0xFF0FFF0F; sub.f16x2 $1, $1, k; "
            "and.b32 $2, t0, 0xFFF0FFF0; fma.rn.f16x2 $2, $2, r, c; and.b32 $3, t1, 0xFFF0FFF0; fma.rn.f16x2 $3, $3, r, c; }",
            "=r,=r,=r,=r,r,r,r,r,r", [b, sc, off], dtype=(tl.float16, tl.float16), is_pure=PURE, pack=4)
    elif ACT == 1:
        lo, hi = tl.inline_asm_elementwise(
            "{ .reg .b32 m, t0, t1, k, r, c; mov.b32 m, 0x64646464; mov.b32 k, 0x64006400; mov.b32 r, 0x2C002C00; "
            "mov.b32 c, 0xD400D400; prmt.b32 t0, m, $4, 0x0504; prmt.b32 t1, m, $4, 0x0706; "
            "and.b32 $0, t0, 0xFF0FFF0F; sub.f16x2 $0, $0, k; fma.rn.f16x2 $0, $0, $5, $7; "
            "and.b32 $1, t1, 0xFF0FFF0F; sub.f16x2 $1, $1, k; fma.rn.f16x2 $1, $1, $6, $8; "
            "and.b32 $2, t0, 0xFFF0FFF0; fma.rn.f16x2 $2, $2, r, c; fma.rn.f16x2 $2, $2, $5, $7; "
            "and.b32 $3, t1, 0xFFF0FFF0; fma.rn.f16x2 $3, $3, r, c; fma.rn.f16x2 $3, $3, $6, $8; }",
            "=r,=r,=r,=r,r,r,r,r,r", [b, sc, off], dtype=(tl.float16, tl.float16), is_pure=PURE, pack=4)
    elif RAW:
        lo, hi = tl.inline_asm_elementwise(
            "{ .reg .b32 m, u; mov.b32 m, 0x43434343; shr.u32 u, $4, 4; "
            "prmt.b32 $0, m, $4, 0x0504; and.b32 $0, $0, 0xFF0FFF0F; prmt.b32 $1, m, $4, 0x0706; and.b32 $1, $1, 0xFF0FFF0F; "
            "prmt.b32 $2, m, u, 0x0504; and.b32 $2, $2, 0xFF0FFF0F; prmt.b32 $3, m, u, 0x0706; and.b32 $3, $3, 0xFF0FFF0F; }",
            "=r,=r,=r,=r,r,r,r,r,r", [b, sc, off], dtype=(tl.bfloat16, tl.bfloat16), is_pure=PURE, pack=4)
    else:
        lo, hi = tl.inline_asm_elementwise(
            "{ .reg .b32 m, u, r, c; mov.b32 m, 0x43434343; mov.b32 r, 0x3F803F80; mov.b32 c, 0xC300C300; shr.u32 u, $4, 4; "
            "prmt.b32 $0, m, $4, 0x0504; and.b32 $0, $0, 0xFF0FFF0F; fma.rn.bf16x2 $0, $0, r, c; fma.rn.bf16x2 $0, $0, $5, $7; "
            "prmt.b32 $1, m, $4, 0x0706; and.b32 $1, $1, 0xFF0FFF0F; fma.rn.bf16x2 $1, $1, r, c; fma.rn.bf16x2 $1, $1, $6, $8; "
            "prmt.b32 $2, m, u, 0x0504; and.b32 $2, $2, 0xFF0FFF0F; fma.rn.bf16x2 $2, $2, r, c; fma.rn.bf16x2 $2, $2, $5, $7; "
            "prmt.b32 $3, m, u, 0x0706; and.b32 $3, $3, 0xFF0FFF0F; fma.rn.bf16x2 $3, $3, r, c; fma.rn.bf16x2 $3, $3, $6, $8; }",
            "=r,=r,=r,=r,r,r,r,r,r", [b, sc, off], dtype=(tl.bfloat16, tl.bfloat16), is_pure=PURE, pack=4)
    return lo, hi


@triton.jit
def _qmm4_kernel(
    x_ptr, q_ptr, s_ptr, o_ptr, b_ptr, out_ptr, M, N, K, stride_xm, stride_q, stride_s, stride_om,
    ACT: tl.constexpr, RAW: tl.constexpr, HAS_OFF: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
    SPLIT_K: tl.constexpr,
    PURE: tl.constexpr = True,  # False: the asm is opaque, so the tile goes through shared memory (see qmm4_config)
):
    """The 4-bit GEMM with the codes read four bytes at a time and turned into fp16 / bf16
    pairs by bit operations (`_nibbles`, no conversions). A tile takes one scale and offset per
    row (BLOCK_K <= GROUP) or, not RAW, one per row and group (broadcast over the group's
    bytes), loaded once. Two forms:

    - not RAW: the tile s q + m in the activation dtype (two half-precision fmas per two
      codes) is multiplied on the tensor cores into the fp32 accumulator;
    - RAW: the tensor cores multiply the activations by the exact codes (128 + q for 16-bit
      activations) into a per-tile fp32 partial, scaled once per output: acc += s * part; the
      offsets and the 128 (sum over groups of (m - 128 s) * the group's sum of x) are one small
      fp32 product after the loop (`_qmm4_offsets`). Fewer instructions per code, exact codes
      and fp32 scales; the x group sums cost a second pass over the activations.

    The low and high nibbles of a byte are two dots over BLOCK_K / 2 columns each, the
    activations loaded in the matching order (byte j of a 32-column chunk: columns j and
    16 + j), so no tile is permuted. SPLIT_K > 1: program (n, m, p) takes the p-th of SPLIT_K
    equal K ranges (whole groups and tiles) and adds its result into `out` (zeroed) atomically, for
    narrow weights at few rows (more programs streaming the weight)."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    n_ok = rn < N
    m_ok = rm < M
    rn64 = tl.where(n_ok, rn, 0).to(tl.int64)
    rm64 = rm.to(tl.int64)
    H: tl.constexpr = BLOCK_K // 2
    j = tl.arange(0, H)
    col = (j // 16) * 32 + j % 16  # the column of byte j's low nibble in the tile
    xdt = x_ptr.dtype.element_ty
    if PDL:
        pdl.wait(PDL)
    kp = K // SPLIT_K
    k_lo = tl.multiple_of(tl.program_id(2) * kp, 32)  # whole groups (>= 32 columns): 16-byte aligned
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    q_ptr += k_lo // 2
    x_ptr += k_lo
    for kt in range(0, kp, BLOCK_K):
        k0 = k_lo + kt
        b = tl.load(q_ptr + rn64[:, None] * stride_q + (kt // 2 + j)[None, :])  # [BLOCK_N, H] bytes
        g = k0 // GROUP
        if GROUP >= BLOCK_K:
            s = tl.load(s_ptr + rn64 * stride_s + g)
        if RAW:
            zero = tl.zeros([BLOCK_N, H], dtype=xdt)
            lo, hi = _nibbles(b, zero, zero, ACT, True, PURE)
        elif GROUP >= BLOCK_K:
            sc = tl.broadcast_to(s.to(xdt)[:, None], [BLOCK_N, H])
            if HAS_OFF:
                off = tl.broadcast_to(tl.load(o_ptr + rn64 * stride_s + g).to(xdt)[:, None], [BLOCK_N, H])
            else:
                off = tl.zeros([BLOCK_N, H], dtype=xdt)
            lo, hi = _nibbles(b, sc, off, ACT, False, PURE)
        else:  # several groups a tile (not RAW): byte j is in the tile's group j // (GROUP / 2)
            NG: tl.constexpr = BLOCK_K // GROUP
            sp = rn64[:, None] * stride_s + (g + tl.arange(0, NG))[None, :]
            sc = tl.reshape(tl.broadcast_to(tl.load(s_ptr + sp).to(xdt)[:, :, None], [BLOCK_N, NG, GROUP // 2]),
                            [BLOCK_N, H])
            if HAS_OFF:
                off = tl.reshape(tl.broadcast_to(tl.load(o_ptr + sp).to(xdt)[:, :, None], [BLOCK_N, NG, GROUP // 2]),
                                 [BLOCK_N, H])
            else:
                off = tl.zeros([BLOCK_N, H], dtype=xdt)
            lo, hi = _nibbles(b, sc, off, ACT, False, PURE)
        xp = x_ptr + rm64[:, None] * stride_xm + (kt + col)[None, :]
        xl = tl.load(xp, mask=m_ok[:, None], other=0.0)  # [BLOCK_M, H]
        xh = tl.load(xp + 16, mask=m_ok[:, None], other=0.0)
        if RAW:
            if ACT == 0:
                part = tl.dot(xh, tl.trans(hi), tl.dot(xl, tl.trans(lo), input_precision="ieee"), input_precision="ieee")
            else:
                part = tl.dot(xh, tl.trans(hi), tl.dot(xl, tl.trans(lo)))
            acc += part * s.to(tl.float32)[None, :]
        elif ACT == 0:
            acc = tl.dot(xl, tl.trans(lo), acc, input_precision="ieee")
            acc = tl.dot(xh, tl.trans(hi), acc, input_precision="ieee")
        else:
            acc = tl.dot(xl, tl.trans(lo), acc)
            acc = tl.dot(xh, tl.trans(hi), acc)
    if RAW and (HAS_OFF or ACT != 0):
        acc = _qmm4_offsets(acc, x_ptr - k_lo, s_ptr, o_ptr, rm64, m_ok, rn64, k_lo // GROUP, kp // GROUP, stride_xm,
                            stride_s, 128 if ACT != 0 else 0, HAS_OFF, GROUP, BLOCK_M, BLOCK_N)
    if HAS_BIAS:
        if tl.program_id(2) == 0:
            acc += tl.load(b_ptr + rn64, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    dt = out_ptr.dtype.element_ty
    o = out_ptr + rm64[:, None] * stride_om + rn[None, :]
    if SPLIT_K == 1:
        tl.store(o, acc.to(dt), mask=m_ok[:, None] & n_ok[None, :])
    else:
        tl.atomic_add(o, acc.to(dt), mask=m_ok[:, None] & n_ok[None, :], sem="relaxed")


@triton.jit
def _qmm4_offsets(out, x_ptr, s_ptr, o_ptr, rm64, m_ok, rn64, g_lo, ng, stride_xm, stride_s,
                  BIAS: tl.constexpr, HAS_OFF: tl.constexpr, GROUP: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """out + the sum over groups g_lo <= g < g_lo + ng of X[m, g] (m[n, g] - BIAS s[n, g]),
    X[m, g] the sum of x over group g:
    sixteen groups at a time, X on the tensor cores (32 columns of each of the sixteen groups
    times a 0/1 matrix that sums each group's 32: exact products, fp32 sums), then one fp32
    product [BLOCK_M, 16] x [16, BLOCK_N]."""
    GC: tl.constexpr = 16
    gi = tl.arange(0, GC)
    i = tl.arange(0, GC * 32)
    xdt = x_ptr.dtype.element_ty
    e = ((i // 32)[:, None] == gi[None, :]).to(xdt)  # [512, 16]: column g sums rows 32g..32g+31
    g_hi = g_lo + ng
    for g0 in tl.range(g_lo, g_hi, GC, num_stages=1):  # once per program: not worth shared-memory stages
        g = g0 + gi
        g_ok = g < g_hi
        xs = tl.zeros([BLOCK_M, GC], dtype=tl.float32)
        ok = m_ok[:, None] & ((g0 + i // 32) < g_hi)[None, :]
        for c0 in tl.range(0, GROUP, 32, num_stages=1):
            xp = x_ptr + rm64[:, None] * stride_xm + ((g0 + i // 32) * GROUP + c0 + i % 32)[None, :]
            xk = tl.load(xp, mask=ok, other=0.0)  # [BLOCK_M, 512]
            if xdt == tl.float32:
                xs = tl.dot(xk, e, xs, input_precision="ieee")
            else:
                xs = tl.dot(xk, e, xs)
        sp = rn64[:, None] * stride_s + g[None, :]
        mo = -BIAS * tl.load(s_ptr + sp, mask=g_ok[None, :], other=0.0).to(tl.float32)  # [BLOCK_N, GC]
        if HAS_OFF:
            mo += tl.load(o_ptr + sp, mask=g_ok[None, :], other=0.0).to(tl.float32)
        out = tl.dot(xs, tl.trans(mo), out, input_precision="ieee")
    return out


# -- host side ------------------------------------------------------------------------------
def qmm4_config(m: int, n: int, group: int) -> tuple[int, ...]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, SPLIT_K) of `_qmm4_kernel`; a config
    may add a seventh value (default 0): 1 passes the dequantized tile to the tensor cores
    through shared memory. Few rows read the weight once: wide column tiles amortize the
    activations' part of the loop, and narrow weights (< 16384 rows) split K so that every SM
    has programs streaming; many rows are compute tiles (the weight tile is re-read per row
    tile). Shared memory or not (sm_90 SASS, 16 x 128 x 128 tiles, bf16): the elementwise asm
    lets Triton load the code bytes straight into the operand layout (no dequantized tile in
    shared memory), but in a layout (4 k a thread) where the activations' fragments cost ~0.6
    register moves a weight: 3.76 instructions a weight (raw 2.79); through shared memory
    3.39 (raw 2.38), with 256 bytes a thread stored and read back per tile, so shared-memory
    bandwidth may bind instead. The benchmark's sweep measures both. From 64-row tiles (wgmma,
    whose weight operand is read from shared memory anyway) the opaque form is the shorter
    (128 x 128 x 128, 8 warps: 4.73 against 5.20 instructions a weight and row tile)."""
    bk = 128  # ("raw" takes min(128, group))
    if m <= 32:
        bm = 16 if m <= 16 else 32
        if n >= 16384:
            return bm, 128, bk, 4, 4, 1, 0
        return bm, 64, bk, 4, 4, 4 if n <= 4096 else 2, 0
    if m <= 64:
        return 64, 128 if n >= 16384 else 64, bk, 4, 4, 1 if n >= 16384 else 2, 1
    if m <= 128:
        return 64, 64, bk, 4, 4, 1, 1
    return 128, 64 if n <= 8192 else 128, bk, 8, 3, 1, 1


def qmm4(x: torch.Tensor, qw, bias: torch.Tensor | None = None, config: tuple[int, ...] | None = None,
         mode: str = "words") -> torch.Tensor:
    """x [M, K] times the 4-bit weight `qw` -> [M, N] (`triton_quant.qmm` with a word mode)."""
    m, k = x.shape
    n = qw.shape[0]
    cfg = tuple(config or qmm4_config(m, n, qw.group))
    bm, bn, bk, warps, stages = cfg[:5]
    split = cfg[5] if len(cfg) > 5 else 1
    smem_tile = bool(cfg[6]) if len(cfg) > 6 else False
    # RAW only in tiles of up to 32 rows: its group-sum product after the loop (an fp32
    # [BLOCK_M, 16] x [16, BLOCK_N] FMA dot) spills from 64 rows (sm_90 build), and many rows are
    # not bound by the codes anyway.
    raw = (mode == "raw" or mode == "auto" and split == 1) and bm <= 32
    if raw:  # one group a tile: the partial is scaled per group
        bk = min(bk, qw.group)
    while bk >= 32 and (k % bk or (qw.group % bk if bk <= qw.group else bk % qw.group)):
        bk //= 2
    if bk < 32:
        raise ValueError(f"K={k} and group {qw.group} take no tile of a multiple of 32 columns")
    while split > 1 and k % (split * max(qw.group, bk)):  # whole groups and tiles per split
        split //= 2
    act = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}[x.dtype]
    out = (torch.zeros if split > 1 else torch.empty)((m, n), dtype=x.dtype, device=x.device)
    use_pdl = pdl.enabled(x.device)
    _qmm4_kernel[(triton.cdiv(n, bn), triton.cdiv(m, bm), split)](
        x, qw.q, qw.scale, qw.offset if qw.offset is not None else qw.scale, bias if bias is not None else qw.scale,
        out, m, n, k, x.stride(0), qw.q.stride(0), qw.scale.stride(0), out.stride(0),
        ACT=act, RAW=raw, HAS_OFF=qw.offset is not None, GROUP=qw.group, HAS_BIAS=bias is not None,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, PDL=use_pdl, SPLIT_K=split, PURE=not smem_tile,
        num_warps=warps, num_stages=stages, launch_pdl=use_pdl,
    )
    return out
