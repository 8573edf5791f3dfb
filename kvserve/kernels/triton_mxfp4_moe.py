"""gpt-oss's MoE on the GPU with MXFP4 experts kept 4-bit (4.25 bits a weight).

Default (`fused_moe_mxfp4`, `GptOssMoE` on CUDA): at load each layer's experts are repacked once
on the device (`pack`, bit-exact) into an aligned layout: the E2M1 codes as int32 words
[E, rows, K / 8] (a 32-weight block = 4 words = one 16-byte vector, weight j of a block in
nibble j // 4 of word j % 4) and the E8M0 scales uint8 [E, rows, K / 32] beside them.

- **GEMV path** (decode: one token, or up to `GEMV_MAX_PAIRS` pairs mostly on distinct experts):
  no sorting, two launches (one more with a split down, one more with a DECODE 2 / 3 gate/up). Gate/up: one program per (token, expert) pair and BLOCK_N gate rows
  plus their BLOCK_N up rows; each K-step loads a [BLOCK_N, BLOCK_G, 4] word tile (16-byte
  loads, consecutive blocks of a row in consecutive threads), decodes each nibble with integer
  ops straight into float32 bits (`_fp4`: the value times 2^-126, exact, no lookup, no exp2),
  multiplies it with the activations pre-scaled by 2^100, sums each block in the thread that
  holds it and applies the block's scale once; biases and gpt-oss's clamped SwiGLU in the
  epilogue. Down: one program per token and BLOCK_N columns sums w_j (W_e_j h_j + b_e_j) over
  its k experts in fp32 (routing weight and top-k sum in the epilogue). Opt-in, a split down
  (the down config's SPLIT s >= 1, e.g. KVSERVE_MXFP4_GEMV_DOWN="32,16,4,1,2"): one program per
  (pair, K split) and BLOCK_N columns writes W_e_j h_j over its share of K in fp32 to scratch,
  k * s times the programs at one token, then a small kernel sums each token's partials in a
  fixed order (deterministic, no atomics) with the biases and routing weights as above and
  rounds once; equal to the sequential kernel up to the fp32 summation order. Not yet timed on
  a GPU, so SPLIT 0 (the sequential kernel) stays the default (`gemv_configs`).
  Opt-in, packed half math (a config's DECODE 2; 3 also loads the next K-step's codes and scales
  before this step's math, the first before the loop, registers double-buffered): the activations
  as fp16 pairs (`act_f16`, one small launch for x; for h the gate/up epilogue, `H_F16`, when the
  down's DECODE is 2 or 3): per 32-value block a power-of-two 2^c putting its largest magnitude in
  [2^14, 2^15), word j of the block's 16 = (x_j 2^c, x_{j+16} 2^c), i.e. the activations of
  nibbles I and I + 4 of code word w for j = 4 I + w, and 2^-c beside them in fp32. Each code
  word's nibble pairs decode into fp16x2 as `_fp4_pair` does (the E2M1 values times 2^-14, two
  shifts and two logic ops per two weights) and one `fma.rn.f16x2` multiplies two weights with
  their activations (`_hfma_block`, inline PTX: exact products, fp16 sums of 8 products, widened
  to fp32 once per 16 weights), then the block sum times 2^(s - 113) 2^-c in fp32. sm_90 K loop
  (`tests/gpu/mxfp4_sass.py`): 3.4 (DECODE 2) / 3.6 (3) instructions a weight against 5.0 for
  DECODE 1 (LOP3 1.0, shifts as IMAD.SHL 0.7-0.9 and SHF 0.2-0.3, HFMA2 0.5 a weight; no FFMA,
  no per-weight HADD2.F32), rel. error ≤ 4e-3 against the float64 reference in fp32 (the fp16
  activations, 2^-12 relative, and sums). With both configs' DECODE >= 2 the launches are
  programmatic dependent launches (`models/pdl.py`, `KVSERVE_PDL`): `_act_f16_kernel` waits for
  the kernel before it and only then lets gate/up launch, so the routing is final when gate/up
  and down read it and request their first codes before their own waits (DECODE 3: the first
  K-step's prefetch), the weight stream starting while the kernel before still runs; the
  fp32 configs launch as before. `benchmarks/gpt_oss_gpu_bench.py --gemv-f16` times
  `GEMV_F16_CANDIDATES` against the defaults at 1 and 4 tokens; since its first GPU run (NVIDIA
  H100, 2026-12-07: the MoE layer at one token 62.7 -> 35.7 µs) DECODE 3 with the down GEMV split
  in two is the default for 16-bit activations (`GEMV_DEFAULT_HALF`); fp32 activations keep
  DECODE 1 (`GEMV_DEFAULT_FP32`).
- **Grouped path** (prefill, larger batches): the pairs sorted by expert and padded per expert
  by `triton_moe.align_by_expert` (one program, no host sync); each BLOCK_M run of one expert's
  pairs times BLOCK_N of its rows, each K-step's word tile decoded into weights in K order (exact)
  for one tensor-core dot; gate and up in two accumulators with the SwiGLU epilogue, then down with
  bias and routing weight, and a sum over the k slots.

The packed kernels are the default (`KVSERVE_MXFP4_MOE=packed`) since their first GPU run (NVIDIA
H200, torch 2.11, triton 3.6, 2026-12-07, `benchmarks/gpt_oss_gpu_bench.py --compare-legacy`,
gpt-oss-20b shapes): one MoE layer 91.2 µs at 1 token against 308.8 for the legacy kernel
(3.39x), 145.9 against 550.6 at 4 (3.77x), 703.2 against 979.8 at 16 (1.39x), 1306.3 against
2776.2 at 256 (2.13x), rel diff 4.5e-3 between the two; engine batch-1 decode (24 layers, CUDA
graphs) 3.456 against 8.683 ms/token (29.2% against 11.6% of the 1.008 ms floor).
`KVSERVE_MXFP4_MOE=legacy` keeps the first kernel, `moe_mxfp4` below, on GGML's 17-byte blocks
[E, N, K / 32 * 17] (byte-wise loads, exp2 decode, a 16-row dot tile even for one pair, the
pairs sorted by ~12 torch ops), for comparisons (`gpt_oss_gpu_bench.py`'s kernel table and
`--compare-legacy`).

    moe_mxfp4(x, ids, weights, w_gate_up, b_gate_up, w_down, b_down, act) -> [T, hidden]
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch
import triton
import triton.language as tl

from kvserve.kernels import mxfp4
from kvserve.kernels.triton_moe import grouped_pid
from kvserve.kernels.triton_qgemv_half import _f16_pair, _nth
from kvserve.kernels.triton_quant import _PTX
from kvserve.models import pdl


@triton.jit
def _e2m1(c):
    """E2M1 codes (int32 in [0, 16)) -> float32 values."""
    ex = (c >> 1) & 3
    m = (c & 1).to(tl.float32)
    mag = tl.where(ex == 0, 0.5 * m, (1.0 + 0.5 * m) * tl.exp2((ex - 1).to(tl.float32)))
    return tl.where(c >= 8, -mag, mag)


@triton.jit(do_not_specialize=["num_pairs"])
def _moe_mxfp4_kernel(
    x_ptr,  # [R, K] activations
    x_row_ptr,  # [P] int32: row of x for sorted pair j
    w_ptr,  # [E, N, K / 32 * 17] uint8
    bias_ptr,  # [E, N]
    offs_ptr,  # [E + 1] int32: sorted pairs of expert e are [offs[e], offs[e + 1])
    out_ptr,  # [P, N]
    num_pairs,
    N,
    K: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_G: tl.constexpr,  # 32-value blocks per K-chunk
    DOT_PREC: tl.constexpr,
):
    e = tl.program_id(0)
    nt = tl.program_id(1)
    start = tl.load(offs_ptr + e)
    end = tl.load(offs_ptr + e + 1)
    if start == end:
        return
    G: tl.constexpr = K // 32
    RB: tl.constexpr = G * 17
    n = nt * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    w_rows = w_ptr + e.to(tl.int64) * N * RB + n.to(tl.int64)[:, None] * RB  # [BLOCK_N, 1]
    j16 = tl.arange(0, 16)
    bias = tl.load(bias_ptr + e.to(tl.int64) * N + n, mask=n_ok, other=0.0).to(tl.float32)
    for p0 in range(start, end, BLOCK_P):
        pj = p0 + tl.arange(0, BLOCK_P)
        p_ok = pj < end
        xr = tl.load(x_row_ptr + pj, mask=p_ok, other=0).to(tl.int64)
        acc = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
        for g0 in range(0, G, BLOCK_G):
            g = g0 + tl.arange(0, BLOCK_G)
            g_ok = g < G
            wb = w_rows + g[None, :] * 17  # [BLOCK_N, BLOCK_G]: each block's scale byte
            wm = n_ok[:, None] & g_ok[None, :]
            sc = tl.exp2(tl.load(wb, mask=wm, other=127).to(tl.float32) - 127.0)  # [BLOCK_N, BLOCK_G]
            qs = tl.load(wb[:, :, None] + 1 + j16[None, None, :], mask=wm[:, :, None], other=0).to(tl.int32)
            lo = (_e2m1(qs & 15) * sc[:, :, None]).to(x_ptr.dtype.element_ty)  # weights g*32 + j
            hi = (_e2m1(qs >> 4) * sc[:, :, None]).to(x_ptr.dtype.element_ty)  # weights g*32 + 16 + j
            xb = x_ptr + xr[:, None, None] * K + g[None, :, None] * 32 + j16[None, None, :]  # [BLOCK_P, BLOCK_G, 16]
            xm = p_ok[:, None, None] & g_ok[None, :, None]
            xlo = tl.load(xb, mask=xm, other=0.0)
            xhi = tl.load(xb + 16, mask=xm, other=0.0)
            acc += tl.dot(tl.reshape(xlo, [BLOCK_P, BLOCK_G * 16]), tl.trans(tl.reshape(lo, [BLOCK_N, BLOCK_G * 16])),
                          input_precision=DOT_PREC)
            acc += tl.dot(tl.reshape(xhi, [BLOCK_P, BLOCK_G * 16]), tl.trans(tl.reshape(hi, [BLOCK_N, BLOCK_G * 16])),
                          input_precision=DOT_PREC)
        acc += bias[None, :]
        o = out_ptr + pj.to(tl.int64)[:, None] * N + n[None, :]
        tl.store(o, acc.to(out_ptr.dtype.element_ty), mask=p_ok[:, None] & n_ok[None, :])


def grouped_mxfp4(
    x: torch.Tensor,  # [R, K]
    x_rows: torch.Tensor,  # [P] int32
    w: torch.Tensor,  # [E, N, K / 32 * 17] uint8
    bias: torch.Tensor,  # [E, N]
    offs: torch.Tensor,  # [E + 1] int32
    block_n: int = 64,
    block_g: int = 4,
) -> torch.Tensor:  # [P, N] in x's dtype
    e, n, rb = w.shape
    k = x.shape[1]
    if rb != mxfp4.row_bytes(k):
        raise ValueError(f"MXFP4 weight rows hold {rb} bytes; {k} inputs need {mxfp4.row_bytes(k)}")
    p = x_rows.shape[0]
    out = torch.empty(p, n, dtype=x.dtype, device=x.device)
    if p == 0:
        return out
    x = x.contiguous()
    _moe_mxfp4_kernel[(e, triton.cdiv(n, block_n))](
        x, x_rows, w, bias, offs, out, p, n,
        K=k, BLOCK_P=16, BLOCK_N=block_n, BLOCK_G=block_g,
        DOT_PREC="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=4,
    )
    return out


def moe_mxfp4(
    x: torch.Tensor,  # [T, hidden]
    ids: torch.Tensor,  # [T, k] selected experts
    weights: torch.Tensor,  # [T, k] their weights
    w_gate_up: torch.Tensor,  # [E, 2I, hidden / 32 * 17] uint8, rows [gate ‖ up]
    b_gate_up: torch.Tensor,  # [E, 2I]
    w_down: torch.Tensor,  # [E, hidden, I / 32 * 17] uint8
    b_down: torch.Tensor,  # [E, hidden]
    act: Callable[[torch.Tensor], torch.Tensor],  # [P, 2I] -> [P, I]
) -> torch.Tensor:  # [T, hidden]
    t, k = ids.shape
    num_experts = w_gate_up.shape[0]
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)  # pairs grouped by expert
    counts = torch.zeros(num_experts, dtype=torch.int32, device=x.device)
    counts.scatter_add_(0, flat.to(torch.int64), torch.ones_like(flat, dtype=torch.int32))
    offs = torch.zeros(num_experts + 1, dtype=torch.int32, device=x.device)
    offs[1:] = torch.cumsum(counts, 0)
    tok = (order // k).to(torch.int32)  # token row of each sorted pair
    h = act(grouped_mxfp4(x, tok, w_gate_up, b_gate_up, offs))  # [P, I]
    pair_rows = torch.arange(h.shape[0], dtype=torch.int32, device=x.device)
    y = grouped_mxfp4(h, pair_rows, w_down, b_down, offs)  # [P, hidden]
    y = y * weights.reshape(-1)[order, None].to(y.dtype)
    out = torch.empty_like(y)
    out[order] = y  # back to (token, slot) order
    return out.view(t, k, out.shape[1]).sum(dim=1)


# ------------------------------------------------------------------------------------------------
# The aligned layout and its kernels (KVSERVE_MXFP4_MOE=packed, the default: checked and timed on
# an NVIDIA H200, 2026-12-07, at 29.2% of the batch-1 decode floor; see the module docstring).
# ------------------------------------------------------------------------------------------------
# Which kernels `GptOssMoE` runs on CUDA: "packed" (the aligned layout below, the default) or
# "legacy" (the 17-byte blocks above: 11.6% of the decode floor on the same H200, 15.8% on an H100).
MOE_IMPL = os.environ.get("KVSERVE_MXFP4_MOE", "packed")
if MOE_IMPL not in ("packed", "legacy"):
    raise ValueError(f"KVSERVE_MXFP4_MOE must be 'packed' (the default) or 'legacy' (got {MOE_IMPL!r})")
# Tokens up to which the GEMV path runs (one token always; more while their k experts mostly
# differ: a shared expert is read once per pair there). KVSERVE_MXFP4_GEMV_MAX_PAIRS overrides.
try:
    GEMV_MAX_PAIRS = int(os.environ.get("KVSERVE_MXFP4_GEMV_MAX_PAIRS", "16"))
except ValueError:
    raise ValueError("KVSERVE_MXFP4_GEMV_MAX_PAIRS must be an integer "
                     f"(got {os.environ['KVSERVE_MXFP4_GEMV_MAX_PAIRS']!r})") from None

# Weight j of a 32-weight block sits in word j % 4, nibble j // 4 (see `pack`): byte b of the block
# (word b // 4, nibbles 2 (b % 4) and 2 (b % 4) + 1) holds weights _LO[b] and _LO[b] + 4.
_LO = [8 * (b % 4) + b // 4 for b in range(16)]


@dataclass
class PackedExperts:
    """One layer's MXFP4 experts in the aligned layout (`pack`): per projection the codes as
    int32 words [E, rows, K / 8] (8 E2M1 codes a word, a 32-weight block = 4 words = 16 bytes)
    and the E8M0 scales uint8 [E, rows, K / 32] beside them; 4.25 bits a weight as before.
    gate_up rows are [gate ‖ up] (2I of them), down rows the hidden size."""

    gu_codes: torch.Tensor  # [E, 2I, H / 8] int32
    gu_scales: torch.Tensor  # [E, 2I, H / 32] uint8
    gu_bias: torch.Tensor  # [E, 2I]
    dn_codes: torch.Tensor  # [E, H, I / 8] int32
    dn_scales: torch.Tensor  # [E, H, I / 32] uint8
    dn_bias: torch.Tensor  # [E, H]

    @property
    def hidden(self) -> int:
        return self.gu_codes.shape[2] * 8

    @property
    def inter(self) -> int:
        return self.dn_codes.shape[2] * 8


def pack(data: torch.Tensor, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GGML-layout MXFP4 bytes [..., rows, G * 17] -> (codes int32 [..., rows, cols / 8], scales
    uint8 [..., rows, G]), bit-exact and on `data`'s device. In the codes each block's 16 bytes
    are 4 little-endian words and weight j of the block is nibble j // 4 of word j % 4, so a
    thread that loads a block with one 16-byte load decodes nibble i of its 4 words against the
    4 consecutive activations 4 i .. 4 i + 3 of the block (one 8-byte load in bf16)."""
    g = mxfp4.row_bytes(cols) // mxfp4.BLOCK_BYTES
    b = data.reshape(*data.shape[:-1], g, mxfp4.BLOCK_BYTES)
    scales = b[..., 0].contiguous()
    qs = b[..., 1:]
    codes = torch.cat([qs & 15, qs >> 4], dim=-1)  # [..., G, 32]: code of weight j
    lo = torch.tensor(_LO, device=data.device)
    packed = codes.index_select(-1, lo) | (codes.index_select(-1, lo + 4) << 4)  # [..., G, 16]
    return packed.reshape(*data.shape[:-1], g * 16).contiguous().view(torch.int32), scales


