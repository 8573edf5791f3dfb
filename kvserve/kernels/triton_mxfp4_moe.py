"""gpt-oss's MoE on the GPU with MXFP4 experts: a grouped product that reads each selected
expert's 4-bit blocks once and dequantizes them in registers (`kernels/mxfp4.py`'s layout).

    moe_mxfp4(x, ids, weights, w_gate_up, b_gate_up, w_down, b_down, act) -> [T, hidden]

The T x k (token, expert) pairs are sorted by expert on the device (no host sync, so a decode
step captures into a CUDA graph). Grid (expert, N-tile): a program walks its expert's pairs in
tiles of BLOCK_P rows, and for each K-chunk decodes a [BLOCK_N, BLOCK_K] weight tile (E2M1 codes
times the block's power-of-two scale, exact in any float dtype) and multiplies it with the
pairs' activations on tensor cores; the bias is added at the end. Experts no pair selected exit
at once, so a decode step reads only the k selected experts' bytes (about 4.25 bits a weight).
The first product takes each pair's token row; the second the pair's own activation row; the k
outputs of a token are weighted and summed in token order.
"""

from __future__ import annotations

from typing import Callable

import torch
import triton
import triton.language as tl

from kvserve.kernels import mxfp4


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
