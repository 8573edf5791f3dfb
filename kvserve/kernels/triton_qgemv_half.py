"""The one-row 4-bit and int8 GEMVs in packed half math (`triton_quant.qgemv` with
KVSERVE_INT4_GEMV=half / KVSERVE_INT8_GEMV=half, 16-bit activations; the weight layouts are
`triton_quant`'s "int4": GGML chunk order, scale and offset per group of 32 or 128, w = s q + m,
and "int8": w = s q per channel or per group of 32 (Q8_0) / 128).

Why: the code-at-a-time GEMV (`triton_quant._dot_rows`) turns every code into fp32 with an
int-to-float conversion, which runs at a quarter of the FMA rate; on an H100 it read 1.2-1.6 TB/s
of 4-bit weights where the bf16 GEMV reads 3.6-4.6 (benchmarks/RESULTS.md). Here a thread takes a
whole 32-weight block (four int32 code words, one 16-byte load) and the inline PTX of
`_block_dot` does, per word: two `prmt` that put the code bytes under an fp16 exponent byte, four
ANDs that keep one nibble a half, four `fma.rn.f16x2` that make the exact codes times 2^-10, and
four `fma.rn.f16x2` against the activation pairs — about two instructions a weight, no conversion
until the block's four fp16 partial sums are widened to fp32. int8 codes (`_block_dot8`): an XOR
makes the bytes unsigned, two `prmt` put them under the exponent byte, one fma a pair makes q
2^-10 exactly, one more multiplies — 1.75 instructions a weight, in units of 16 columns.

The activations go through `act_pairs` first (one small kernel): per 32-value block, scaled by a
power of two so that its largest magnitude lies in [2^10, 2^11), rounded to fp16 (exact for bf16
values down to 2^-14 of the block's largest; fp16 values down to 2^-11 of it) and stored in the
pair order the PTX reads (`_PAIR`), with 2^(10 - c) to undo the scaling and the block's sum for
the offsets (of the scaled fp16 values, exact in fp64, then fp32). The RMSNorm kernel writes the
same three tensors beside its output where a half-math GEMV reads it (`fused_ops.half_pairs`), so
the qkv and gate/up products launch no `act_pairs` of their own.

Products of 4-bit codes times 2^-10 (< 2^-6) with those (< 2^11) stay below 30 and a half's sum
of 8 products below 240 (int8: |q| 2^-10 <= 2^-3, products below 2^8, sums below 2^11): no
overflow, about 11 bits kept per partial sum. fp32 activations keep the code-at-a-time kernel
(its exact fp32 math is what the tests compare). The qkv + RoPE + K/V store variant
(`triton_quant._qgemv_half_rope_kernel`) shares `_half_rows`.

Per (row, block) the fp32 epilogue is block_sum * s * 2^(10 - c) + m * sum(x). A program takes
ROWS weight rows (SILU: BLOCK_N gate rows and the matching up rows) over [ROWS, BLOCK_G, 4] word
tiles; with BLOCK_G >= 32 * num_warps a warp's lanes take consecutive blocks of a row (512
contiguous bytes a load) and each thread holds all ROWS rows of its blocks, so its activation
pairs are loaded once for all of them.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kvserve.models import pdl

# Inline PTX where the kernels run on a GPU; the interpreter (TRITON_INTERPRET=1) runs none.
_PTX = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") != "1")


def _pair_order() -> list[int]:
    """Storage slot 4 i + w of a block's 16 activation pairs holds pair P = (values 2P, 2P + 1)
    that code word w's slot i multiplies: i = 0 / 1 the low nibbles of bytes 0-1 / 2-3 (columns
    4w..4w+1 / 4w+2..4w+3), i = 2 / 3 their high nibbles (the same + 16). Loading slot group i as
    one contiguous [4] vector gives operand i of `_block_dot` for the four words at once."""
    return [(0 if i < 2 else 8) + 2 * w + (i % 2) for i in range(4) for w in range(4)]


_PAIR = _pair_order()


def _block_dot_asm() -> str:
    """PTX for `_block_dot` (pack 4: $0..$3 the outputs, $4..$7 a block's code words, $8 + 4 i + w
    the activation pair of word w's slot i, see `_pair_order`). Per word: t0 / t1 = bytes 0-1 /
    2-3 each under the fp16 exponent byte 0x64; AND 0xFF0FFF0F keeps the low nibbles (1024 + q),
    0xFFF0FFF0 the high ones (1024 + 16 q); one fma each makes q 2^-10 exactly ((1024 + q) 2^-10
    - 1, (1024 + 16 q) 2^-14 - 2^-4); one fma each multiplies with the activation pair into an
    fp16x2 accumulator (words 0-1 and 2-3: 8 products a half). The four halves widened to fp32
    and summed into $0; $1..$3 -0.0 (the identity of the sum over the words that follows)."""
    lines = [".reg .b32 rm, rt0, rt1, rq, rca, rcb, rda, rdb, rsa, rsb;", ".reg .b16 rl, rh;", ".reg .f32 rf, rg;",
             "mov.b32 rm, 0x64646464;", "mov.b32 rca, 0x14001400;", "mov.b32 rda, 0xBC00BC00;",
             "mov.b32 rcb, 0x04000400;", "mov.b32 rdb, 0xAC00AC00;"]
    for w in range(4):
        acc = "rsa" if w < 2 else "rsb"
        lines += [f"prmt.b32 rt0, rm, ${4 + w}, 0x0504;", f"prmt.b32 rt1, rm, ${4 + w}, 0x0706;"]
        slots = (("rt0", "0xFF0FFF0F", "rca", "rda"), ("rt1", "0xFF0FFF0F", "rca", "rda"),
                 ("rt0", "0xFFF0FFF0", "rcb", "rdb"), ("rt1", "0xFFF0FFF0", "rcb", "rdb"))
        for i, (src, mask, mul, add) in enumerate(slots):
            xp = f"${8 + 4 * i + w}"
            lines += [f"and.b32 rq, {src}, {mask};", f"fma.rn.f16x2 rq, rq, {mul}, {add};"]
            if w % 2 == 0 and i == 0:  # an accumulator's first product
                lines.append(f"mul.rn.f16x2 {acc}, rq, {xp};")
            else:
                lines.append(f"fma.rn.f16x2 {acc}, rq, {xp}, {acc};")
    lines += ["mov.b32 {rl, rh}, rsa;", "cvt.f32.f16 rf, rl;", "cvt.f32.f16 rg, rh;", "add.f32 rf, rf, rg;",
              "mov.b32 {rl, rh}, rsb;", "cvt.f32.f16 rg, rl;", "add.f32 rf, rf, rg;", "cvt.f32.f16 rg, rh;",
              "add.f32 rf, rf, rg;", "mov.b32 $0, rf;", "mov.b32 $1, 0x80000000;", "mov.b32 $2, 0x80000000;",
              "mov.b32 $3, 0x80000000;"]
    return "{ " + " ".join(lines) + " }"


def _block_dot8_asm() -> str:
    """PTX for `_block_dot8` (pack 4: $0..$3 the outputs, $4..$7 the int8 code words of 16
    columns, $8 + 4 i + w the activation pair of word w's bytes 2i, 2i + 1). Per word: XOR
    0x80808080 makes each byte u = q + 128; two `prmt` put bytes 0-1 / 2-3 under the fp16 exponent
    byte 0x64 (1024 + u); one fma each makes q 2^-10 exactly ((1024 + u) 2^-10 - 1.125); one fma
    each into one fp16x2 accumulator (8 products a half, each below 2^8). The two halves widened
    to fp32 and summed into $0; $1..$3 -0.0."""
    lines = [".reg .b32 rm, ru, rt0, rt1, rc, rd, rs;", ".reg .b16 rl, rh;", ".reg .f32 rf, rg;",
             "mov.b32 rm, 0x64646464;", "mov.b32 rc, 0x14001400;", "mov.b32 rd, 0xBC80BC80;"]
    for w in range(4):
        lines += [f"xor.b32 ru, ${4 + w}, 0x80808080;", "prmt.b32 rt0, ru, rm, 0x4140;",
                  "prmt.b32 rt1, ru, rm, 0x4342;", "fma.rn.f16x2 rt0, rt0, rc, rd;", "fma.rn.f16x2 rt1, rt1, rc, rd;"]
        lines.append(f"mul.rn.f16x2 rs, rt0, ${8 + w};" if w == 0 else f"fma.rn.f16x2 rs, rt0, ${8 + w}, rs;")
        lines.append(f"fma.rn.f16x2 rs, rt1, ${12 + w}, rs;")
    lines += ["mov.b32 {rl, rh}, rs;", "cvt.f32.f16 rf, rl;", "cvt.f32.f16 rg, rh;", "add.f32 rf, rf, rg;",
              "mov.b32 $0, rf;", "mov.b32 $1, 0x80000000;", "mov.b32 $2, 0x80000000;", "mov.b32 $3, 0x80000000;"]
    return "{ " + " ".join(lines) + " }"


@triton.jit
def _nth(i: tl.constexpr, x0, x1, x2, x3):
    """x_i for a compile-time i (the interpreter paths' loops over the activation pairs of a
    code word)."""
    r = x3
    if i == 0:
        r = x0
    elif i == 1:
        r = x1
    elif i == 2:
        r = x2
    return r


@triton.jit
def _f16_pair(v, SUB: tl.constexpr):
    """The two fp16 halves of int32 `v` as fp32 (low half, high half), less SUB (0, 1024 or 1152;
    subtracted in fp16, exactly, before the conversion). The PTX form lets ptxas convert
    each half in place (HADD2.F32 with a half selector); the interpreter, which runs no PTX,
    takes the portable form."""
    if _PTX:
        if SUB == 1024:
            lo, hi = tl.inline_asm_elementwise(
                "{ .reg .b16 l, h; .reg .b32 c, d; mov.b32 c, 0x64006400; sub.f16x2 d, $2, c; mov.b32 {l, h}, d; "
                "cvt.f32.f16 $0, l; cvt.f32.f16 $1, h; }",
                "=r,=r,r", [v], dtype=(tl.float32, tl.float32), is_pure=True, pack=1)
        elif SUB == 1152:
            lo, hi = tl.inline_asm_elementwise(
                "{ .reg .b16 l, h; .reg .b32 c, d; mov.b32 c, 0x64806480; sub.f16x2 d, $2, c; mov.b32 {l, h}, d; "
                "cvt.f32.f16 $0, l; cvt.f32.f16 $1, h; }",
                "=r,=r,r", [v], dtype=(tl.float32, tl.float32), is_pure=True, pack=1)
        else:
            lo, hi = tl.inline_asm_elementwise(
                "{ .reg .b16 l, h; mov.b32 {l, h}, $2; cvt.f32.f16 $0, l; cvt.f32.f16 $1, h; }",
                "=r,=r,r", [v], dtype=(tl.float32, tl.float32), is_pure=True, pack=1)
    else:
        lo = (v & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32) - SUB
        hi = (v >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32) - SUB
    return lo, hi


_BLOCK_DOT_ASM = tl.constexpr(_block_dot_asm())
_BLOCK_DOT_CONSTRAINTS = tl.constexpr("=r,=r,=r,=r," + ",".join(["r"] * 20))
_BLOCK_DOT8_ASM = tl.constexpr(_block_dot8_asm())
_BLOCK_DOT8_CONSTRAINTS = tl.constexpr("=r,=r,=r,=r," + ",".join(["r"] * 12))


@triton.jit
def _block_dot(q, x0, x1, x2, x3):
    """[ROWS, BLOCK_G, 4] code words (a 32-weight block in the last axis, in one thread) against
    the activation pairs x_i [1, BLOCK_G, 4] (slot i of each word, `_pair_order`) -> fp32 of q's
    shape whose sum over the last axis is the block's sum of q x' 2^-10 (x' the scaled fp16
    activations): packed half math on the GPU (`_block_dot_asm`). The interpreter, which runs no
    PTX, takes the same products in fp32 per word."""
    if _PTX:
        return tl.inline_asm_elementwise(_BLOCK_DOT_ASM, _BLOCK_DOT_CONSTRAINTS, [q, x0, x1, x2, x3],
                                         dtype=tl.float32, is_pure=True, pack=4)
    else:
        blk = tl.zeros(q.shape, dtype=tl.float32)
        for i in tl.static_range(4):
            b = 16 * (i % 2)  # bytes 0-1 or 2-3
            sh = 4 * (i // 2)  # low or high nibbles
            c0 = ((q >> (b + sh)) & 15).to(tl.float32)
            c1 = ((q >> (b + 8 + sh)) & 15).to(tl.float32)
            xa, xb = _f16_pair(_nth(i, x0, x1, x2, x3), 0)
            blk += (c0 * xa + c1 * xb) * 0.0009765625  # 2^-10
        return blk


@triton.jit
def _block_dot8(q, x0, x1):
    """`_block_dot` for int8 codes: [ROWS, BLOCK_G, 4] code words (16 columns in the last axis)
    against the activation pairs x_i [1, BLOCK_G, 4] (word w's bytes 2i, 2i + 1) -> fp32 whose sum
    over the last axis is the 16 columns' sum of q x' 2^-10 (`_block_dot8_asm`; the interpreter
    takes the same products in fp32)."""
    if _PTX:
        return tl.inline_asm_elementwise(_BLOCK_DOT8_ASM, _BLOCK_DOT8_CONSTRAINTS, [q, x0, x1],
                                         dtype=tl.float32, is_pure=True, pack=4)
    else:
        blk = tl.zeros(q.shape, dtype=tl.float32)
        for i in tl.static_range(2):
            c0 = ((((q >> (16 * i)) & 255) ^ 128) - 128).to(tl.float32)
            c1 = ((((q >> (16 * i + 8)) & 255) ^ 128) - 128).to(tl.float32)
            xa, xb = _f16_pair(_nth(i, x0, x1, x0, x1), 0)
            blk += (c0 * xa + c1 * xb) * 0.0009765625  # 2^-10
        return blk


@triton.jit
def _act_pairs_kernel(
    x_ptr,  # [T, K] 16-bit activations
    xh_ptr,  # [T, K / 2] int32: the fp16 pairs in `_pair_order` per 32-value block
    xs_ptr,  # [T, K / 32] float32: 2^(10 - c) per block
    xsum_ptr,  # [T, K / 32] float32: each block's sum
    stride_x,
    G,  # K / 32
    BLOCK_G: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl.wait(PDL)
    tok = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    g_ok = g < G
    s = tl.arange(0, 16)
    col = 2 * (8 * (s // 8) + 2 * (s % 4) + (s // 4) % 2)  # the first column of slot s's pair (`_pair_order`)
    xo = x_ptr + tok * stride_x + (g * 32)[:, None] + col[None, :]
    a = tl.load(xo, mask=g_ok[:, None], other=0.0).to(tl.float32)
    b = tl.load(xo + 1, mask=g_ok[:, None], other=0.0).to(tl.float32)
    m = tl.maximum(tl.max(tl.abs(a), 1), tl.max(tl.abs(b), 1))
    e = ((m.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127  # floor(log2 m); -127 for 0 and subnormals
    c = tl.minimum(10 - e, 100)
    up = ((c + 127) << 23).to(tl.float32, bitcast=True)
    lo = (a * up[:, None]).to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    hi = (b * up[:, None]).to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) << 16
    tl.store(xh_ptr + tok * (G * 16) + (g * 16)[:, None] + s[None, :], lo | hi, mask=g_ok[:, None])
    tl.store(xs_ptr + tok * G + g, ((137 - c) << 23).to(tl.float32, bitcast=True), mask=g_ok)  # 2^(10 - c)
    # The block sum from the scaled fp16 halves (multiples of 2^-24 below 2^11): exact in fp64 in any
    # order, so the norm kernels that write these pairs (`triton_ops._pairs_row`) write the same bits.
    down = ((127 - c) << 23).to(tl.float32, bitcast=True)
    sa = tl.sum((a * up[:, None]).to(tl.float16).to(tl.float64), 1)
    sb = tl.sum((b * up[:, None]).to(tl.float16).to(tl.float64), 1)
    tl.store(xsum_ptr + tok * G + g, (sa + sb).to(tl.float32) * down, mask=g_ok)


def act_pairs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[T, K] 16-bit activations (K a multiple of 32) -> (int32 [T, K / 2] scaled fp16 pairs,
    float32 [T, K / 32] 2^(10 - c), float32 [T, K / 32] block sums) as `_qgemv_half_kernel` reads
    them (module docstring)."""
    t, k = x.shape
    if k % 32:
        raise ValueError(f"activations of width {k}: the half-math GEMVs need a multiple of 32")
    xh = torch.empty((t, k // 2), dtype=torch.int32, device=x.device)
    xs = torch.empty((t, k // 32), dtype=torch.float32, device=x.device)
    xsum = torch.empty((t, k // 32), dtype=torch.float32, device=x.device)
    use_pdl = pdl.enabled(x.device)
    if t:
        _act_pairs_kernel[(t, triton.cdiv(k // 32, 16))](x, xh, xs, xsum, x.stride(0), k // 32, BLOCK_G=16, PDL=use_pdl,
                                                         num_warps=4, launch_pdl=use_pdl)
    return xh, xs, xsum


@triton.jit
def gemv_rows(N, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, SILU: tl.constexpr):
    """The rows of a one-row quantized GEMV program (this module's and `triton_quant._qgemv_kernel`):
    (output rows [ROWS], their mask, the weight rows as int64, row 0 where masked). SILU: BLOCK_N
    gate rows, then the matching up rows (N on: the weight has 2N rows)."""
    r = tl.arange(0, ROWS)
    if SILU:
        rows = tl.program_id(0) * BLOCK_N + r % BLOCK_N
        w_rows = tl.where(r >= BLOCK_N, rows + N, rows)
    else:
        rows = tl.program_id(0) * BLOCK_N + r
        w_rows = rows
    row_ok = rows < N
    return rows, row_ok, tl.where(row_ok, w_rows, 0).to(tl.int64)


@triton.jit
def gemv_store(acc, rows, row_ok, rows64, b_ptr, out_ptr, N, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
               BLOCK_N: tl.constexpr):
    """The epilogue of those GEMVs: fp32 sums `acc` (+ bias) stored in the output dtype, or SILU:
    silu(gate) * up of the BLOCK_N pairs."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + rows64, mask=row_ok, other=0.0).to(tl.float32)
    dt = out_ptr.dtype.element_ty
    if SILU:
        g, u = tl.split(tl.trans(tl.reshape(acc, [2, BLOCK_N])))
        # Rounded where the unfused path rounds: the projection's output, then SiLU, then the product.
        g = g.to(dt).to(tl.float32)
        u = u.to(dt).to(tl.float32)
        s = (g / (1.0 + tl.exp(-g))).to(dt)
        out_rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        tl.store(out_ptr + out_rows, (s.to(tl.float32) * u).to(dt), mask=out_rows < N)
    else:
        tl.store(out_ptr + rows, acc.to(dt), mask=row_ok)


@triton.jit
def _half_rows(xh_ptr, xs_ptr, xsum_ptr, q_ptr, s_ptr, o_ptr, rows64, K, stride_q, stride_s, one,
               HAS_OFF: tl.constexpr, GROUP: tl.constexpr, ROWS: tl.constexpr, BLOCK_G: tl.constexpr,
               PREFETCH: tl.constexpr, PDL: tl.constexpr, BITS: tl.constexpr):
    """fp32 [ROWS]: the dot products of weight rows `rows64` with the activations (`act_pairs`).
    A unit is four code words: a 32-column block (4-bit) or 16 columns (int8, half an activation
    block: same pair order, `_pair_order`). The first tile's code words are requested before the
    PDL wait (weights only); PREFETCH: each iteration requests the next tile before decoding this
    one (twice the bytes in flight)."""
    UNIT: tl.constexpr = 32 if BITS == 4 else 16  # columns a unit (4 code words)
    G = K // UNIT
    SPG: tl.constexpr = GROUP // UNIT  # units a scale (0: one scale a row)
    # Everything in the code tile's [ROWS, BLOCK_G, 4] layout and only 3-D index tensors, so the
    # loop has no layout conversion. With BLOCK_G >= 32 * num_warps (`check_config`'s advice) the
    # warps split the blocks, a thread holds whole blocks of all ROWS rows, and the [1, BLOCK_G, 4]
    # activation loads get the code tile's own layout: each thread loads a block's 16 pairs once
    # (four 16-byte loads) for all its rows. (Narrower tiles are right too, through shared memory.)
    # `_block_dot` leaves a block's sum in the first of its 4 elements (the others -0.0), so the
    # offsets' term goes there alone.
    w3 = tl.arange(0, 4)[None, None, :]
    gi3 = tl.arange(0, BLOCK_G)[None, :, None]
    r3 = rows64[:, None, None]
    qp = q_ptr + r3 * stride_q + w3
    sp = s_ptr + r3 * stride_s
    op = o_ptr + r3 * stride_s
    first = (w3 == 0).to(tl.float32)
    q_next = tl.load(qp + gi3 * 4, mask=gi3 < G, other=0, eviction_policy="evict_first")
    pdl.wait(PDL)
    acc = tl.zeros([ROWS, BLOCK_G, 4], dtype=tl.float32)
    for g0 in range(0, G, BLOCK_G):
        g3 = g0 + gi3
        ok3 = g3 < G
        if PREFETCH:
            q = q_next
            q_next = tl.load(qp + (g3 + BLOCK_G) * 4, mask=g3 + BLOCK_G < G, other=0, eviction_policy="evict_first")
        else:
            if g0 > 0:
                q_next = tl.load(qp + g3 * 4, mask=ok3, other=0, eviction_policy="evict_first")
            q = q_next
        xo = xh_ptr + g3 * (UNIT // 2) + w3  # [1, BLOCK_G, 4]
        x0 = tl.load(xo, mask=ok3, other=0)
        x1 = tl.load(xo + 4, mask=ok3, other=0)
        if BITS == 4:
            x2 = tl.load(xo + 8, mask=ok3, other=0)
            x3 = tl.load(xo + 12, mask=ok3, other=0)
            blk = _block_dot(q, x0, x1, x2, x3)  # [ROWS, BLOCK_G, 4]
        else:
            blk = _block_dot8(q, x0, x1)
        # (g3 * one: consecutive per-block scales would make Triton vectorize these loads along
        # the blocks, in another layout, converted through shared memory every step)
        gs = g3 // (32 // UNIT) * one  # the activation block
        xs = tl.load(xs_ptr + gs, mask=ok3, other=0.0)  # [1, BLOCK_G, 1]
        if SPG == 0:
            sg = g3 * 0
        else:
            sg = g3 // SPG * one
        s = tl.load(sp + sg, mask=ok3, other=0.0).to(tl.float32)  # [ROWS, BLOCK_G, 1]
        acc += blk * (s * xs)
        if HAS_OFF:
            xsum = tl.load(xsum_ptr + gs, mask=ok3, other=0.0)
            acc += tl.load(op + sg, mask=ok3, other=0.0).to(tl.float32) * (xsum * first)
    return tl.sum(tl.sum(acc, 2), 1)


@triton.jit(do_not_specialize=["one"])
def _qgemv_half_kernel(
    xh_ptr, xs_ptr, xsum_ptr,  # `act_pairs` of one row
    q_ptr,  # int32 code words: 4-bit [N_w, K / 8] (GGML chunk order: 4 words a 32-column block), int8 [N_w, K / 4]
    s_ptr, o_ptr,  # [N_w, K / GROUP] scales, offsets (int8: none; per channel: [N_w, 1])
    b_ptr, out_ptr,
    N,  # output columns (SILU: the gate rows I; the weight has 2I rows)
    K, stride_q, stride_s,
    one,  # 1, not specialized: see the loop
    HAS_OFF: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, PREFETCH: tl.constexpr, PDL: tl.constexpr,
    BITS: tl.constexpr = 4,  # 8: int8 codes, a unit of 16 columns (`_block_dot8`); GROUP 0: a scale per row
):
    """out = x W^T (+ bias) for ROWS weight rows, or SILU: silu(gate) * up with BLOCK_N gate rows
    and their up rows (`_half_rows`; module docstring)."""
    rows, row_ok, rows64 = gemv_rows(N, ROWS, BLOCK_N, SILU)
    res = _half_rows(xh_ptr, xs_ptr, xsum_ptr, q_ptr, s_ptr, o_ptr, rows64, K, stride_q, stride_s, one, HAS_OFF, GROUP,
                     ROWS, BLOCK_G, PREFETCH, PDL, BITS)
    gemv_store(res, rows, row_ok, rows64, b_ptr, out_ptr, N, HAS_BIAS, SILU, BLOCK_N)


# (weight rows a program, BLOCK_G, num_warps, PREFETCH). Not yet timed on a GPU:
# `benchmarks/gpu_quant_bench.py --only gemvh` times HALF_SWEEP against the code-at-a-time kernel.
# Until then 4 rows over 128 units (4,096 columns of 4-bit codes) with 4 warps: 3.20 SASS
# instructions a weight in the K loop (sm_90, bf16, groups of 128: `python -m
# tests.gpu.qgemv_half_sass`), against 7.72 for the code-at-a-time GEMV.
HALF_CONFIG = (4, 128, 4, False)
HALF_SWEEP = [(4, 128, 4, False), (4, 128, 4, True), (8, 128, 4, False), (8, 128, 4, True), (2, 128, 4, False),
              (4, 64, 2, False), (4, 64, 2, True), (8, 64, 2, False), (8, 32, 1, False), (2, 256, 8, False),
              (4, 256, 8, False), (16, 32, 4, False)]


def check_config(cfg: tuple, rope: bool = False) -> tuple[int, int, int, bool]:
    """(rows, BLOCK_G, num_warps, PREFETCH) (`rope`: row pairs for rows), checked: powers of two,
    and at least 4 tile elements a thread (rows * BLOCK_G >= 32 * num_warps), or a unit's four
    words would be split across threads while the PTX takes them as one pack (see
    triton_mxfp4_moe._check_half_tile)."""
    if len(cfg) != 4:
        raise ValueError(f"half-math GEMV config needs ({'row pairs' if rope else 'rows'}, BLOCK_G, num_warps, "
                         f"PREFETCH) (got {cfg!r})")
    rows, bg, warps, prefetch = cfg
    for name, v in (("rows", rows), ("BLOCK_G", bg), ("num_warps", warps)):
        if v < 1 or v & (v - 1):
            raise ValueError(f"half-math GEMV config: {name} must be a power of two (got {v})")
    weight_rows = 2 * rows if rope else rows
    if weight_rows * bg < 32 * warps:
        raise ValueError(f"half-math GEMV config: weight rows * BLOCK_G must be >= 32 * num_warps (whole units "
                         f"per thread; got {weight_rows} * {bg} < 32 * {warps})")
    return rows, bg, warps, bool(prefetch)


# The qkv + RoPE variant (`triton_quant._qgemv_half_rope_kernel`): (row pairs a program, BLOCK_G,
# num_warps, PREFETCH), the GEMV's default tile (4 rows).
HALF_ROPE_CONFIG = (2, 128, 4, False)


def applies(x: torch.Tensor, qw) -> bool:
    """Whether `qgemv_half` takes (x, qw): 16-bit activations, K a multiple of 32, code rows of
    whole aligned words, and a 4-bit weight in groups of a multiple of 32 or an int8 one without
    offsets, per channel or in groups of a multiple of 16."""
    q = qw.q
    k = qw.shape[1]
    if x.dtype not in (torch.bfloat16, torch.float16) or k % 32:
        return False
    if qw.kind == "int8":
        if qw.offset is not None or (qw.group != k and qw.group % 16):
            return False
    elif qw.kind != "int4" or qw.group % 32:
        return False
    return q.stride(1) == 1 and q.stride(0) % 4 == 0 and q.data_ptr() % 16 == 0


def pairs_of(x: torch.Tensor, pairs: tuple | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`act_pairs` of the one row x [1, K], or `pairs` where the kernel that produced x wrote them
    (`fused_ops.half_pairs`)."""
    if pairs is not None and pairs[0].shape == (1, x.shape[-1] // 2):
        return pairs
    return act_pairs(x.reshape(1, -1))


def qgemv_half(x: torch.Tensor, qw, bias: torch.Tensor | None = None, silu: bool = False,
               config: tuple | None = None, pairs: tuple | None = None) -> torch.Tensor:
    """x [1, K] (bf16 / fp16) times the 4-bit or int8 weight `qw` -> [1, N] in x's dtype; with
    `silu`, silu(gate) * up of a fused gate/up weight -> [1, N / 2]. `config` as HALF_CONFIG;
    `pairs`: x's `act_pairs`, if its producer wrote them (else computed here)."""
    if not applies(x, qw):
        raise ValueError("the half-math GEMV needs a 4-bit or int8 (no offsets, per channel or groups of a "
                         "multiple of 16) weight with aligned code rows, and bf16 / fp16 activations with K a "
                         "multiple of 32")
    n, k = qw.shape
    rows, bg, warps, prefetch = check_config(config or HALF_CONFIG)
    out_n = n // 2 if silu else n
    block_n = rows // 2 if silu else rows
    out = torch.empty((1, out_n), dtype=x.dtype, device=x.device)
    xh, xs, xsum = pairs_of(x, pairs)
    codes = qw.q.view(torch.int32)
    bits = 8 if qw.kind == "int8" else 4
    group = 0 if bits == 8 and qw.group == k else qw.group
    use_pdl = pdl.enabled(x.device)
    _qgemv_half_kernel[(triton.cdiv(out_n, block_n),)](
        xh, xs, xsum, codes, qw.scale, qw.offset if qw.offset is not None else qw.scale,
        bias if bias is not None else qw.scale, out, out_n, k, codes.stride(0), qw.scale.stride(0), 1,
        HAS_OFF=qw.offset is not None, GROUP=group, HAS_BIAS=bias is not None, SILU=silu, ROWS=rows,
        BLOCK_N=block_n, BLOCK_G=bg, PREFETCH=prefetch, PDL=use_pdl, BITS=bits, num_warps=warps, launch_pdl=use_pdl,
    )
    return out