def unpack(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack`: GGML-layout bytes [..., rows, G * 17]."""
    g = scales.shape[-1]
    packed = codes.contiguous().view(torch.uint8).reshape(*scales.shape, 16)
    codes32 = torch.empty(*scales.shape, 32, dtype=torch.uint8, device=codes.device)
    lo = torch.tensor(_LO, device=codes.device)
    codes32[..., lo] = packed & 15
    codes32[..., lo + 4] = packed >> 4
    qs = codes32[..., :16] | (codes32[..., 16:] << 4)
    return torch.cat([scales[..., None], qs], dim=-1).reshape(*scales.shape[:-1], g * 17)


def dequantize_packed(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[..., rows, K] weights of a packed projection (exact; for checks)."""
    data = unpack(codes, scales)
    rows = data.shape[-2]
    cols = codes.shape[-1] * 8
    return mxfp4.dequantize(data.reshape(-1, data.shape[-1]), cols, dtype).reshape(*data.shape[:-2], rows, cols)


@triton.jit
def _fp4(q, I: tl.constexpr):
    """Nibble I of int32 words q -> its E2M1 value times 2^-126, as float32: the sign moved to
    bit 31 and (e1 e0 m) to bits 24..22 give exactly that (exponent field e, mantissa m / 2; a
    subnormal for e = 0, which is the E2M1 subnormal too; the products with the activations'
    2^100 are normal again). Four integer ops a weight, all int32."""
    sign = (q >> (4 * I + 3)) << 31  # the nibble's top bit alone, at bit 31
    if 4 * I <= 22:
        mag = (q << (22 - 4 * I)) & 0x01C00000
    else:
        mag = (q >> (4 * I - 22)) & 0x01C00000
    return (sign | mag).to(tl.float32, bitcast=True)


@triton.jit
def _scale(s):
    """E8M0 bytes -> 2^(s - 101) in float32 (the block scale 2^(s - 127) times the 2^26 that the
    2^-126 of `_fp4` and the 2^100 of the activations leave)."""
    return ((s.to(tl.int32) + 26) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _scale_f16(s):
    """E8M0 bytes -> 2^(s - 113) in float32 for the fp16-pair decode: the block scale 2^(s - 127)
    times the 2^14 that `_fp4_pair`'s values lack (exact, normal for every byte up to 240)."""
    return ((s.to(tl.int32) + 14) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _fp4_pair(q, I: tl.constexpr):
    """Nibbles I and I + 4 of int32 words q (bits 4I and 4I + 16) -> their E2M1 values times
    2^-14 as two float32: both made fp16 at once (sign to bit 15 / 31, (e1 e0 m) to the exponent's
    low bits and the mantissa's top bit: exact, a subnormal fp16 for e = 0), then each half
    widened (`triton_qgemv_half._f16_pair`: a full-rate HADD2.F32 on the GPU). Two shifts and two
    logic ops per two weights, against `_fp4`'s four per weight."""
    if I == 3:  # the signs are in place already
        bits = (q & -2147450880) | ((q >> 3) & 0x0E000E00)  # 0x80008000, 0x0E000E00
    else:
        bits = ((q << (12 - 4 * I)) & -2147450880) | ((q << (9 - 4 * I)) & 0x0E000E00)
    return _f16_pair(bits, 0)


def _hfma_block_asm() -> str:
    """PTX for `_hfma_block` (pack 4: $0..$3 the outputs, $4..$7 the block's 4 code words,
    $8 + 4 I + w the activation pair of nibble I of word w): each nibble pair decoded into an
    fp16x2 as `_fp4_pair` does, 16 `fma.rn.f16x2` into two fp16x2 accumulators (words 0-1 and
    2-3: 8 products a half each), the four halves widened to fp32 and summed into $0; $1..$3
    -0.0 (the identity of the fp32 sum over the words that follows)."""
    lines = [".reg .b32 rta, rtb, rtt, rtu;", ".reg .b16 rtl, rth;", ".reg .f32 rtf, rtg;"]
    for w in range(4):
        acc = "rta" if w < 2 else "rtb"
        for i in range(4):
            q, xp = f"${4 + w}", f"${8 + 4 * i + w}"
            if i == 3:
                lines += [f"and.b32 rtt, {q}, 0x80008000;", f"shr.u32 rtu, {q}, 3;"]
            else:
                lines += [f"shl.b32 rtt, {q}, {12 - 4 * i};", "and.b32 rtt, rtt, 0x80008000;",
                          f"shl.b32 rtu, {q}, {9 - 4 * i};"]
            lines += ["and.b32 rtu, rtu, 0x0E000E00;", "or.b32 rtt, rtt, rtu;"]
            if w % 2 == 0 and i == 0:  # an accumulator's first product
                lines.append(f"mul.rn.f16x2 {acc}, rtt, {xp};")
            else:
                lines.append(f"fma.rn.f16x2 {acc}, rtt, {xp}, {acc};")
    lines += ["mov.b32 {rtl, rth}, rta;", "cvt.f32.f16 rtf, rtl;", "cvt.f32.f16 rtg, rth;", "add.f32 rtf, rtf, rtg;",
              "mov.b32 {rtl, rth}, rtb;", "cvt.f32.f16 rtg, rtl;", "add.f32 rtf, rtf, rtg;", "cvt.f32.f16 rtg, rth;",
              "add.f32 rtf, rtf, rtg;", "mov.b32 $0, rtf;", "mov.b32 $1, 0x80000000;", "mov.b32 $2, 0x80000000;",
              "mov.b32 $3, 0x80000000;"]
    return "{ " + " ".join(lines) + " }"


_HFMA_BLOCK_ASM = tl.constexpr(_hfma_block_asm())
_HFMA_CONSTRAINTS = tl.constexpr("=r,=r,=r,=r," + ",".join(["r"] * 20))


@triton.jit
def _hfma_block(q, x0, x1, x2, x3):
    """DECODE >= 2: [BLOCK_N, BLOCK_G, 4] code words (a 32-weight block in the last axis, in one
    thread) against the activation pairs x_I [BLOCK_G, 4] (`_act_f16`: word w of x_I holds the
    scaled fp16 activations of nibbles I and I + 4 of code word w) -> fp32 [BLOCK_N, BLOCK_G, 4]
    whose sum over the last axis is the block's dot product times 2^-14 (the `_fp4_pair` values)
    times the activations' block scale: packed half math (`fma.rn.f16x2`, two weights an
    instruction, exact products, fp16 sums of 8 products), widened once per 16 weights. The
    interpreter, which runs no PTX, takes the same sum in fp32 per word."""
    if _PTX:
        return tl.inline_asm_elementwise(_HFMA_BLOCK_ASM, _HFMA_CONSTRAINTS,
                                         [q, x0, x1, x2, x3], dtype=tl.float32, is_pure=True, pack=4)
    else:
        blk = tl.zeros(q.shape, dtype=tl.float32)
        for i in tl.static_range(4):
            a, b = _fp4_pair(q, i)
            xa, xb = _f16_pair(_nth(i, x0, x1, x2, x3), 0)
            blk += a * xa + b * xb
        return blk


@triton.jit
def _f16_blocks(lo, hi):
    """Activations [NB, 16] (lo: values 0..15 of each 32-value block, hi: values 16..31), already
    rounded to the model dtype -> (int32 [NB, 16] pairs: word j = fp16(lo_j 2^c) | fp16(hi_j 2^c)
    << 16, float32 [NB] 2^-c), c per block from its largest magnitude m (2^14 <= m 2^c < 2^15 where
    m is normal; the products with `_fp4_pair`'s values times 2^-14 stay below 12, a word's sums
    below 200). A bf16 value is exact in fp16 at that scale down to 2^-14 of the block's largest."""
    m = tl.maximum(tl.max(tl.abs(lo), 1), tl.max(tl.abs(hi), 1))
    e = ((m.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127  # floor(log2 m); -127 for 0 and subnormals
    c = tl.minimum(14 - e, 100)
    up = ((c + 127) << 23).to(tl.float32, bitcast=True)
    down = ((127 - c) << 23).to(tl.float32, bitcast=True)
    a = (lo * up[:, None]).to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    b = (hi * up[:, None]).to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) << 16
    return a | b, down


@triton.jit
def _act_f16_kernel(
    x_ptr,  # [T, K] activations
    xh_ptr,  # [T, K / 2] int32: the fp16 pairs (`_f16_blocks`)
    xs_ptr,  # [T, K / 32] float32: each block's 2^-c
    stride_x,
    G,  # K / 32
    BLOCK_G: tl.constexpr,
    PDL: tl.constexpr,
):
    """The activations of the DECODE >= 2 GEMVs: one token and BLOCK_G 32-value blocks. With PDL
    it lets the gate/up kernel launch only after its own wait, so the routing that kernel reads
    before its wait is final by then (as `triton_moe_decode`'s gate/up does for its down)."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    tok = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    g_ok = g < G
    j = tl.arange(0, 16)
    xo = x_ptr + tok * stride_x + (g * 32)[:, None] + j[None, :]
    lo = tl.load(xo, mask=g_ok[:, None], other=0.0).to(tl.float32)
    hi = tl.load(xo + 16, mask=g_ok[:, None], other=0.0).to(tl.float32)
    pairs, down = _f16_blocks(lo, hi)
    tl.store(xh_ptr + tok * (G * 16) + (g * 16)[:, None] + j[None, :], pairs, mask=g_ok[:, None])
    tl.store(xs_ptr + tok * G + g, down, mask=g_ok)


def act_f16(x: torch.Tensor, use_pdl: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, K] activations -> the DECODE >= 2 GEMVs' input: (int32 [T, K / 2] fp16 pairs, float32
    [T, K / 32] block scales), see `_f16_blocks`."""
    t, k = x.shape
    if k % 32:
        raise ValueError(f"activations of width {k}: the MXFP4 GEMV needs a multiple of 32")
    xh = torch.empty((t, k // 2), dtype=torch.int32, device=x.device)
    xs = torch.empty((t, k // 32), dtype=torch.float32, device=x.device)
    if t:
        _act_f16_kernel[(t, triton.cdiv(k // 32, 16))](x, xh, xs, x.stride(0), k // 32, BLOCK_G=16, PDL=use_pdl,
                                                       num_warps=4, launch_pdl=use_pdl)
    return xh, xs


@triton.jit
def _swiglu(g, u, alpha, limit, dt: tl.constexpr):
    """gpt-oss's clamped SwiGLU of the fp32 sums; gate and up rounded to the model dtype first
    (where the unfused path rounds its product's output)."""
    g = tl.minimum(g.to(dt).to(tl.float32), limit)
    u = tl.minimum(tl.maximum(u.to(dt).to(tl.float32), -limit), limit)
    return (u + 1.0) * (g * tl.sigmoid(g * alpha))


@triton.jit
def _gemv_rows(x_row, xs_row, codes, scales, n, n_ok, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
               TWO: tl.constexpr, codes2, scales2, DECODE: tl.constexpr, s_step, g_base, NG: tl.constexpr,
               WAIT: tl.constexpr = False):
    """`_gemv_rows_f32` (DECODE 0 and 1: x_row the activations in the model dtype) or
    `_gemv_rows_f16` (DECODE 2 and 3: x_row the fp16 pairs and xs_row the block scales of
    `act_f16` / the gate/up kernel's H_F16 epilogue). WAIT (DECODE >= 2 only): the PDL wait,
    after the first K-step's codes and scales are requested where DECODE 3 prefetches them."""
    if DECODE >= 2:
        r1, r2 = _gemv_rows_f16(x_row, xs_row, codes, scales, n, n_ok, K, BLOCK_N, BLOCK_G, TWO, codes2, scales2,
                                DECODE == 3, s_step, g_base, NG, WAIT)
    else:
        r1, r2 = _gemv_rows_f32(x_row, codes, scales, n, n_ok, K, BLOCK_N, BLOCK_G, TWO, codes2, scales2, DECODE,
                                s_step, g_base, NG)
    return r1, r2


@triton.jit
def _gemv_rows_f16(xh_row, xs_row, codes, scales, n, n_ok, K: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_G: tl.constexpr, TWO: tl.constexpr, codes2, scales2, PREFETCH: tl.constexpr, s_step, g_base,
                   NG: tl.constexpr, WAIT: tl.constexpr):
    """`_gemv_rows_f32`'s sums with packed half math (DECODE 2; 3 adds PREFETCH): the same
    [BLOCK_N, BLOCK_G, 4] word tiles, each block's 32 weights decoded in pairs and multiplied with
    the fp16 activation pairs two at a time (`_hfma_block`), then the block's sum times its weight
    scale and its activation scale in fp32. PREFETCH: the next K-step's words and scales are
    loaded before this one's math (registers double-buffered; the loads stay in flight during it),
    the first before the loop."""
    G: tl.constexpr = K // 32
    W: tl.constexpr = K // 8
    w4 = tl.arange(0, 4)
    woff = n.to(tl.int64)[:, None, None] * W
    soff = n.to(tl.int64)[:, None] * G
    acc = tl.zeros([BLOCK_N, BLOCK_G], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_N, BLOCK_G], dtype=tl.float32)
    g_end = g_base + NG
    if PREFETCH:
        g = g_base + tl.arange(0, BLOCK_G)
        g_ok = (g < G) & (g < g_end)
        qmask = n_ok[:, None, None] & g_ok[None, :, None]
        qoff = woff + (g * 4)[None, :, None] + w4[None, None, :]
        q_n = tl.load(codes + qoff, mask=qmask, other=0, eviction_policy="evict_first")
        s_n = tl.load(scales + soff + (g * s_step)[None, :], mask=n_ok[:, None] & g_ok[None, :], other=0)
        if TWO:
            q2_n = tl.load(codes2 + qoff, mask=qmask, other=0, eviction_policy="evict_first")
            s2_n = tl.load(scales2 + soff + (g * s_step)[None, :], mask=n_ok[:, None] & g_ok[None, :], other=0)
        else:
            q2_n = q_n
            s2_n = s_n
    pdl.wait(WAIT)  # (no-op without PDL) the codes above may stream during the kernel before
    for g0 in range(0, NG, BLOCK_G):
        g = g_base + g0 + tl.arange(0, BLOCK_G)
        g_ok = g < G
        smask = n_ok[:, None] & g_ok[None, :]
        sg = (g * s_step)[None, :]
        if PREFETCH:
            q = q_n
            s1 = s_n
            q2 = q2_n
            s2 = s2_n
            gn = g + BLOCK_G
            gn_ok = (gn < G) & (gn < g_end)
            qmask = n_ok[:, None, None] & gn_ok[None, :, None]
            qoff = woff + (gn * 4)[None, :, None] + w4[None, None, :]
            q_n = tl.load(codes + qoff, mask=qmask, other=0, eviction_policy="evict_first")
            s_n = tl.load(scales + soff + (gn * s_step)[None, :], mask=n_ok[:, None] & gn_ok[None, :], other=0)
            if TWO:
                q2_n = tl.load(codes2 + qoff, mask=qmask, other=0, eviction_policy="evict_first")
                s2_n = tl.load(scales2 + soff + (gn * s_step)[None, :], mask=n_ok[:, None] & gn_ok[None, :], other=0)
        else:
            qoff = woff + (g * 4)[None, :, None] + w4[None, None, :]
            qmask = n_ok[:, None, None] & g_ok[None, :, None]
            q = tl.load(codes + qoff, mask=qmask, other=0, eviction_policy="evict_first")
            s1 = tl.load(scales + soff + sg, mask=smask, other=0)
            if TWO:
                q2 = tl.load(codes2 + qoff, mask=qmask, other=0, eviction_policy="evict_first")
                s2 = tl.load(scales2 + soff + sg, mask=smask, other=0)
        xo = xh_row + (g * 16)[:, None] + w4[None, :]
        x0 = tl.load(xo, mask=g_ok[:, None], other=0)[None, :, :]  # [1, BLOCK_G, 4] pairs of nibbles 0 and 4
        x1 = tl.load(xo + 4, mask=g_ok[:, None], other=0)[None, :, :]
        x2 = tl.load(xo + 8, mask=g_ok[:, None], other=0)[None, :, :]
        x3 = tl.load(xo + 12, mask=g_ok[:, None], other=0)[None, :, :]
        xs = tl.load(xs_row + g, mask=g_ok, other=0.0)[None, :]
        acc += tl.sum(_hfma_block(q, x0, x1, x2, x3), 2) * (_scale_f16(s1) * xs)
        if TWO:
            acc2 += tl.sum(_hfma_block(q2, x0, x1, x2, x3), 2) * (_scale_f16(s2) * xs)
    return tl.sum(acc, 1), tl.sum(acc2, 1)


@triton.jit
def _gemv_rows_f32(x_row, codes, scales, n, n_ok, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
                   TWO: tl.constexpr, codes2, scales2, DECODE: tl.constexpr, s_step, g_base, NG: tl.constexpr):
    """sum_k W[n, k] x[k] for BLOCK_N rows of one expert (fp32 [BLOCK_N]; `TWO`: also for the rows
    at codes2/scales2, the up rows beside the gate rows, sharing the activations) over the NG
    32-weight blocks from block g_base on (0 and K / 32: the whole row; blocks past K / 32 are
    masked): each K-step loads a [BLOCK_N, BLOCK_G, 4] tile of words (one 16-byte vector per row
    and block), decodes its 8 nibbles against 8 [BLOCK_G, 4] slices of x (DECODE 0: pre-scaled by
    2^100), sums each block in the thread that holds it, then applies the block's scale once.
    DECODE 0: each nibble straight to float32 bits (`_fp4`); 1: two nibbles at once through fp16
    (`_fp4_pair`)."""
    G: tl.constexpr = K // 32
    W: tl.constexpr = K // 8
    w4 = tl.arange(0, 4)
    woff = n.to(tl.int64)[:, None, None] * W
    soff = n.to(tl.int64)[:, None] * G
    acc = tl.zeros([BLOCK_N, BLOCK_G], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_N, BLOCK_G], dtype=tl.float32)
    for g0 in range(0, NG, BLOCK_G):
        g = g_base + g0 + tl.arange(0, BLOCK_G)
        g_ok = g < G
        qoff = woff + (g * 4)[None, :, None] + w4[None, None, :]
        qmask = n_ok[:, None, None] & g_ok[None, :, None]
        q = tl.load(codes + qoff, mask=qmask, other=0, eviction_policy="evict_first")
        blk = tl.zeros([BLOCK_N, BLOCK_G, 4], dtype=tl.float32)
        if TWO:
            q2 = tl.load(codes2 + qoff, mask=qmask, other=0, eviction_policy="evict_first")
            blk2 = tl.zeros([BLOCK_N, BLOCK_G, 4], dtype=tl.float32)
        if DECODE == 0:
            for i in tl.static_range(8):
                xi = tl.load(x_row + (g * 32 + 4 * i)[:, None] + w4[None, :], mask=g_ok[:, None], other=0.0)
                xi = (xi.to(tl.float32) * 1.2676506002282294e30)[None, :, :]  # x * 2^100
                blk += _fp4(q, i) * xi
                if TWO:
                    blk2 += _fp4(q2, i) * xi
        else:
            for i in tl.static_range(4):
                xo = x_row + (g * 32 + 4 * i)[:, None] + w4[None, :]
                xa = tl.load(xo, mask=g_ok[:, None], other=0.0).to(tl.float32)[None, :, :]
                xb = tl.load(xo + 16, mask=g_ok[:, None], other=0.0).to(tl.float32)[None, :, :]
                a, b = _fp4_pair(q, i)  # values times 2^-14 (`_scale_f16` puts it back per block)
                blk += a * xa  # two FMAs (a * xa + b * xb would round the product sum first)
                blk += b * xb
                if TWO:
                    a2, b2 = _fp4_pair(q2, i)
                    blk2 += a2 * xa
                    blk2 += b2 * xb
        smask = n_ok[:, None] & g_ok[None, :]
        # s_step is 1 at run time, unknown to the compiler: no vectorized scale load, so the scale tile
        # keeps the layout of the block sums (a 2-byte vector load would convert through shared memory)
        sg = (g * s_step)[None, :]
        s1 = tl.load(scales + soff + sg, mask=smask, other=0)
        if DECODE == 0:
            acc += tl.sum(blk, 2) * _scale(s1)
        else:
            acc += tl.sum(blk, 2) * _scale_f16(s1)
        if TWO:
            s2 = tl.load(scales2 + soff + sg, mask=smask, other=0)
            if DECODE == 0:
                acc2 += tl.sum(blk2, 2) * _scale(s2)
            else:
                acc2 += tl.sum(blk2, 2) * _scale_f16(s2)
    return tl.sum(acc, 1), tl.sum(acc2, 1)


@triton.jit(do_not_specialize=["s_step"])
def _gemv_gate_up_kernel(
    x_ptr,  # [T, H]; DECODE >= 2: int32 [T, H / 2] fp16 pairs (`act_f16`)
    xs_ptr,  # DECODE >= 2: float32 [T, H / 32] their block scales (else unused)
    codes_ptr,  # [E, 2I, H / 8] int32
    scales_ptr,  # [E, 2I, H / 32] uint8
    bias_ptr,  # [E, 2I] (in the model dtype, which H_F16 rounds the activation to)
    ids_ptr,  # [T * TOP_K] expert of each pair
    out_ptr,  # [T * TOP_K, I]: the activation of each pair; H_F16: int32 [T * TOP_K, I / 2] fp16 pairs
    outs_ptr,  # H_F16: float32 [T * TOP_K, I / 32] their block scales (else unused)
    I,
    stride_x,
    alpha,
    limit,
    s_step,  # 1 (see `_gemv_rows`)
    K: tl.constexpr,  # H
    TOP_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_G: tl.constexpr,
    DECODE: tl.constexpr,
    H_F16: tl.constexpr,  # write the activation as a DECODE >= 2 down GEMV reads it (BLOCK_N % 32 == 0)
    PDL: tl.constexpr = False,  # DECODE >= 2 only: launched after `_act_f16_kernel`'s wait (see there)
):
    """One (token, expert) pair and BLOCK_N gate rows with their BLOCK_N up rows; the biases and
    the clamped SwiGLU in the epilogue."""
    pair = tl.program_id(0)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < I
    e = tl.load(ids_ptr + pair).to(tl.int64)
    tok = (pair // TOP_K).to(tl.int64)
    x_row = x_ptr + tok * stride_x
    W: tl.constexpr = K // 8
    G: tl.constexpr = K // 32
    codes = codes_ptr + e * (2 * I) * W
    scales = scales_ptr + e * (2 * I) * G
    gate, up = _gemv_rows(x_row, xs_ptr + tok * G, codes, scales, n, n_ok, K, BLOCK_N, BLOCK_G, True, codes + I * W,
                          scales + I * G, DECODE, s_step, 0, G, PDL)
    gate += tl.load(bias_ptr + e * (2 * I) + n, mask=n_ok, other=0.0).to(tl.float32)
    up += tl.load(bias_ptr + e * (2 * I) + I + n, mask=n_ok, other=0.0).to(tl.float32)
    dt = bias_ptr.dtype.element_ty
    h = _swiglu(gate, up, alpha, limit, dt)
    if H_F16:
        # BLOCK_N / 32 whole blocks of the down GEMV's K (I % 32 == 0): lo / hi = values 0..15 / 16..31
        NB: tl.constexpr = BLOCK_N // 32
        lo, hi = tl.split(tl.permute(tl.reshape(h.to(dt).to(tl.float32), [NB, 2, 16]), (0, 2, 1)))
        pairs, down = _f16_blocks(lo, hi)
        b = tl.program_id(1) * NB + tl.arange(0, NB)
        b_ok = b * 32 < I
        j = tl.arange(0, 16)
        tl.store(out_ptr + pair.to(tl.int64) * (I // 2) + (b * 16)[:, None] + j[None, :], pairs, mask=b_ok[:, None])
        tl.store(outs_ptr + pair.to(tl.int64) * (I // 32) + b, down, mask=b_ok)
    else:
        tl.store(out_ptr + pair.to(tl.int64) * I + n, h.to(dt), mask=n_ok)


@triton.jit(do_not_specialize=["s_step"])
def _gemv_down_kernel(
    h_ptr,  # [T * TOP_K, I]; DECODE >= 2: int32 [T * TOP_K, I / 2] fp16 pairs (the gate/up kernel's H_F16)
    hs_ptr,  # DECODE >= 2: float32 [T * TOP_K, I / 32] their block scales (else unused)
    codes_ptr,  # [E, H, I / 8] int32
    scales_ptr,  # [E, H, I / 32] uint8
    bias_ptr,  # [E, H]
    ids_ptr,  # [T * TOP_K]
    wts_ptr,  # [T * TOP_K] routing weights
    out_ptr,  # [T, H]
    N,  # H
    stride_o,
    s_step,  # 1 (see `_gemv_rows`)
    K: tl.constexpr,  # I
    TOP_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_G: tl.constexpr,
    DECODE: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """One token and BLOCK_N output columns: sum_j w_j (W_down[e_j] h_j + b_down[e_j]) over its k
    pairs, in fp32, rounded once. PDL (DECODE >= 2 only): the first pair's first codes are
    requested before the wait (the routing is final: see `_act_f16_kernel`)."""
    tok = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    W: tl.constexpr = K // 8
    G: tl.constexpr = K // 32
    out = tl.zeros([BLOCK_N], dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        pair = tok * TOP_K + j
        e = tl.load(ids_ptr + pair).to(tl.int64)
        codes = codes_ptr + e * N * W
        scales = scales_ptr + e * N * G
        y, _ = _gemv_rows(h_ptr + pair * (K // 2 if DECODE >= 2 else K), hs_ptr + pair * G, codes, scales, n, n_ok, K,
                          BLOCK_N, BLOCK_G, False, codes, scales, DECODE, s_step, 0, G, PDL and j == 0)
        y += tl.load(bias_ptr + e * N + n, mask=n_ok, other=0.0).to(tl.float32)
        out += tl.load(wts_ptr + pair).to(tl.float32) * y
    tl.store(out_ptr + tok * stride_o + n, out.to(out_ptr.dtype.element_ty), mask=n_ok)


@triton.jit(do_not_specialize=["s_step"])
def _gemv_down_split_kernel(
    h_ptr,  # [T * TOP_K, I]; DECODE >= 2: int32 [T * TOP_K, I / 2] fp16 pairs (the gate/up kernel's H_F16)
    hs_ptr,  # DECODE >= 2: float32 [T * TOP_K, I / 32] their block scales (else unused)
    codes_ptr,  # [E, H, I / 8] int32
    scales_ptr,  # [E, H, I / 32] uint8
    ids_ptr,  # [T * TOP_K]
    part_ptr,  # [T * TOP_K * SPLIT, H] float32: the partial sums
    N,  # H
    s_step,  # 1 (see `_gemv_rows`)
    K: tl.constexpr,  # I
    SPLIT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_G: tl.constexpr,
    DECODE: tl.constexpr,
    PDL: tl.constexpr = False,  # DECODE >= 2 only, as `_gemv_down_kernel`
):
    """The down GEMV spread over the pairs and K (KVSERVE_MXFP4_GEMV_DOWN's SPLIT >= 1): one
    (pair, K split) and BLOCK_N columns, W_down[e] h over the split's blocks into fp32 scratch;
    `_down_reduce_kernel` sums them. One token gets TOP_K * SPLIT times the sequential kernel's
    programs, each streaming one expert's share of the rows."""
    pid = tl.program_id(0)
    pair = (pid // SPLIT).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    W: tl.constexpr = K // 8
    G: tl.constexpr = K // 32
    NG: tl.constexpr = ((G + SPLIT - 1) // SPLIT + BLOCK_G - 1) // BLOCK_G * BLOCK_G  # blocks a split, whole K-steps
    e = tl.load(ids_ptr + pair).to(tl.int64)
    codes = codes_ptr + e * N * W
    scales = scales_ptr + e * N * G
    y, _ = _gemv_rows(h_ptr + pair * (K // 2 if DECODE >= 2 else K), hs_ptr + pair * G, codes, scales, n, n_ok, K,
                      BLOCK_N, BLOCK_G, False, codes, scales, DECODE, s_step, (pid % SPLIT) * NG, NG, PDL)
    tl.store(part_ptr + pid.to(tl.int64) * N + n, y, mask=n_ok)


@triton.jit
def _down_reduce_kernel(
    part_ptr,  # [T * TOP_K * SPLIT, H] float32 (`_gemv_down_split_kernel`)
    bias_ptr,  # [E, H]
    ids_ptr,  # [T * TOP_K]
    wts_ptr,  # [T * TOP_K] routing weights
    out_ptr,  # [T, H]
    N,  # H
    stride_o,
    TOP_K: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """One token and BLOCK columns: sum_j w_j (sum_s part[j, s] + b_down[e_j]) in fp32, the
    splits and then the pairs in a fixed order (the bits never depend on scheduling), bias and
    routing weight as `_gemv_down_kernel` applies them, rounded once."""
    pdl.wait(PDL)
    tok = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    n_ok = n < N
    out = tl.zeros([BLOCK], dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        pair = tok * TOP_K + j
        e = tl.load(ids_ptr + pair).to(tl.int64)
        y = tl.load(part_ptr + (pair * SPLIT) * N + n, mask=n_ok, other=0.0)
        for s in tl.static_range(1, SPLIT):
            y += tl.load(part_ptr + (pair * SPLIT + s) * N + n, mask=n_ok, other=0.0)
        y += tl.load(bias_ptr + e * N + n, mask=n_ok, other=0.0).to(tl.float32)
        out += tl.load(wts_ptr + pair).to(tl.float32) * y
    tl.store(out_ptr + tok * stride_o + n, out.to(out_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _dot_tile(a_rows, a_ok, codes, scales, n, n_ok, acc, K: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, DOT_PREC: tl.constexpr):
    """acc [BLOCK_M, BLOCK_N] += A rows [BLOCK_M, K] times one expert's BLOCK_N rows transposed,
    BLOCK_G blocks a K-step: the [BLOCK_N, BLOCK_G, 4] word tile broadcast over the 8 nibble
    positions ([BLOCK_N, BLOCK_G, 8, 4]: weight 4 i + w of each block, i.e. K order), decoded as
    in `_fp4` with per-position shifts, scaled (exact in any float dtype) and multiplied on tensor
    cores with the matching [BLOCK_M, BLOCK_G * 32] activations in one dot."""
    G: tl.constexpr = K // 32
    W: tl.constexpr = K // 8
    w4 = tl.arange(0, 4)
    shift = (4 * tl.arange(0, 8))[None, None, :, None]
    kk = tl.arange(0, BLOCK_G * 32)
    rows = codes + n.to(tl.int64)[:, None, None] * W
    srows = scales + n.to(tl.int64)[:, None] * G
    dt = a_rows.dtype.element_ty
    for g0 in range(0, G, BLOCK_G):
        g = g0 + tl.arange(0, BLOCK_G)
        g_ok = g < G
        q = tl.load(rows + (g * 4)[None, :, None] + w4[None, None, :], mask=n_ok[:, None, None] & g_ok[None, :, None],
                    other=0)
        s = _scale(tl.load(srows + g[None, :], mask=n_ok[:, None] & g_ok[None, :], other=0))
        qq = q[:, :, None, :] >> shift  # [BLOCK_N, BLOCK_G, 8, 4]: nibble i in bits 0..3
        bits = ((qq >> 3) << 31) | ((qq << 22) & 0x01C00000)
        w = (bits.to(tl.float32, bitcast=True) * 1.2676506002282294e30) * s[:, :, None, None]  # the weights, exact
        w = tl.reshape(w.to(dt), [BLOCK_N, BLOCK_G * 32])
        k_ok = g0 * 32 + kk < K
        a = tl.load(a_rows + g0 * 32 + kk[None, :], mask=a_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(a, tl.trans(w), acc, input_precision=DOT_PREC)
    return acc


@triton.jit
def _grouped_kernel(
    a_ptr,  # gate/up: x [T, H]; down: h [T * TOP_K, I]
    codes_ptr,  # [E, R, K / 8] int32 (R = 2I for gate/up, H for down)
    scales_ptr,  # [E, R, K / 32] uint8
    bias_ptr,  # [E, R]
    out_ptr,  # [T * TOP_K, N]
    sorted_ptr,  # [P] pair ids sorted by expert, padding = num_pairs (`triton_moe.align_by_expert`)
    block_expert_ptr,  # [P / BLOCK_M]
    num_post_ptr,  # [1] padded total
    wts_ptr,  # [T * TOP_K] routing weights (down)
    N,  # I for gate/up, H for down
    num_pairs,
    num_blocks,
    stride_a,
    alpha,
    limit,
    K: tl.constexpr,
    A_ROW_DIV: tl.constexpr,  # TOP_K for x, 1 for h
    GATE_UP: tl.constexpr,  # gate and up accumulators, SwiGLU epilogue; else bias and weight
    DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_G: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """Many tokens: BLOCK_M pairs of one expert (sorted, padded) times BLOCK_N of its rows."""
    pid_m, pid_n = grouped_pid(tl.program_id(0), N, num_blocks, BLOCK_N, GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_post_ptr):
        return
    pairs = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    m_ok = pairs < num_pairs
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    W: tl.constexpr = K // 8
    G: tl.constexpr = K // 32
    if GATE_UP:
        R = 2 * N
    else:
        R = N
    codes = codes_ptr + e * R * W
    scales = scales_ptr + e * R * G
    a_rows = a_ptr + (pairs // A_ROW_DIV).to(tl.int64)[:, None] * stride_a
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc = _dot_tile(a_rows, m_ok, codes, scales, n, n_ok, acc, K, BLOCK_M, BLOCK_N, BLOCK_G, DOT_PREC)
    acc += tl.load(bias_ptr + e * R + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    dt = out_ptr.dtype.element_ty
    if GATE_UP:
        up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        up = _dot_tile(a_rows, m_ok, codes + N * W, scales + N * G, n, n_ok, up, K, BLOCK_M, BLOCK_N, BLOCK_G, DOT_PREC)
        up += tl.load(bias_ptr + e * R + N + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        acc = _swiglu(acc, up, alpha, limit, dt)
    else:
        acc = acc * tl.load(wts_ptr + pairs, mask=m_ok, other=0.0).to(tl.float32)[:, None]
    out = out_ptr + pairs.to(tl.int64)[:, None] * N + n[None, :]
    tl.store(out, acc.to(dt), mask=m_ok[:, None] & n_ok[None, :])


def use_gemv(tokens: int, num_experts: int, top_k: int) -> bool:
    """The GEMV path for one token, or while the pairs are few and mostly on distinct experts."""
    n = tokens * top_k
    return tokens == 1 or (n <= GEMV_MAX_PAIRS and 2 * n <= num_experts)


def _env_config(name: str, default: tuple[int, ...], lengths: tuple[int, ...] | None = None) -> tuple[int, ...]:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        cfg = tuple(int(v) for v in raw.split(","))
    except ValueError:
        raise ValueError(f"{name} must be comma-separated integers (got {raw!r})") from None
    lengths = lengths or (len(default),)
    if len(cfg) not in lengths:
        raise ValueError(f"{name} needs {' or '.join(map(str, lengths))} values (got {raw!r})")
    return cfg


GemvConfig = tuple[int, int, int, int]  # (BLOCK_N, BLOCK_G, num_warps, DECODE)
DownConfig = tuple[int, int, int, int, int]  # (BLOCK_N, BLOCK_G, num_warps, DECODE, SPLIT)
DOWN_REDUCE_BLOCK = 256  # columns a program of `_down_reduce_kernel`
# Split down configs that `benchmarks/gpt_oss_gpu_bench.py` times beside the default at one token
# (gpt-oss-20b: 4 pairs x SPLIT x 2880 / BLOCK_N programs, 360 to 1440 against the sequential
# kernel's 90) and `tests/gpu/mxfp4_sass.py` compiles for sm_90.
DOWN_SPLIT_CANDIDATES: tuple[DownConfig, ...] = ((32, 16, 4, 1, 1), (16, 16, 4, 1, 1), (32, 16, 4, 1, 2), (32, 8, 4, 1, 4))


# `_gemv_rows`: fp32 math (0: nibbles one at a time, 1: in pairs), 2: fp16x2 math, 3: 2 + prefetch
DECODES = (0, 1, 2, 3)
# Packed-half-math configs (DECODE 2 / 3) that `benchmarks/gpt_oss_gpu_bench.py --gemv-f16` times against
# the defaults at 1 and 4 tokens, each as (gate/up, down) (the down's DECODE >= 2 makes the gate/up
# kernel write its activation as fp16 pairs: gate/up BLOCK_N a multiple of 32), and
# `tests/gpu/mxfp4_sass.py` compiles for sm_90.
GEMV_F16_CANDIDATES: tuple[tuple[GemvConfig, DownConfig], ...] = (
    ((32, 8, 4, 2), (32, 16, 4, 1, 0)),  # gate/up alone
    ((32, 8, 4, 3), (32, 16, 4, 1, 0)),
    ((16, 8, 4, 3), (32, 16, 4, 1, 0)),  # (twice the gate/up programs)
    ((32, 8, 4, 3), (32, 16, 4, 3, 0)),  # both
    ((32, 8, 4, 3), (16, 16, 4, 3, 0)),  # (twice the down programs)
    ((64, 8, 4, 3), (32, 16, 4, 3, 0)),
    ((32, 16, 4, 3), (32, 16, 4, 3, 0)),
    ((32, 8, 4, 3), (32, 16, 4, 3, 2)),  # + the split down
    ((32, 8, 4, 3), (32, 8, 4, 3, 4)),
    ((64, 8, 8, 3), (16, 16, 4, 3, 2)),
)


def gemv_config(cfg: tuple[int, ...], name: str = "gate/up GEMV config") -> GemvConfig:
    """A gate/up GEMV config (BLOCK_N, BLOCK_G, num_warps, DECODE), checked."""
    cfg = tuple(cfg)
    if len(cfg) != 4:
        raise ValueError(f"{name} needs (BLOCK_N, BLOCK_G, num_warps, DECODE) (got {cfg!r})")
    if cfg[3] not in DECODES:
        raise ValueError(f"{name}: DECODE must be one of {DECODES} (got {cfg[3]})")
    _check_half_tile(cfg, name)
    return cfg


def _check_half_tile(cfg: tuple[int, ...], name: str) -> None:
    """DECODE 2 / 3 hand a 32-value block's four code words to one thread (`_hfma_block`'s inline
    PTX takes them as one pack of 4), which Triton's layout does only when the [BLOCK_N, BLOCK_G,
    4] tile gives every thread at least 4 elements: BLOCK_N * BLOCK_G >= 32 * num_warps. With
    fewer the words of a block land in two threads and the sums are garbage (NaN on an H100 for
    (16, 2, 2 warps): sizePerThread [1, 1, 2])."""
    bn, bg, warps, decode = cfg[:4]
    if decode >= 2 and bn * bg < 32 * warps:
        raise ValueError(f"{name}: DECODE {decode} needs BLOCK_N * BLOCK_G >= 32 * num_warps (whole blocks per "
                         f"thread; got {bn} * {bg} < 32 * {warps})")


def down_config(cfg: tuple[int, ...], name: str = "down GEMV config") -> DownConfig:
    """A down GEMV config with its SPLIT (a 4-value one: 0, the sequential kernel), checked.
    SPLIT 0: `_gemv_down_kernel`, one program per token and BLOCK_N columns over its k experts in
    turn; SPLIT s >= 1: `_gemv_down_split_kernel` over (pair, K split) x columns, s splits of K,
    into fp32 scratch, then `_down_reduce_kernel` (one launch more)."""
    cfg = tuple(cfg)
    if len(cfg) == 4:
        cfg += (0,)
    if len(cfg) != 5:
        raise ValueError(f"{name} needs (BLOCK_N, BLOCK_G, num_warps, DECODE[, SPLIT]) (got {cfg!r})")
    if not 0 <= cfg[4] <= 16:
        raise ValueError(f"{name}: SPLIT must be 0 (the sequential kernel) to 16 (got {cfg[4]})")
    if cfg[3] not in DECODES:
        raise ValueError(f"{name}: DECODE must be one of {DECODES} (got {cfg[3]})")
    _check_half_tile(cfg, name)
    return cfg


# The GEMV configs without KVSERVE_MXFP4_GEMV_GU / _DOWN, per activation dtype. 16-bit activations
# (gpt-oss runs in bf16): the packed half math with the prefetch and the down GEMV split in two
# (`benchmarks/gpt_oss_gpu_bench.py --gemv-f16`, NVIDIA H100, 2026-12-07, gpt-oss-20b shapes,
# the whole MoE layer: one token 62.7 -> 35.7 µs, 1.75x the earlier default below; four tokens
# 126.9 -> 104.0 µs, 1.22x; every candidate within 2.7e-3 of the reference). fp32 activations
# keep the fp32 math (the half math's fp16 sums, ~1e-3 relative, would lose an fp32 model's
# precision): the configs that were the default for every dtype before (timed on an H200).
GEMV_DEFAULT_HALF: tuple[GemvConfig, DownConfig] = ((64, 8, 8, 3), (16, 16, 4, 3, 2))
GEMV_DEFAULT_FP32: tuple[GemvConfig, DownConfig] = ((32, 8, 4, 1), (32, 16, 4, 1, 0))


def gemv_configs(dtype: torch.dtype = torch.bfloat16) -> tuple[GemvConfig, DownConfig]:
    """(BLOCK_N, BLOCK_G, num_warps, DECODE) of the gate/up and (BLOCK_N, BLOCK_G, num_warps,
    DECODE, SPLIT) of the down GEMV kernels for activations of `dtype`: `GEMV_DEFAULT_HALF` for
    bf16 / fp16, `GEMV_DEFAULT_FP32` for fp32; KVSERVE_MXFP4_GEMV_GU / KVSERVE_MXFP4_GEMV_DOWN
    override either for every dtype (e.g. "16,8,4,1" and "32,16,4,1,2"; a down config of 4 values
    has SPLIT 0, the sequential kernel; see `down_config`)."""
    gu_def, dn_def = GEMV_DEFAULT_FP32 if dtype == torch.float32 else GEMV_DEFAULT_HALF
    gu = gemv_config(_env_config("KVSERVE_MXFP4_GEMV_GU", gu_def), "KVSERVE_MXFP4_GEMV_GU")
    dn = _env_config("KVSERVE_MXFP4_GEMV_DOWN", dn_def, lengths=(4, 5))
    dn = down_config(dn, "KVSERVE_MXFP4_GEMV_DOWN")
    if dn[3] >= 2 and gu[0] % 32:
        raise ValueError(f"KVSERVE_MXFP4_GEMV_DOWN with DECODE {dn[3]} needs a gate/up BLOCK_N that is a multiple "
                         f"of 32 (KVSERVE_MXFP4_GEMV_GU has {gu[0]})")
    return gu, dn


def grouped_config(num_pairs: int, num_experts: int) -> dict[str, int]:
    """Tiles of the grouped kernel: 16 pair rows while experts get few, larger for prefill."""
    per_expert = num_pairs / num_experts
    if per_expert <= 16:
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_G=2, GROUP_M=1, num_warps=4)
    if per_expert <= 64:
        return dict(BLOCK_M=32, BLOCK_N=64, BLOCK_G=2, GROUP_M=4, num_warps=4)
    return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_G=2, GROUP_M=8, num_warps=8)


def fused_moe_mxfp4(
    x: torch.Tensor,  # [T, H]
    ids: torch.Tensor,  # [T, k] selected experts
    weights: torch.Tensor,  # [T, k] their routing weights
    w: PackedExperts,
    alpha: float,
    limit: float,
    path: str = "auto",  # "auto" | "gemv" | "grouped"
    gemv_cfg: tuple[GemvConfig, GemvConfig | DownConfig] | None = None,
    grouped_cfg: dict[str, int] | None = None,
) -> torch.Tensor:  # [T, H] in x's dtype
    """gpt-oss's MoE layer on packed MXFP4 experts: sum_j w_j (down_j(swiglu(gate_up_j(x))) +
    b_down_j) over each token's k experts. Two launches on the GEMV path (decode; three with a
    down SPLIT, its fp32 scratch from `torch.empty`, so from the graph pool), three plus the expert sort (`triton_moe.align_by_expert`, one program) on the grouped path; no
    host sync on either, so a decode step captures into a CUDA graph."""
    t, hidden = x.shape
    e, two_i, _ = w.gu_codes.shape
    inter = two_i // 2
    top_k = ids.shape[1]
    if hidden != w.hidden or w.inter != inter or w.dn_codes.shape[1] != hidden:
        raise ValueError(f"packed experts {tuple(w.gu_codes.shape)}/{tuple(w.dn_codes.shape)} do not fit x {tuple(x.shape)}")
    if t == 0:
        return x.new_empty((0, hidden))
    x = x.contiguous()
    flat_ids = ids.reshape(-1).contiguous()
    wts = weights.reshape(-1).contiguous()
    n = t * top_k
    if path == "gemv" or (path == "auto" and use_gemv(t, e, top_k)):
        gu_cfg, dn_cfg = gemv_cfg or gemv_configs(x.dtype)
        gbn, gbg, gwarps, gdec = gemv_config(gu_cfg, "gemv_cfg[0]")
        dbn, dbg, dwarps, ddec, split = down_config(dn_cfg, "gemv_cfg[1]")
        h_f16 = ddec >= 2
        if h_f16 and gbn % 32:
            raise ValueError(f"gemv_cfg: a DECODE {ddec} down GEMV reads whole 32-value blocks of the activation: the "
                             f"gate/up BLOCK_N must be a multiple of 32 (got {gbn})")
        if h_f16:  # the activation as fp16 pairs and block scales (`_f16_blocks`)
            h = torch.empty((n, inter // 2), dtype=torch.int32, device=x.device)
            hs = torch.empty((n, inter // 32), dtype=torch.float32, device=x.device)
        else:
            h = torch.empty((n, inter), dtype=x.dtype, device=x.device)
            hs = h
        # PDL (`models/pdl.py`) on the packed-half-math path only (gate/up and down DECODE >= 2;
        # the defaults launch as before): the activation kernel waits, then lets gate/up launch,
        # so the routing is final when gate/up and down read it and request their first codes
        # before their own waits
        use_pdl = gdec >= 2 and ddec >= 2 and pdl.enabled(x.device)
        if gdec >= 2:
            xa, xs = act_f16(x, use_pdl)
        else:
            xa, xs = x, x
        _gemv_gate_up_kernel[(n, triton.cdiv(inter, gbn))](
            xa, xs, w.gu_codes, w.gu_scales, w.gu_bias, flat_ids, h, hs, inter, xa.stride(0), alpha, limit, 1,
            K=hidden, TOP_K=top_k, BLOCK_N=gbn, BLOCK_G=gbg, DECODE=gdec, H_F16=h_f16, PDL=use_pdl, num_warps=gwarps,
            launch_pdl=use_pdl,
        )
        out = torch.empty((t, hidden), dtype=x.dtype, device=x.device)
        if split == 0:
            _gemv_down_kernel[(t, triton.cdiv(hidden, dbn))](
                h, hs, w.dn_codes, w.dn_scales, w.dn_bias, flat_ids, wts, out, hidden, out.stride(0), 1,
                K=inter, TOP_K=top_k, BLOCK_N=dbn, BLOCK_G=dbg, DECODE=ddec, PDL=use_pdl, num_warps=dwarps,
                launch_pdl=use_pdl,
            )
            return out
        part = torch.empty((n * split, hidden), dtype=torch.float32, device=x.device)  # [pairs x splits, H]
        _gemv_down_split_kernel[(n * split, triton.cdiv(hidden, dbn))](
            h, hs, w.dn_codes, w.dn_scales, flat_ids, part, hidden, 1,
            K=inter, SPLIT=split, BLOCK_N=dbn, BLOCK_G=dbg, DECODE=ddec, PDL=use_pdl, num_warps=dwarps,
            launch_pdl=use_pdl,
        )
        _down_reduce_kernel[(t, triton.cdiv(hidden, DOWN_REDUCE_BLOCK))](
            part, w.dn_bias, flat_ids, wts, out, hidden, out.stride(0),
            TOP_K=top_k, SPLIT=split, BLOCK=DOWN_REDUCE_BLOCK, PDL=use_pdl, num_warps=4, launch_pdl=use_pdl,
        )
        return out
    from kvserve.kernels.triton_moe import align_by_expert

    h = torch.empty((n, inter), dtype=x.dtype, device=x.device)
    cfg = dict(grouped_cfg or grouped_config(n, e))
    bm = cfg["BLOCK_M"]
    sorted_ids, block_expert, num_post = align_by_expert(ids, e, bm)
    blocks = sorted_ids.numel() // bm
    prec = "ieee" if x.dtype == torch.float32 else "tf32"
    gu = {**cfg, "BLOCK_N": max(16, cfg["BLOCK_N"] // 2)}  # two accumulators
    _grouped_kernel[(blocks * triton.cdiv(inter, gu["BLOCK_N"]),)](
        x, w.gu_codes, w.gu_scales, w.gu_bias, h, sorted_ids, block_expert, num_post, wts,
        inter, n, blocks, x.stride(0), alpha, limit,
        K=hidden, A_ROW_DIV=top_k, GATE_UP=True, DOT_PREC=prec, **gu,
    )
    y = torch.empty((n, hidden), dtype=x.dtype, device=x.device)
    _grouped_kernel[(blocks * triton.cdiv(hidden, cfg["BLOCK_N"]),)](
        h, w.dn_codes, w.dn_scales, w.dn_bias, y, sorted_ids, block_expert, num_post, wts,
        hidden, n, blocks, h.stride(0), alpha, limit,
        K=inter, A_ROW_DIV=1, GATE_UP=False, DOT_PREC=prec, **cfg,
    )
    return y.view(t, top_k, hidden).sum(1)


def pack_experts(gu: list[torch.Tensor] | torch.Tensor, gu_bias: torch.Tensor, dn: list[torch.Tensor] | torch.Tensor,
                 dn_bias: torch.Tensor, hidden: int, inter: int, release: bool = False) -> PackedExperts:
    """Per-expert GGML-layout bytes (gate/up [2I, H / 32 * 17], down [H, I / 32 * 17]; a list or
    a stacked tensor) -> `PackedExperts`, one expert at a time into preallocated tensors (the
    transient is one expert's). `release`: empty each list entry in place after packing it."""
    def one(datas, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
        dev = datas[0].device
        codes = torch.empty(len(datas), rows, cols // 8, dtype=torch.int32, device=dev)
        scales = torch.empty(len(datas), rows, cols // 32, dtype=torch.uint8, device=dev)
        for i in range(len(datas)):
            if tuple(datas[i].shape) != (rows, mxfp4.row_bytes(cols)):
                raise ValueError(f"MXFP4 expert {i}: blocks {tuple(datas[i].shape)}, expected {(rows, mxfp4.row_bytes(cols))}")
            codes[i], scales[i] = pack(datas[i], cols)
            if release and isinstance(datas, list):
                datas[i] = None
        return codes, scales

    gc, gs = one(gu, 2 * inter, hidden)
    dc, ds = one(dn, hidden, inter)
    return PackedExperts(gc, gs, gu_bias.contiguous(), dc, ds, dn_bias.contiguous())
