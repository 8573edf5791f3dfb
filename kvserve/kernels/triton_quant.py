"""Triton kernels for weight-only quantized projections on CUDA (`platform/cuda_quant.py`).

Weight layouts (one per `QWeight.kind`, all [N, K] matrices, rows contiguous):

- "int8": int8 q [N, K]; scale [N, K / G] (G = K: one scale per output channel); w = s * q.
- "fp8":  float8_e4m3fn q [N, K]; scale fp32 [N, 1]; w = s * q.
- "int4": uint8 [N, K / 2], two 4-bit values a byte in GGML's order inside each 32-column chunk
  (byte i of chunk c holds column 32c + i in its low nibble and 32c + 16 + i in its high one, as
  Q4_0 / Q4_1 blocks do, so their bytes are copied as they are); scale and offset [N, K / G];
  w = s * q + m with q in 0..15 (G = 128 for HF checkpoints, 32 for GGUF Q4_0 / Q4_1 / Q4_K).

Kernels:

- `qgemv` (one row: batch-1 decode, a one-row LM head): each program streams BLOCK_N weight
  rows and dequantizes in registers: per 32-column chunk it sums q·x, then applies the chunk's
  scale (and offset · Σx) once, so the inner loop is one convert and one FMA per weight.
  Epilogues as the bf16 GEMV's: SiLU·mul for a fused gate/up projection (`SILU`), RoPE and the
  paged K/V store for a fused qkv projection (`qgemv_rope_`). 4-bit weights can take a second
  decode, `_dot_rows_w4` (KVSERVE_INT4_GEMV=words, opt-in: slower in the engine on an H100,
  2026-12-07, Llama-3.1-8B batch-1 3.553 against 3.224 ms/token): the codes read as int32
  words, two made fp16 per LOP3, the activations loaded in the weight tile's layout and shared
  by the rows a thread holds (3.4 SASS instructions a weight against 7.7). int8 weights likewise
  (`_dot_rows_w8`, KVSERVE_INT8_GEMV=words, opt-in: 4.100 against 3.467 ms/token there): two codes fp16 per LOP3
  (`_bytes`' trick), 3.2 instructions a weight per channel (3.55 in Q8_0 groups) against 4.9 (5.8).
- `qmm` (2 or more rows): a dequantizing GEMM: each weight tile is dequantized in registers
  to the activations' dtype and multiplied on the tensor cores (`tl.dot`). int8 tiles read the
  codes as int32 words and make two codes fp16 per bit operation (`_deq_tile_w`: 5-15% faster
  than a code at a time on an H100); 4-bit and fp8 tiles convert a code at a time (`_deq_tile`).
  By default (KVSERVE_INT4_QMM=auto; "codes" the old tile), 4-bit weights take `triton_qmm4`: four code bytes
  become fp16 / bf16 pairs by a `prmt` and an AND each (`_nibbles`); the elementwise asm lets
  Triton load the codes straight into the tensor-core operand layout (ldmatrix from the
  cp.async stage), so no dequantized tile goes through shared memory (up to 32-row tiles:
  wgmma reads its weight operand from shared memory); "words" makes s q + m
  with two half-precision fmas per pair, "raw" multiplies the exact codes and scales fp32
  partials per group. SASS (sm_90, 16 rows, bf16): 9.4 instructions a weight in the old 4-bit
  K loop, 3.8 (words) and 2.8 (raw, plus its group sums after the loop) in the new one.
  Opt-in (KVSERVE_FP8_QMM_SCALE_AFTER=1), FP8 tiles are converted as they are and the sums
  scaled per channel after the loop.
- `dequantize`: the whole matrix in the model dtype, one pass (for dequantize-then-cuBLAS),
  a code at a time.
- `act_quant_fp8`: per-row dynamic FP8 scaling of activations (for `torch._scaled_mm`).

Every kernel waits for the previous kernel (PDL) before it reads anything; no masks on the
weight loads: K is a multiple of BLOCK_K and rows past N read row 0 (their results are dropped).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kvserve.kernels import triton_qgemv_half, triton_qmm4
from kvserve.kernels.triton_qgemv_half import _f16_pair
from kvserve.models import pdl

# Inline PTX where the kernels run on a GPU; the interpreter (TRITON_INTERPRET=1) runs none.
_PTX = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") != "1")


@triton.jit
def _dot_rows(x_ptr, q_ptr, s_ptr, o_ptr, rows64, K, stride_q, stride_s,
              KIND: tl.constexpr, HAS_OFF: tl.constexpr, GROUP: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 dot products of the dequantized weight rows `rows64` [BLOCK_N] with x [K].
    KIND 0: 4-bit (GGML chunk order), 1: 8-bit in groups of GROUP, 2: 8-bit per channel."""
    if KIND == 0:
        NC: tl.constexpr = BLOCK_K // 32
        c = tl.arange(0, NC)
        i = tl.arange(0, 16)
        acc = tl.zeros([BLOCK_N, NC], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            chunk = k0 // 32 + c  # [NC]
            b = tl.load(q_ptr + rows64[:, None, None] * stride_q + (chunk * 16)[None, :, None] + i[None, None, :])
            xo = (chunk * 32)[:, None] + i[None, :]  # [NC, 16]
            xl = tl.load(x_ptr + xo).to(tl.float32)
            xh = tl.load(x_ptr + xo + 16).to(tl.float32)
            lo = (b & 15).to(tl.float32)
            hi = (b >> 4).to(tl.float32)
            p = tl.sum(lo * xl[None, :, :] + hi * xh[None, :, :], 2)  # [BLOCK_N, NC]
            g = chunk // (GROUP // 32)
            sg = s_ptr + rows64[:, None] * stride_s + g[None, :]
            acc += p * tl.load(sg).to(tl.float32)
            if HAS_OFF:
                m = tl.load(o_ptr + rows64[:, None] * stride_s + g[None, :]).to(tl.float32)
                acc += m * tl.sum(xl + xh, 1)[None, :]
        res = tl.sum(acc, 1)
    elif KIND == 1:
        NG: tl.constexpr = BLOCK_K // GROUP
        gi = tl.arange(0, NG)
        j = tl.arange(0, GROUP)
        acc = tl.zeros([BLOCK_N, NG], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            grp = k0 // GROUP + gi
            w = tl.load(q_ptr + rows64[:, None, None] * stride_q + (grp * GROUP)[None, :, None] + j[None, None, :])
            x = tl.load(x_ptr + (grp * GROUP)[:, None] + j[None, :]).to(tl.float32)
            p = tl.sum(w.to(tl.float32) * x[None, :, :], 2)
            acc += p * tl.load(s_ptr + rows64[:, None] * stride_s + grp[None, :]).to(tl.float32)
            if HAS_OFF:
                m = tl.load(o_ptr + rows64[:, None] * stride_s + grp[None, :]).to(tl.float32)
                acc += m * tl.sum(x, 1)[None, :]
        res = tl.sum(acc, 1)
    else:
        cols = tl.arange(0, BLOCK_K)
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            w = tl.load(q_ptr + rows64[:, None] * stride_q + (k0 + cols)[None, :])
            x = tl.load(x_ptr + k0 + cols).to(tl.float32)
            acc += w.to(tl.float32) * x[None, :]
        res = tl.sum(acc, 1) * tl.load(s_ptr + rows64 * stride_s).to(tl.float32)
    return res


@triton.jit
def _bytes(w, SH: tl.constexpr, EXACT: tl.constexpr):
    """Bytes SH / 8 and SH / 8 + 2 of the int32 words `w` (int8 codes) as fp32 1152 + q (q with
    EXACT): the sign bit flipped and exponent 0x64 set in one AND-XOR (fp16 1024 + (q + 128))."""
    return _f16_pair(((w >> SH) & 0x00FF00FF) ^ 0x64806480, 1152 if EXACT else 0)


@triton.jit
def _nib_pair(w, mask, magic, SUB: tl.constexpr):
    """Two 4-bit codes of the int32 words `w` as fp32, made fp16 by one mask-or (LOP3):
    w & mask | 0x64006400 with mask 0x000F000F (bits 0..3 and 16..19: fp16 1024 + q) or 0x00F000F0
    (bits 4..7 and 20..23: 1024 + 16 q, exact; no shift), each half widened by `_f16_pair`
    (HADD2.F32); SUB 1024: less 1024, exactly, in fp16. `mask` / `magic` come in registers (as
    literals ptxas rematerializes them in the loop)."""
    return _f16_pair((w & mask) | magic, SUB)


@triton.jit
def _ld(p):
    """tl.load(p) of 16-, 32- or 64-bit values as inline PTX (ld.global, as tl.load emits: not the
    non-coherent path, as x is written by the kernel before, which runs alongside under PDL):
    elementwise, so the values come in the layout of the address computation (that of their
    consumers), where a tl.load gets a coalesced layout of its own and a conversion (shared
    memory) to the consumers'. 16-bit floats come as fp16 / bf16, 32-bit ones as fp32, 64-bit
    values as int64."""
    if _PTX:
        ty: tl.constexpr = p.dtype.element_ty
        if ty.primitive_bitwidth == 64:
            v = tl.inline_asm_elementwise("ld.global.b64 $0, [$1];", "=l,l", [p], dtype=tl.int64,
                                          is_pure=False, pack=1)
        elif ty.primitive_bitwidth == 32:
            v = tl.inline_asm_elementwise("ld.global.b32 $0, [$1];", "=r,l", [p], dtype=tl.int32,
                                          is_pure=False, pack=1).to(ty, bitcast=True)
        else:
            v = tl.inline_asm_elementwise("ld.global.b16 $0, [$1];", "=h,l", [p], dtype=tl.int16,
                                          is_pure=False, pack=1).to(ty, bitcast=True)
    else:
        v = tl.load(p)
    return v


@triton.jit
def _x_quad(x_ptr, chunk, A: tl.constexpr, J: tl.constexpr, XKIND: tl.constexpr, CW: tl.constexpr = 32):
    """The activations of columns CW chunk + 16 A + 4 J + e (e = 0, 1, 2, 3) of the CW-column chunks
    `chunk` [NC] (32: 4-bit words, 16: 8-bit ones): four fp32 [NC], loaded in the layout of their
    consumers (`_ld`). XKIND 0 / 1: x_ptr is the bf16 / fp16 row viewed as int64 (one 8-byte load
    holds the four); 2: fp32."""
    if XKIND == 2:
        p = x_ptr + chunk * CW + (16 * A + 4 * J)
        x0, x1, x2, x3 = _ld(p), _ld(p + 1), _ld(p + 2), _ld(p + 3)
    else:
        v = _ld(x_ptr + chunk * (CW // 4) + (4 * A + J))
        lo = v.to(tl.int32)
        hi = (v >> 32).to(tl.int32)
        if XKIND == 0:  # bf16 -> fp32: the 16 bits moved up / the low ones cleared
            x0 = (lo << 16).to(tl.float32, bitcast=True)
            x1 = (lo & -65536).to(tl.float32, bitcast=True)
            x2 = (hi << 16).to(tl.float32, bitcast=True)
            x3 = (hi & -65536).to(tl.float32, bitcast=True)
        else:
            x0, x1 = _f16_pair(lo, 0)
            x2, x3 = _f16_pair(hi, 0)
    return x0, x1, x2, x3


@triton.jit
def _word_dot(acc, w, x_ptr, chunk, J: tl.constexpr, m_lo, m_hi, magic, SUB: tl.constexpr, XKIND: tl.constexpr,
              xa, xb):
    """acc [BLOCK_N, NC] plus word J of each chunk (8 codes: columns 4J..4J+3 in the low nibbles,
    16+4J..19+4J in the high ones) times its activations: one shift, four LOP3, eight HADD2.F32
    and eight FMAs a word. The high nibbles are decoded in place as 1024 + 16 q, so their
    activations come divided by 16 (exact). xa / xb [NC] plus those activations (xb: / 16)."""
    a0, a1, a2, a3 = _x_quad(x_ptr, chunk, 0, J, XKIND)
    b0, b1, b2, b3 = _x_quad(x_ptr, chunk, 1, J, XKIND)
    b0 *= 0.0625
    b1 *= 0.0625
    b2 *= 0.0625
    b3 *= 0.0625
    w8 = w >> 8
    lo, hi = _nib_pair(w, m_lo, magic, SUB)  # columns 4J, 4J + 2
    acc += lo * a0[None, :]
    acc += hi * a2[None, :]
    lo, hi = _nib_pair(w8, m_lo, magic, SUB)  # 4J + 1, 4J + 3
    acc += lo * a1[None, :]
    acc += hi * a3[None, :]
    lo, hi = _nib_pair(w, m_hi, magic, SUB)  # 16 + 4J, 18 + 4J (times 16)
    acc += lo * b0[None, :]
    acc += hi * b2[None, :]
    lo, hi = _nib_pair(w8, m_hi, magic, SUB)  # 17 + 4J, 19 + 4J (times 16)
    acc += lo * b1[None, :]
    acc += hi * b3[None, :]
    xa += (a0 + a1) + (a2 + a3)
    xb += (b0 + b1) + (b2 + b3)
    return acc, xa, xb


@triton.jit
def _word_tile(wp, w, k0, K, c, CW: tl.constexpr, BLOCK_K: tl.constexpr, PREFETCH: tl.constexpr):
    """The word GEMVs' K step k0 (CW columns a 4-word chunk): (this step's [BLOCK_N, NC, 4] words,
    the next step's). `w` holds this step's words where they were loaded before (the first tile,
    requested before the PDL wait, or the prefetch of the step before); PREFETCH requests the next
    step's now (the last step re-requests its own), else the next is this one."""
    if PREFETCH:
        nxt = tl.minimum(k0 + BLOCK_K, K - BLOCK_K) // CW + c
        w_next = tl.load(wp + (nxt * 4)[None, :, None], eviction_policy="evict_first")
    else:
        if k0 > 0:
            w = tl.load(wp + ((k0 // CW + c) * 4)[None, :, None], eviction_policy="evict_first")
        w_next = w
    return w, w_next


@triton.jit
def _word_quads(w, BLOCK_N: tl.constexpr, NC: tl.constexpr):
    """Words 0, 1, 2, 3 of each chunk of a [BLOCK_N, NC, 4] tile, each [BLOCK_N, NC]."""
    w_even, w_odd = tl.split(tl.reshape(w, [BLOCK_N, NC, 2, 2]))  # words (0, 2), (1, 3)
    w0, w2 = tl.split(w_even)
    w1, w3 = tl.split(w_odd)
    return w0, w1, w2, w3


@triton.jit
def _dot_rows_w4(x_ptr, q_ptr, s_ptr, o_ptr, rows64, K, stride_q, stride_s, one,
                 HAS_OFF: tl.constexpr, GROUP: tl.constexpr, XKIND: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREFETCH: tl.constexpr, PDL: tl.constexpr):
    """`_dot_rows` for 4-bit codes read as int32 words (q_ptr int32, stride_q in words): each
    thread holds whole 32-column chunks (4 words, one 16-byte load) of several rows, turns two
    codes into fp16 (1024 + q) per mask-or (`_nib_pair`) and FMAs them in fp32, one chain of 32 per
    row and chunk, against the activations of the matching columns (`_x_quad`: loaded and
    converted once for all the rows a thread holds). Word byte b holds column b (low nibble) and
    16 + b (high), so the low-nibble mask on w / w >> 8 gives columns (4j, 4j + 2) / (4j + 1,
    4j + 3) of word j, and the high-nibble mask the same + 16 (as 1024 + 16 q, against x / 16).
    The 1024 is taken off per row and chunk, in fp32, with the activation sums the offset needs
    anyway: s sum (1024 + q) x + m sum x - 1024 s (sum x_low + sum x_high / 16); fp32 activations
    (XKIND 2) subtract it exactly in fp16 instead. The words of a row are split out of the 16-byte
    load in registers; everything stays in the load's layout (no conversion in the loop).
    Waits for the previous kernel (PDL) after requesting the first weight tile; PREFETCH: each
    iteration requests the next tile before it decodes the current one (twice the bytes in
    flight; the last iteration requests the last tile again)."""
    NC: tl.constexpr = BLOCK_K // 32
    SUB: tl.constexpr = 1024 if XKIND == 2 else 0
    c = tl.arange(0, NC)
    j = tl.arange(0, 4)
    m_lo = one * 0x000F000F  # (in registers: as literals ptxas rematerializes them in the loop)
    m_hi = one * 0x00F000F0
    magic = one * 0x64006400
    wp = q_ptr + rows64[:, None, None] * stride_q + j[None, None, :]
    sp = s_ptr + rows64[:, None] * stride_s
    op = o_ptr + rows64[:, None] * stride_s
    acc = tl.zeros([BLOCK_N, NC], dtype=tl.float32)
    w = tl.load(wp + (c * 4)[None, :, None], eviction_policy="evict_first")  # [BLOCK_N, NC, 4]: the first tile
    if PDL:
        pdl.wait(PDL)
    for k0 in range(0, K, BLOCK_K):
        chunk = k0 // 32 + c  # [NC]
        w, w_next = _word_tile(wp, w, k0, K, c, 32, BLOCK_K, PREFETCH)
        w0, w1, w2, w3 = _word_quads(w, BLOCK_N, NC)
        p = tl.zeros([BLOCK_N, NC], dtype=tl.float32)
        xa = tl.zeros([NC], dtype=tl.float32)
        xb = tl.zeros([NC], dtype=tl.float32)
        p, xa, xb = _word_dot(p, w0, x_ptr, chunk, 0, m_lo, m_hi, magic, SUB, XKIND, xa, xb)
        p, xa, xb = _word_dot(p, w1, x_ptr, chunk, 1, m_lo, m_hi, magic, SUB, XKIND, xa, xb)
        p, xa, xb = _word_dot(p, w2, x_ptr, chunk, 2, m_lo, m_hi, magic, SUB, XKIND, xa, xb)
        p, xa, xb = _word_dot(p, w3, x_ptr, chunk, 3, m_lo, m_hi, magic, SUB, XKIND, xa, xb)
        g = chunk // (GROUP // 32)
        s = _ld(sp + g[None, :]).to(tl.float32)  # [BLOCK_N, NC]
        acc += p * s
        if HAS_OFF:
            acc += _ld(op + g[None, :]).to(tl.float32) * (xa + 16.0 * xb)[None, :]
        if SUB == 0:  # p holds 1024 (sum of the low activations + sum of the high ones / 16) too
            acc += (-1024.0 * s) * (xa + xb)[None, :]
        if PREFETCH:
            w = w_next
    return tl.sum(acc, 1)


@triton.jit
def _dot_rows_w8(x_ptr, q_ptr, s_ptr, rows64, K, stride_q, stride_s, one,
                 KIND: tl.constexpr, GROUP: tl.constexpr, XKIND: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREFETCH: tl.constexpr, PDL: tl.constexpr):
    """`_dot_rows` for int8 codes without offsets (KIND 1: groups of GROUP >= 16, 2: per channel)
    read as int32 words (q_ptr int32, stride_q in words): each thread holds whole 16-column chunks
    (4 words, one 16-byte load) of several rows. Word j of a chunk holds columns 4j .. 4j + 3;
    (w & 0x00FF00FF) ^ 0x64806480 makes columns (4j, 4j + 2) fp16 1152 + q in one LOP3, the same on
    w >> 8 columns (4j + 1, 4j + 3) (`_bytes`' trick, mask and magic in registers); each half is
    widened by `_f16_pair` (HADD2.F32) and FMAd in fp32, one chain of 16 per row and chunk, against
    the activations of the matching columns (`_x_quad`, CW 16: loaded and converted once for all
    the rows a thread holds). The 1152 is taken off with the activation sums: KIND 1 per row and
    chunk, s (sum (1152 + q) x - 1152 sum x); KIND 2 once after the loop, where the chains run on
    across K steps and the row is scaled once; fp32 activations (XKIND 2) subtract it exactly in
    fp16 instead. PDL / PREFETCH as in `_dot_rows_w4`."""
    NC: tl.constexpr = BLOCK_K // 16
    SUB: tl.constexpr = 1152 if XKIND == 2 else 0
    c = tl.arange(0, NC)
    j = tl.arange(0, 4)
    mask = one * 0x00FF00FF  # (in registers: as literals ptxas rematerializes them in the loop)
    magic = one * 0x64806480
    wp = q_ptr + rows64[:, None, None] * stride_q + j[None, None, :]
    sp = s_ptr + rows64[:, None] * stride_s
    acc = tl.zeros([BLOCK_N, NC], dtype=tl.float32)
    xs = tl.zeros([NC], dtype=tl.float32)
    w = tl.load(wp + (c * 4)[None, :, None], eviction_policy="evict_first")  # [BLOCK_N, NC, 4]: the first tile
    if PDL:
        pdl.wait(PDL)
    for k0 in range(0, K, BLOCK_K):
        chunk = k0 // 16 + c  # [NC]
        w, w_next = _word_tile(wp, w, k0, K, c, 16, BLOCK_K, PREFETCH)
        w0, w1, w2, w3 = _word_quads(w, BLOCK_N, NC)
        if KIND == 1:
            p = tl.zeros([BLOCK_N, NC], dtype=tl.float32)
            xs = tl.zeros([NC], dtype=tl.float32)
        else:  # one scale a row: the chains run on in acc, xs over the whole row
            p = acc
        p, xs = _word_dot8(p, w0, x_ptr, chunk, 0, mask, magic, SUB, XKIND, xs)
        p, xs = _word_dot8(p, w1, x_ptr, chunk, 1, mask, magic, SUB, XKIND, xs)
        p, xs = _word_dot8(p, w2, x_ptr, chunk, 2, mask, magic, SUB, XKIND, xs)
        p, xs = _word_dot8(p, w3, x_ptr, chunk, 3, mask, magic, SUB, XKIND, xs)
        if KIND == 1:
            s = _ld(sp + ((chunk * 16) // GROUP)[None, :]).to(tl.float32)  # [BLOCK_N, NC]
            if SUB == 0:
                p += (-1152.0 * xs)[None, :]  # (-1152 xs once for the rows a thread holds)
            acc += p * s
        else:
            acc = p
        if PREFETCH:
            w = w_next
    res = tl.sum(acc, 1)
    if KIND == 2:
        if SUB == 0:
            res -= 1152.0 * tl.sum(xs, 0)
        res *= tl.load(s_ptr + rows64 * stride_s).to(tl.float32)
    return res


@triton.jit
def _word_dot8(acc, w, x_ptr, chunk, J: tl.constexpr, mask, magic, SUB: tl.constexpr, XKIND: tl.constexpr, xs):
    """acc [BLOCK_N, NC] plus word J of each 16-column chunk (int8 codes of columns 4J .. 4J + 3) times
    its activations: one shift, two LOP3, four HADD2.F32 and four FMAs a word. xs [NC] plus the
    four activations."""
    x0, x1, x2, x3 = _x_quad(x_ptr, chunk, 0, J, XKIND, 16)
    lo, hi = _f16_pair((w & mask) ^ magic, SUB)  # columns 4J, 4J + 2
    acc += lo * x0[None, :]
    acc += hi * x2[None, :]
    lo, hi = _f16_pair(((w >> 8) & mask) ^ magic, SUB)  # 4J + 1, 4J + 3
    acc += lo * x1[None, :]
    acc += hi * x3[None, :]
    xs += (x0 + x1) + (x2 + x3)
    return acc, xs


@triton.jit(do_not_specialize=["one"])
def _qgemv_kernel(
    x_ptr, q_ptr, s_ptr, o_ptr, b_ptr, out_ptr,
    N,  # output columns (SILU: the gate rows I; the weight has 2I rows)
    K, stride_q, stride_s,
    one,  # 1 (W4: see `_x_quad`)
    KIND: tl.constexpr, HAS_OFF: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
    SILU: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
    W4: tl.constexpr = False,  # 4-bit codes as int32 words (`_dot_rows_w4`; x_ptr int64 for 16-bit x)
    XKIND: tl.constexpr = 0,  # W4: x bf16 (0), fp16 (1), fp32 (2)
    PREFETCH: tl.constexpr = False,  # W4 / W8: see `_dot_rows_w4`
    W8: tl.constexpr = False,  # int8 codes (KIND 1 / 2) as int32 words (`_dot_rows_w8`; x_ptr as W4's)
):
    rows, row_ok, rows64 = triton_qgemv_half.gemv_rows(N, ROWS, BLOCK_N, SILU)
    if W4:  # (waits for the previous kernel after requesting its first weights)
        acc = _dot_rows_w4(x_ptr, q_ptr, s_ptr, o_ptr, rows64, K, stride_q, stride_s, one, HAS_OFF, GROUP, XKIND,
                           ROWS, BLOCK_K, PREFETCH, PDL)
    elif W8:
        acc = _dot_rows_w8(x_ptr, q_ptr, s_ptr, rows64, K, stride_q, stride_s, one, KIND, GROUP, XKIND,
                           ROWS, BLOCK_K, PREFETCH, PDL)
    else:
        if PDL:
            pdl.wait(PDL)
        acc = _dot_rows(x_ptr, q_ptr, s_ptr, o_ptr, rows64, K, stride_q, stride_s, KIND, HAS_OFF, GROUP, ROWS, BLOCK_K)
    triton_qgemv_half.gemv_store(acc, rows, row_ok, rows64, b_ptr, out_ptr, N, HAS_BIAS, SILU, BLOCK_N)


@triton.jit
def _rotate(x1, x2, c, s):
    # The bits of triton_ops._rotate (explicit FMAs).
    return tl.fma(x1, c, -(x2 * s)), tl.fma(x2, c, x1 * s)


@triton.jit(do_not_specialize=["one"], do_not_specialize_on_alignment=["pos_ptr", "slot_ptr"])
def _qgemv_rope_kernel(
    x_ptr, q_ptr, s_ptr, o_ptr, b_ptr, out_ptr, pos_ptr, cos_sin_ptr, cache_ptr, slot_ptr,
    K, stride_q, stride_s, stride_cs, num_q_heads, num_heads, stride_plane, stride_slot, stride_head, one,
    KIND: tl.constexpr, HAS_OFF: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
    HALF: tl.constexpr, BLOCK_K: tl.constexpr, WRITE_KV: tl.constexpr, PDL: tl.constexpr,
    W4: tl.constexpr = False, XKIND: tl.constexpr = 0, PREFETCH: tl.constexpr = False,  # as `_qgemv_kernel`'s
    PAIRS: tl.constexpr = 1,  # row pairs a program (divides HALF)
    W8: tl.constexpr = False,  # as `_qgemv_kernel`'s
):
    """triton_ops._gemv_rope_kernel on quantized weights: one program computes PAIRS pairs of rows
    of a head that RoPE pairs (d and d + HALF, d = PAIRS p' .. PAIRS p' + PAIRS - 1), rotates them
    and stores k and v in the cache."""
    P: tl.constexpr = HALF // PAIRS  # programs a head
    head = tl.program_id(0) // P
    jv = (tl.program_id(0) % P) * PAIRS + tl.arange(0, PAIRS)  # [PAIRS]
    t = tl.arange(0, 2 * PAIRS)  # the PAIRS first rows, then their partners
    rows = (head * (2 * HALF) + (tl.program_id(0) % P) * PAIRS + t % PAIRS + (t // PAIRS) * HALF).to(tl.int64)
    if W4:  # (waits for the previous kernel after requesting its first weights)
        acc = _dot_rows_w4(x_ptr, q_ptr, s_ptr, o_ptr, rows, K, stride_q, stride_s, one, HAS_OFF, GROUP, XKIND,
                           2 * PAIRS, BLOCK_K, PREFETCH, PDL)
    elif W8:
        acc = _dot_rows_w8(x_ptr, q_ptr, s_ptr, rows, K, stride_q, stride_s, one, KIND, GROUP, XKIND,
                           2 * PAIRS, BLOCK_K, PREFETCH, PDL)
    else:
        if PDL:
            pdl.wait(PDL)
        acc = _dot_rows(x_ptr, q_ptr, s_ptr, o_ptr, rows, K, stride_q, stride_s, KIND, HAS_OFF, GROUP, 2 * PAIRS,
                        BLOCK_K)
    _rope_store(acc, rows, head, jv, b_ptr, out_ptr, pos_ptr, cos_sin_ptr, cache_ptr, slot_ptr, stride_cs, num_q_heads,
                num_heads, stride_plane, stride_slot, stride_head, HAS_BIAS, HALF, WRITE_KV, PAIRS)


@triton.jit
def _rope_store(acc, rows, head, jv, b_ptr, out_ptr, pos_ptr, cos_sin_ptr, cache_ptr, slot_ptr, stride_cs, num_q_heads,
                num_heads, stride_plane, stride_slot, stride_head, HAS_BIAS: tl.constexpr, HALF: tl.constexpr,
                WRITE_KV: tl.constexpr, PAIRS: tl.constexpr):
    """The RoPE GEMVs' epilogue: fp32 sums `acc` of rows (the PAIRS first rows of a pair, then
    their partners) + bias, rounded, rotated (q and k heads), stored, and k / v into the cache."""
    pos = tl.load(pos_ptr).to(tl.int64)
    c = tl.load(cos_sin_ptr + pos * stride_cs + jv)
    s = tl.load(cos_sin_ptr + pos * stride_cs + HALF + jv)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rows).to(tl.float32)
    dt = out_ptr.dtype.element_ty
    x1, x2 = tl.split(tl.trans(tl.reshape(acc.to(dt), [2, PAIRS])))  # rows d, d + HALF
    r1, r2 = _rotate(x1.to(tl.float32), x2.to(tl.float32), c, s)
    o1 = tl.where(head < num_heads, r1.to(dt), x1)
    o2 = tl.where(head < num_heads, r2.to(dt), x2)
    base = head.to(tl.int64) * (2 * HALF) + jv
    tl.store(out_ptr + base, o1)
    tl.store(out_ptr + base + HALF, o2)
    if WRITE_KV:
        slot = tl.load(slot_ptr)
        if (slot >= 0) & (head >= num_q_heads):
            is_v = head >= num_heads
            kv_head = tl.where(is_v, head - num_heads, head - num_q_heads).to(tl.int64)
            dst = cache_ptr + is_v.to(tl.int64) * stride_plane + slot * stride_slot + kv_head * stride_head
            tl.store(dst + jv, o1.to(cache_ptr.dtype.element_ty))
            tl.store(dst + jv + HALF, o2.to(cache_ptr.dtype.element_ty))


@triton.jit(do_not_specialize=["one"], do_not_specialize_on_alignment=["pos_ptr", "slot_ptr"])
def _qgemv_half_rope_kernel(
    xh_ptr, xs_ptr, xsum_ptr, q_ptr, s_ptr, o_ptr, b_ptr, out_ptr, pos_ptr, cos_sin_ptr, cache_ptr, slot_ptr,
    K, stride_q, stride_s, stride_cs, num_q_heads, num_heads, stride_plane, stride_slot, stride_head, one,
    HAS_OFF: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, HALF: tl.constexpr, WRITE_KV: tl.constexpr,
    PDL: tl.constexpr, PAIRS: tl.constexpr, BLOCK_G: tl.constexpr, PREFETCH: tl.constexpr, BITS: tl.constexpr,
):
    """`_qgemv_rope_kernel` with the half-math dot products (`triton_qgemv_half._half_rows`; the
    activations from `act_pairs`)."""
    P: tl.constexpr = HALF // PAIRS  # programs a head
    head = tl.program_id(0) // P
    jv = (tl.program_id(0) % P) * PAIRS + tl.arange(0, PAIRS)  # [PAIRS]
    t = tl.arange(0, 2 * PAIRS)  # the PAIRS first rows, then their partners
    rows = (head * (2 * HALF) + (tl.program_id(0) % P) * PAIRS + t % PAIRS + (t // PAIRS) * HALF).to(tl.int64)
    acc = triton_qgemv_half._half_rows(xh_ptr, xs_ptr, xsum_ptr, q_ptr, s_ptr, o_ptr, rows, K, stride_q, stride_s, one,
                                       HAS_OFF, GROUP, 2 * PAIRS, BLOCK_G, PREFETCH, PDL, BITS)
    _rope_store(acc, rows, head, jv, b_ptr, out_ptr, pos_ptr, cos_sin_ptr, cache_ptr, slot_ptr, stride_cs, num_q_heads,
                num_heads, stride_plane, stride_slot, stride_head, HAS_BIAS, HALF, WRITE_KV, PAIRS)


@triton.jit
def _deq_tile(q_ptr, s_ptr, o_ptr, rn64, k0, stride_q, stride_s,
              KIND: tl.constexpr, HAS_OFF: tl.constexpr, GROUP: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The dequantized fp32 tile [BLOCK_N, BLOCK_K] of rows rn64 from column k0, and the column
    of each of its elements (4-bit tiles come in the order (chunk, i, nibble))."""
    if KIND == 0:
        # Columns in their natural order (each byte read for both of its nibbles; the second
        # read hits L1), so activations load and tiles store contiguously.
        kk = k0 + tl.arange(0, BLOCK_K)
        byte = (kk // 32) * 16 + kk % 16
        sh = ((kk // 16) % 2) * 4
        b = tl.load(q_ptr + rn64[:, None] * stride_q + byte[None, :]).to(tl.int32)
        f = (((b >> sh[None, :]) & 15) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
        if BLOCK_K <= GROUP:  # one group across the tile: a scale per row
            s = tl.load(s_ptr + rn64 * stride_s + k0 // GROUP).to(tl.float32)[:, None]
            w = f * s
            if HAS_OFF:
                w += tl.load(o_ptr + rn64 * stride_s + k0 // GROUP).to(tl.float32)[:, None]
        else:
            g = kk // GROUP
            w = f * tl.load(s_ptr + rn64[:, None] * stride_s + g[None, :]).to(tl.float32)
            if HAS_OFF:
                w += tl.load(o_ptr + rn64[:, None] * stride_s + g[None, :]).to(tl.float32)
    elif KIND == 1:
        NG: tl.constexpr = BLOCK_K // GROUP
        kk = k0 + tl.arange(0, BLOCK_K)
        w = tl.load(q_ptr + rn64[:, None] * stride_q + kk[None, :]).to(tl.float32)
        grp = k0 // GROUP + tl.arange(0, NG)
        s = tl.load(s_ptr + rn64[:, None] * stride_s + grp[None, :]).to(tl.float32)
        w3 = tl.reshape(w, [BLOCK_N, NG, GROUP]) * s[:, :, None]
        if HAS_OFF:
            w3 += tl.load(o_ptr + rn64[:, None] * stride_s + grp[None, :]).to(tl.float32)[:, :, None]
        w = tl.reshape(w3, [BLOCK_N, BLOCK_K])
    else:
        kk = k0 + tl.arange(0, BLOCK_K)
        w = tl.load(q_ptr + rn64[:, None] * stride_q + kk[None, :]).to(tl.float32)
        w = w * tl.load(s_ptr + rn64 * stride_s).to(tl.float32)[:, None]
    return w, kk


@triton.jit
def _deq_tile_w(q_ptr, s_ptr, rn64, k0, stride_q, stride_s,
                KIND: tl.constexpr, GROUP: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EXACT: tl.constexpr):
    """`_deq_tile` for int8 codes without offsets (KIND 1 or 2) read as int32 words (q_ptr:
    int32, stride_q in words): two codes become fp16 1152 + q per bit operation (`_bytes`),
    with no int-to-float conversion; the constant is taken off as -1152 s, or subtracted
    exactly in fp16 with EXACT. The fp32 tile [BLOCK_N, BLOCK_K], columns in natural order."""
    W: tl.constexpr = BLOCK_K // 4
    u = k0 // 4 + tl.arange(0, W)  # word index in the row
    w = tl.load(q_ptr + rn64[:, None] * stride_q + u[None, :])
    a0, b0 = _bytes(w, 0, EXACT)  # columns 4u + 0, 4u + 2
    a1, b1 = _bytes(w, 8, EXACT)  # 4u + 1, 4u + 3
    f = tl.join(tl.join(a0, b0), tl.join(a1, b1))  # f[n, u, d, e]: column 4u + 2d + e
    kk = k0 + tl.arange(0, BLOCK_K)
    if KIND == 2:
        s = tl.broadcast_to(tl.load(s_ptr + rn64 * stride_s).to(tl.float32)[:, None], [BLOCK_N, W])
    else:
        s = tl.load(s_ptr + rn64[:, None] * stride_s + ((u * 4) // GROUP)[None, :]).to(tl.float32)
    m = tl.zeros_like(s) if EXACT else -1152.0 * s
    w = f * s[:, :, None, None] + m[:, :, None, None]
    return tl.reshape(w, [BLOCK_N, BLOCK_K]), kk


@triton.jit
def _qmm_kernel(
    x_ptr, q_ptr, s_ptr, o_ptr, b_ptr, out_ptr, M, N, K, stride_xm, stride_q, stride_s, stride_om,
    KIND: tl.constexpr, HAS_OFF: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
    IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
    WORDS: tl.constexpr,  # int8 codes read as int32 words (`_deq_tile_w`); q_ptr is int32, stride_q in words
    SCALE_AFTER: tl.constexpr = False,  # FP8 per channel: multiply the codes as they are, scale the sums
):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    n_ok = rn < N
    m_ok = rm < M
    rn64 = tl.where(n_ok, rn, 0).to(tl.int64)
    rm64 = rm.to(tl.int64)
    if PDL:
        pdl.wait(PDL)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if SCALE_AFTER:  # e4m3 values are exact in fp16 / bf16: one conversion, no multiply per weight
            kk = k0 + tl.arange(0, BLOCK_K)
            w = tl.load(q_ptr + rn64[:, None] * stride_q + kk[None, :])
        elif WORDS:
            w, kk = _deq_tile_w(q_ptr, s_ptr, rn64, k0, stride_q, stride_s, KIND, GROUP, BLOCK_N, BLOCK_K, IEEE)
        else:
            w, kk = _deq_tile(q_ptr, s_ptr, o_ptr, rn64, k0, stride_q, stride_s, KIND, HAS_OFF, GROUP, BLOCK_N, BLOCK_K)
        x = tl.load(x_ptr + rm64[:, None] * stride_xm + kk[None, :], mask=m_ok[:, None], other=0.0)
        if IEEE:
            acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc)
    if SCALE_AFTER:
        acc *= tl.load(s_ptr + rn64 * stride_s).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn64, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    dt = out_ptr.dtype.element_ty
    tl.store(out_ptr + rm64[:, None] * stride_om + rn[None, :], acc.to(dt), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _dequant_kernel(q_ptr, s_ptr, o_ptr, out_ptr, N, K, stride_q, stride_s,
                    KIND: tl.constexpr, HAS_OFF: tl.constexpr, GROUP: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    rn64 = tl.where(n_ok, rn, 0).to(tl.int64)
    k0 = tl.program_id(1) * BLOCK_K
    w, kk = _deq_tile(q_ptr, s_ptr, o_ptr, rn64, k0, stride_q, stride_s, KIND, HAS_OFF, GROUP, BLOCK_N, BLOCK_K)
    tl.store(out_ptr + rn64[:, None] * K + kk[None, :], w.to(out_ptr.dtype.element_ty), mask=n_ok[:, None])


@triton.jit
def _act_quant_fp8_kernel(x_ptr, out_ptr, scale_ptr, K, stride_x, BLOCK: tl.constexpr, PDL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    if PDL:
        pdl.wait(PDL)
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        x = tl.load(x_ptr + row * stride_x + k0 + cols, mask=k0 + cols < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.maximum(tl.max(amax, 0), 1e-12) / 448.0
    tl.store(scale_ptr + row, scale)
    for k0 in range(0, K, BLOCK):
        x = tl.load(x_ptr + row * stride_x + k0 + cols, mask=k0 + cols < K, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(x / scale, -448.0), 448.0)
        tl.store(out_ptr + row * K + k0 + cols, q.to(out_ptr.dtype.element_ty), mask=k0 + cols < K)


# -- host side ------------------------------------------------------------------------------
KINDS = {"int4": 0, "int8": 1, "fp8": 1}


def _kind(kind: str, group: int, k: int) -> int:
    """0: 4-bit; 1: 8-bit in groups; 2: 8-bit per channel."""
    if kind == "int4":
        return 0
    return 2 if group == k else 1


def _block_k(k: int, cap: int, group: int) -> int:
    """The largest power of two <= cap that divides k (and is a multiple of the group where
    the kernel groups columns)."""
    b = cap
    while b > 32 and k % b:
        b //= 2
    if k % b:
        raise ValueError(f"K={k} is not a multiple of 32")
    return b


def _launch_pdl(x: torch.Tensor) -> bool:
    return pdl.enabled(x.device)


# (BLOCK_N, BLOCK_K cap, num_warps) of the one-row kernel per storage kind (benchmarks/gpu_quant_bench.py).
GEMV_CONFIG = {"int4": (4, 1024, 4), "int8": (2, 1024, 4), "fp8": (2, 1024, 4)}
# The int32-word 4-bit GEMV (`_dot_rows_w4`, KVSERVE_INT4_GEMV=words): (weight rows a program,
# BLOCK_K cap, num_warps, PREFETCH). A thread holds the rows of one 32-column chunk that its
# program's [rows, BLOCK_K / 32, 4 words] tile gives it (lanes over chunks first, then warps over
# chunks and rows): (32, 1024, 4) and (16, 2048, 4) are 8 rows a thread (3.4 SASS instructions a
# weight in the K loop, sm_90), (16, 1024, 4) 4 (3.8). Not yet timed on a GPU:
# `benchmarks/gpu_quant_bench.py --only gemv1` times INT4_WORDS_SWEEP against the code-at-a-time
# kernel. Until then: (32, 1024, 4) for wide weights (gate/up); for narrow ones (o, down: 4096
# rows) (16, 2048, 4): the same work a thread from twice as many programs (BLOCK_K 2048 divides
# Llama's 4096 and 14336).
INT4_WORDS_CONFIG = (32, 1024, 4, False)
INT4_WORDS_CONFIG_NARROW = (16, 2048, 4, False)  # fewer than INT4_WORDS_WIDE weight rows
INT4_WORDS_WIDE = 16384
INT4_WORDS_SWEEP = [(16, 1024, 4, False), (16, 1024, 4, True), (32, 1024, 4, False), (32, 1024, 4, True),
                    (32, 1024, 8, False), (32, 1024, 8, True), (16, 2048, 4, False), (16, 2048, 4, True),
                    (64, 1024, 8, False), (32, 2048, 8, False)]
# RoPE variant (qkv): (row pairs a program, BLOCK_K cap, num_warps, PREFETCH); 8 pairs = 16 rows
# over a [16, 64, 4] tile: 8 rows a thread.
INT4_WORDS_ROPE_CONFIG = (8, 2048, 4, False)
INT4_GEMV_MODES = ("codes", "words", "half")
# The int32-word int8 GEMV (`_dot_rows_w8`, KVSERVE_INT8_GEMV=words): (weight rows a program,
# BLOCK_K cap, num_warps, PREFETCH) over a [rows, BLOCK_K / 16, 4 words] tile (16-column chunks,
# 16 bytes a row and chunk). (16, 1024, 4) and (8, 2048, 4) are 8 rows a thread. Not yet timed on a
# GPU: `benchmarks/gpu_quant_bench.py --only gemv1` times INT8_WORDS_SWEEP against the
# code-at-a-time kernel. Until then (16, 1024, 4) for wide weights, (8, 2048, 4) for narrow ones
# (twice the programs; 2048 divides Llama's 4096 and 14336).
INT8_WORDS_CONFIG = (16, 1024, 4, False)
INT8_WORDS_CONFIG_NARROW = (8, 2048, 4, False)  # fewer than INT4_WORDS_WIDE weight rows
INT8_WORDS_SWEEP = [(8, 1024, 4, False), (16, 1024, 4, False), (16, 1024, 4, True), (8, 2048, 4, False),
                    (8, 2048, 4, True), (32, 512, 4, False), (32, 1024, 8, False), (16, 2048, 8, False),
                    (32, 1024, 4, False)]
# RoPE variant (qkv): 4 pairs = 8 rows over a [8, 128, 4] tile: 8 rows a thread.
INT8_WORDS_ROPE_CONFIG = (4, 2048, 4, False)
INT8_GEMV_MODES = ("codes", "words", "half")


def int4_gemv_mode() -> str:
    """KVSERVE_INT4_GEMV: "codes" (default: `_dot_rows`, a code at a time), "words" (the int32-word
    decode, `_dot_rows_w4`) or "half" (packed half math, `triton_qgemv_half`, for 16-bit activations,
    the RoPE variant included; fp32 activations keep the code-at-a-time kernel) for the one-row
    4-bit GEMVs."""
    mode = os.environ.get("KVSERVE_INT4_GEMV", "codes")
    if mode not in INT4_GEMV_MODES:
        raise ValueError(f"KVSERVE_INT4_GEMV must be one of {', '.join(INT4_GEMV_MODES)}, got {mode!r}")
    return mode


def int8_gemv_mode() -> str:
    """KVSERVE_INT8_GEMV: "codes" (default: `_dot_rows`, a code at a time), "words" (the int32-word
    decode, `_dot_rows_w8`) or "half" (packed half math, `triton_qgemv_half`, for 16-bit
    activations, the RoPE variant included; fp32 activations keep the code-at-a-time kernel) for
    the one-row int8 GEMVs (HF int8 per channel, GGUF Q8_0)."""
    mode = os.environ.get("KVSERVE_INT8_GEMV", "codes")
    if mode not in INT8_GEMV_MODES:
        raise ValueError(f"KVSERVE_INT8_GEMV must be one of {', '.join(INT8_GEMV_MODES)}, got {mode!r}")
    return mode


def _half_mode(qw) -> bool:
    """Whether the env switch of qw's kind asks for the half-math one-row GEMV."""
    if qw.kind == "int4":
        return int4_gemv_mode() == "half"
    return qw.kind == "int8" and int8_gemv_mode() == "half"


def _x_words(x: torch.Tensor):
    """(x as the word GEMVs read it, XKIND), or None: x with unit column stride, 8-byte aligned
    (16-bit x is read 8 bytes at a time, as int64), bf16 / fp16 / fp32."""
    if x.stride(-1) != 1 or x.data_ptr() % 8:
        return None
    xkind = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}.get(x.dtype)
    if xkind is None:
        return None
    return (x if xkind == 2 else x.reshape(-1).view(torch.int64)), xkind  # (one row: the reshape is a view)


def _w8_operands(x: torch.Tensor, qw, words: bool | None):
    """(x as the word kernels read it, the codes as int32 words, XKIND) where the int32-word int8
    GEMV applies to (x, qw), else None: `words` (None: `int8_gemv_mode()`), an int8 weight without
    offsets, per channel or in groups of a multiple of 16, K a multiple of 32, code rows of whole
    aligned words, and x as `_x_words` takes it."""
    if qw.kind != "int8" or qw.offset is not None or not (int8_gemv_mode() == "words" if words is None else words):
        return None
    q = qw.q
    n, k = qw.shape
    if qw.group % 16 or k % 32 or q.stride(1) != 1 or q.stride(0) % 4 or q.data_ptr() % 16:
        return None
    xw = _x_words(x)
    if xw is None:
        return None
    return xw[0], q.view(torch.int32), xw[1]


def _w4_operands(x: torch.Tensor, qw, words: bool | None):
    """(x as the word kernels read it, the codes as int32 words, XKIND) where the int32-word 4-bit
    GEMV applies to (x, qw), else None: `words` (None: `int4_gemv_mode()`), a 4-bit weight whose
    code rows are whole aligned words, and x with unit column stride, 8-byte aligned (16-bit x is
    read 8 bytes at a time)."""
    if qw.kind != "int4" or not (int4_gemv_mode() == "words" if words is None else words):
        return None
    q = qw.q
    if q.stride(1) != 1 or q.stride(0) % 4 or q.data_ptr() % 16:
        return None
    xw = _x_words(x)
    if xw is None:
        return None
    return xw[0], q.view(torch.int32), xw[1]


def _qmm_codes(qw) -> tuple[torch.Tensor, bool]:
    """The code tensor the GEMM reads, and whether it reads int32 words of it. int8 codes are
    read as words (`_deq_tile_w`): on an H100 (2026-12-07, `gpu_quant_bench --only qmm`,
    2-64 rows) that GEMM was 5-15% faster than the code-at-a-time tile. Everything else (4-bit,
    fp8, the GEMVs, the dequantize kernel) reads a code at a time: the word versions of the
    4-bit GEMM (2-10x), the 4-bit dequantize kernel (9x) and every int4 / int8 GEMV measured
    slower and were removed; an int8 word dequantize kernel was not measured faster. (The
    opt-in 4-bit GEMM `triton_qmm4` is a different design: elementwise byte-to-pair asm that
    Triton hoists into the operand layout, no permuted tile, no fp32 per weight.)"""
    if qw.kind == "int8" and qw.offset is None:  # (int8 weights have no offsets)
        return qw.q.view(torch.int32), True
    return qw.q, False


def qgemv(x: torch.Tensor, qw, bias: torch.Tensor | None = None, silu: bool = False,
          config: tuple | None = None, words: bool | None = None, pairs: tuple | None = None) -> torch.Tensor:
    """x [1, K] times the quantized weight `qw` (a `QWeight`) -> [1, N] in x's dtype; with
    `silu`, silu(gate) * up of a fused gate/up weight -> [1, N / 2]. 4-bit and int8 weights take
    the int32-word decode with `words` (None: KVSERVE_INT4_GEMV=words / KVSERVE_INT8_GEMV=words;
    `config` then (rows, BLOCK_K cap, warps, prefetch), as INT4_WORDS_CONFIG / INT8_WORDS_CONFIG),
    else the code-at-a-time one (`config` (BLOCK_N, BLOCK_K cap, warps), as GEMV_CONFIG). With
    `words` None and KVSERVE_INT4_GEMV=half (KVSERVE_INT8_GEMV=half), 4-bit (int8) weights and
    16-bit x take `triton_qgemv_half` (its default tile; `config` is not used; `pairs`: x's
    activation pairs where its producer wrote them, `fused_ops.half_pairs`)."""
    if words is None and _half_mode(qw) and triton_qgemv_half.applies(x, qw):
        return triton_qgemv_half.qgemv_half(x, qw, bias, silu, pairs=pairs)
    n, k = qw.shape
    out_n = n // 2 if silu else n
    out = torch.empty((1, out_n), dtype=x.dtype, device=x.device)
    use_pdl = _launch_pdl(x)
    w4 = _w4_operands(x, qw, words)
    if w4 is not None:
        xw, codes, xkind = w4
        rows, cap, warps, prefetch = config or (INT4_WORDS_CONFIG if n >= INT4_WORDS_WIDE else INT4_WORDS_CONFIG_NARROW)
        block_n = rows // 2 if silu else rows
        _qgemv_kernel[(triton.cdiv(out_n, block_n),)](
            xw, codes, qw.scale, qw.offset if qw.offset is not None else qw.scale,
            bias if bias is not None else qw.scale, out, out_n, k, codes.stride(0), qw.scale.stride(0), 1,
            KIND=0, HAS_OFF=qw.offset is not None, GROUP=qw.group, HAS_BIAS=bias is not None, SILU=silu,
            ROWS=rows, BLOCK_N=block_n, BLOCK_K=_block_k(k, cap, 32), PDL=use_pdl, W4=True, XKIND=xkind,
            PREFETCH=prefetch, num_warps=warps, launch_pdl=use_pdl,
        )
        return out
    w8 = _w8_operands(x, qw, words)
    if w8 is not None:
        xw, codes, xkind = w8
        rows, cap, warps, prefetch = config or (INT8_WORDS_CONFIG if n >= INT4_WORDS_WIDE else INT8_WORDS_CONFIG_NARROW)
        block_n = rows // 2 if silu else rows
        kind = _kind(qw.kind, qw.group, k)
        block_k = _block_k(k, cap, 16)  # (any group a multiple of 16: a scale per 16-column chunk)
        _qgemv_kernel[(triton.cdiv(out_n, block_n),)](
            xw, codes, qw.scale, qw.scale, bias if bias is not None else qw.scale, out, out_n, k, codes.stride(0),
            qw.scale.stride(0), 1, KIND=kind, HAS_OFF=False, GROUP=qw.group if kind == 1 else 16,
            HAS_BIAS=bias is not None, SILU=silu, ROWS=rows, BLOCK_N=block_n, BLOCK_K=block_k, PDL=use_pdl, W8=True,
            XKIND=xkind, PREFETCH=prefetch, num_warps=warps, launch_pdl=use_pdl,
        )
        return out
    block_n, cap, warps = (config or GEMV_CONFIG[qw.kind])[:3]
    kind = _kind(qw.kind, qw.group, k)
    block_k = _block_k(k, cap, qw.group if kind == 1 else 32)
    if kind == 1:
        block_k = max(block_k, qw.group)
    if silu:
        block_n = max(1, block_n // 2)  # as many weight rows per program as the plain GEMV reads
    rows = 2 * block_n if silu else block_n
    _qgemv_kernel[(triton.cdiv(out_n, block_n),)](
        x, qw.q, qw.scale, qw.offset if qw.offset is not None else qw.scale, bias if bias is not None else qw.scale,
        out, out_n, k, qw.q.stride(0), qw.scale.stride(0), 1,
        KIND=kind, HAS_OFF=qw.offset is not None, GROUP=qw.group if kind != 2 else 32, HAS_BIAS=bias is not None,
        SILU=silu, ROWS=rows, BLOCK_N=block_n, BLOCK_K=block_k, PDL=use_pdl,
        num_warps=warps, launch_pdl=use_pdl,
    )
    return out


def qgemv_rope_(x, qw, bias, positions, cos_sin, num_q_heads, num_kv_heads, head_dim, kv_cache=None, slot_mapping=None,
                words: bool | None = None, config: tuple | None = None, pairs: tuple | None = None):
    """`triton_ops.gemv_rope_` on a quantized qkv weight: projection + RoPE (+ K/V store). 4-bit
    and int8 weights: `words` and `config` (row pairs a program, BLOCK_K cap, warps, prefetch; as
    INT4_WORDS_ROPE_CONFIG / INT8_WORDS_ROPE_CONFIG) as in `qgemv`; with `words` None and the
    kind's switch at "half", 16-bit x takes the half-math dot products (`config` then (row pairs
    a program, BLOCK_G, warps, prefetch), as triton_qgemv_half.HALF_ROPE_CONFIG; `pairs` as in
    `qgemv`)."""
    n, k = qw.shape
    if n != (num_q_heads + 2 * num_kv_heads) * head_dim or head_dim % 2:
        raise ValueError(f"qgemv_rope_: weight of {n} rows is not q, k and v heads of even size {head_dim}")
    out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    write = kv_cache is not None
    use_pdl = _launch_pdl(x)
    half = head_dim // 2
    if words is None and _half_mode(qw) and triton_qgemv_half.applies(x, qw):
        xh, xs, xsum = triton_qgemv_half.pairs_of(x, pairs)
        npairs, bg, warps, prefetch = triton_qgemv_half.check_config(config or triton_qgemv_half.HALF_ROPE_CONFIG,
                                                                    rope=True)
        while half % npairs:
            npairs //= 2
        codes = qw.q.view(torch.int32)
        bits = 8 if qw.kind == "int8" else 4
        _qgemv_half_rope_kernel[(n // (2 * npairs),)](
            xh, xs, xsum, codes, qw.scale, qw.offset if qw.offset is not None else qw.scale,
            bias if bias is not None else qw.scale, out, positions, cos_sin, kv_cache if write else qw.scale,
            slot_mapping if write else positions, k, codes.stride(0), qw.scale.stride(0), cos_sin.stride(0),
            num_q_heads, num_q_heads + num_kv_heads, kv_cache.stride(0) if write else 0,
            kv_cache.stride(2) if write else 0, kv_cache.stride(3) if write else 0, 1,
            HAS_OFF=qw.offset is not None, GROUP=0 if bits == 8 and qw.group == k else qw.group,
            HAS_BIAS=bias is not None, HALF=half, WRITE_KV=write, PDL=use_pdl, PAIRS=npairs, BLOCK_G=bg,
            PREFETCH=prefetch, BITS=bits, num_warps=warps, launch_pdl=use_pdl,
        )
        return out
    w4 = _w4_operands(x, qw, words)
    if w4 is not None:
        xw, codes, xkind = w4
        npairs, cap, warps, prefetch = config or INT4_WORDS_ROPE_CONFIG
        while half % npairs:
            npairs //= 2
        q, kind, block_k = codes, 0, _block_k(k, cap, 32)
        extra = dict(W4=True, XKIND=xkind, PREFETCH=prefetch, PAIRS=npairs)
    elif (w8 := _w8_operands(x, qw, words)) is not None:
        xw, q, xkind = w8
        npairs, cap, warps, prefetch = config or INT8_WORDS_ROPE_CONFIG
        while half % npairs:
            npairs //= 2
        kind = _kind(qw.kind, qw.group, k)
        block_k = _block_k(k, cap, 16)
        extra = dict(W8=True, XKIND=xkind, PREFETCH=prefetch, PAIRS=npairs)
    else:
        _, cap, warps = GEMV_CONFIG[qw.kind]  # two rows a program: the narrow tiles of the first GEMV
        kind = _kind(qw.kind, qw.group, k)
        block_k = _block_k(k, cap, 32)
        if kind == 1:
            block_k = max(block_k, qw.group)
        xw, q, npairs, extra = x, qw.q, 1, {}
    _qgemv_rope_kernel[(n // (2 * npairs),)](
        xw, q, qw.scale, qw.offset if qw.offset is not None else qw.scale, bias if bias is not None else qw.scale,
        out, positions, cos_sin, kv_cache if write else qw.scale, slot_mapping if write else positions,
        k, q.stride(0), qw.scale.stride(0), cos_sin.stride(0), num_q_heads, num_q_heads + num_kv_heads,
        kv_cache.stride(0) if write else 0, kv_cache.stride(2) if write else 0, kv_cache.stride(3) if write else 0, 1,
        KIND=kind, HAS_OFF=qw.offset is not None, GROUP=qw.group if kind != 2 else 32, HAS_BIAS=bias is not None,
        HALF=half, BLOCK_K=block_k, WRITE_KV=write, PDL=use_pdl, num_warps=warps, launch_pdl=use_pdl, **extra,
    )
    return out


def qmm_config(m: int, n: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of the dequantizing GEMM. Few rows
    are bound by reading the weight: narrower column tiles for narrow weights keep every SM
    streaming (a 4096-row weight in 64-row tiles is 64 programs for 132 SMs)."""
    if m <= 64:
        bm = 16 if m <= 16 else 32 if m <= 32 else 64
        return bm, 64 if n >= 16384 else 32, 128, 4, 4
    return 128, 128, 64, 8, 3


# The 4-bit GEMM (`triton_qmm4`, codes four bytes at a time): "words" dequantizes each tile
# in fp16 / bf16 pairs, "raw" multiplies the exact codes and scales the fp32 partials per group
# (tiles of up to 32 rows), "auto" is raw where K is not split (its group sums after the loop
# cost a pass over the activations per program: estimated from the sm_90 SASS, raw is cheaper
# than words only without split K) and words elsewhere — the default since its first GPU run
# (NVIDIA H100, 2026-12-07: Llama-3.1-8B gate_up at 16 rows 53.9 µs against 108.1 for the
# code-at-a-time tile and 85.4 for bf16 cuBLAS; batch-16 int4 decode 11.08 -> 4.13 ms a step);
# "codes" is the code-at-a-time tile of `_qmm_kernel`. KVSERVE_INT4_QMM picks.
INT4_QMM_MODES = ("codes", "words", "raw", "auto")
INT4_QMM = os.environ.get("KVSERVE_INT4_QMM", "auto")
if INT4_QMM not in INT4_QMM_MODES:
    raise ValueError(f"KVSERVE_INT4_QMM must be one of {', '.join(INT4_QMM_MODES)} (got {INT4_QMM!r})")
# FP8 (per-channel scales) in the GEMM: multiply the e4m3 codes converted as they are (exact in
# fp16 / bf16) and scale the fp32 sums once per output (`_qmm_kernel` SCALE_AFTER: 5.0 instead
# of 6.1 SASS instructions a weight at 16 rows) rather than dequantizing each weight; opt-in
# (KVSERVE_FP8_QMM_SCALE_AFTER=1) until measured.
FP8_SCALE_AFTER = os.environ.get("KVSERVE_FP8_QMM_SCALE_AFTER", "0")
if FP8_SCALE_AFTER not in ("0", "1"):
    raise ValueError(f"KVSERVE_FP8_QMM_SCALE_AFTER must be 0 or 1 (got {FP8_SCALE_AFTER!r})")
FP8_SCALE_AFTER = FP8_SCALE_AFTER == "1"


def qmm(x: torch.Tensor, qw, bias: torch.Tensor | None = None,
        config: tuple[int, ...] | None = None, mode: str | None = None,
        fp8_scale_after: bool | None = None) -> torch.Tensor:
    """x [M, K] times the quantized weight -> [M, N], dequantizing each tile in registers.
    `mode` (4-bit weights; default `INT4_QMM`): "words" / "raw" / "auto" run `triton_qmm4.qmm4`
    (`config`: as `triton_qmm4.qmm4_config`'s), "codes" the code-at-a-time tile (`qmm_config`).
    `fp8_scale_after` (FP8 weights; default `FP8_SCALE_AFTER`): scale the sums, not the codes."""
    mode = INT4_QMM if mode is None else mode
    if qw.kind == "int4" and mode != "codes":
        if mode not in INT4_QMM_MODES:
            raise ValueError(f"mode must be one of {INT4_QMM_MODES} (got {mode!r})")
        return triton_qmm4.qmm4(x, qw, bias, config, mode)
    m, k = x.shape
    n = qw.shape[0]
    bm, bn, bk, warps, stages = config or qmm_config(m, n)
    kind = _kind(qw.kind, qw.group, k)
    if kind == 1:
        bk = max(bk, qw.group)
    elif kind == 0 and qw.group >= 64:
        bk = min(bk, qw.group)  # one scale per row and tile
    while k % bk:
        bk //= 2
    if bk < 32:
        raise ValueError(f"K={k} is not a multiple of 32")
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    use_pdl = _launch_pdl(x)
    codes, words = _qmm_codes(qw)
    _qmm_kernel[(triton.cdiv(n, bn), triton.cdiv(m, bm))](
        x, codes, qw.scale, qw.offset if qw.offset is not None else qw.scale, bias if bias is not None else qw.scale,
        out, m, n, k, x.stride(0), codes.stride(0), qw.scale.stride(0), out.stride(0),
        KIND=kind, HAS_OFF=qw.offset is not None, GROUP=qw.group if kind != 2 else 32, HAS_BIAS=bias is not None,
        IEEE=x.dtype == torch.float32, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, PDL=use_pdl, WORDS=words,
        SCALE_AFTER=kind == 2 and qw.kind == "fp8" and (FP8_SCALE_AFTER if fp8_scale_after is None else fp8_scale_after),
        num_warps=warps, num_stages=stages, launch_pdl=use_pdl,
    )
    return out


def dequantize(qw, dtype: torch.dtype) -> torch.Tensor:
    """The whole [N, K] weight in `dtype`, one pass over the quantized bytes."""
    n, k = qw.shape
    kind = _kind(qw.kind, qw.group, k)
    bn, bk = 32, 128 if kind != 1 else max(128, qw.group)
    if kind == 0 and qw.group >= 64:
        bk = min(bk, qw.group)
    while k % bk:
        bk //= 2
    out = torch.empty((n, k), dtype=dtype, device=qw.q.device)
    _dequant_kernel[(triton.cdiv(n, bn), k // bk)](
        qw.q, qw.scale, qw.offset if qw.offset is not None else qw.scale, out, n, k, qw.q.stride(0), qw.scale.stride(0),
        KIND=kind, HAS_OFF=qw.offset is not None, GROUP=qw.group if kind != 2 else 32,
        BLOCK_N=bn, BLOCK_K=bk, num_warps=4,
    )
    return out


def act_quant_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (float8_e4m3fn [M, K], fp32 scales [M, 1]): each row scaled by amax / 448."""
    m, k = x.shape
    out = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    use_pdl = _launch_pdl(x)
    _act_quant_fp8_kernel[(m,)](x, out, scale, k, x.stride(0), BLOCK=min(4096, triton.next_power_of_2(k)),
                                PDL=use_pdl, num_warps=4, launch_pdl=use_pdl)
    return out, scale
