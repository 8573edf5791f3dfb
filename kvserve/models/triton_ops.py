"""Triton kernels for the elementwise/row-wise parts of a Llama layer (imported only on CUDA).

Each kernel replaces 3-8 PyTorch launches (and their intermediate tensors) by one, reading
its inputs once. Rounding follows the PyTorch code in `layers.py` step by step (the residual
sum, the normalized value and the SiLU output are each rounded to the model dtype where PyTorch
rounds them), so bf16 results differ from the unfused path only by reduction order and fused
multiply-adds.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kvserve.models import pdl


@triton.jit
def _rmsnorm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    res_out_ptr,
    q_ptr,  # FP8: [T, H] float8_e4m3fn, contiguous; PAIRS: [T, H] int16 (the fp16 halves of the pairs)
    scale_ptr,  # FP8: [T] fp32; PAIRS: [T, H / 32] fp32 2^(10 - c)
    sum_ptr,  # PAIRS: [T, H / 32] fp32 block sums
    stride_x,
    stride_r,
    stride_o,
    stride_ro,
    n_cols,
    eps,
    HAS_RES: tl.constexpr,
    FP8: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
    PAIRS: tl.constexpr = False,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)  # a weight: no kernel writes it
    pdl.wait(PDL)
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        # Rounded to the model dtype before the norm reads it, as `x + residual` is in PyTorch.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(res_out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * stride_ro + cols, x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, 0) / n_cols
    normed = (xf * (1.0 / tl.sqrt_rn(var + eps))).to(out_ptr.dtype.element_ty)
    out = (w.to(tl.float32) * normed.to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_o + cols, out, mask=mask)
    if FP8:
        _fp8_row(out.to(tl.float32), q_ptr + row * n_cols, scale_ptr + row, cols, mask)
    if PAIRS:
        _pairs_row(out.to(tl.float32), q_ptr + row * n_cols, scale_ptr + row * (n_cols // 32),
                   sum_ptr + row * (n_cols // 32), n_cols, BLOCK)


@triton.jit
def _pairs_row(y, h_ptr, xs_ptr, xsum_ptr, n_cols, BLOCK: tl.constexpr):
    """`triton_qgemv_half.act_pairs` of one whole row (the same bits): y [BLOCK] the fp32 values
    of the row as stored in the model dtype (0 past the row, n_cols a multiple of 32). Each fp16
    half goes to its place in the pair order (`triton_qgemv_half._pair_order`): column j of a block
    belongs to pair P = j // 2, stored in slot 4 (2 (P // 8) + P % 2) + (P % 8) // 2."""
    NB: tl.constexpr = BLOCK // 32
    y2 = tl.reshape(y, [NB, 32])
    b = tl.arange(0, NB)
    j = tl.arange(0, 32)
    m = tl.max(tl.abs(y2), 1)
    e = ((m.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127  # floor(log2 m); -127 for 0 and subnormals
    c = tl.minimum(10 - e, 100)
    up = ((c + 127) << 23).to(tl.float32, bitcast=True)
    v = (y2 * up[:, None]).to(tl.float16)
    pr = j // 2
    slot = 4 * (2 * (pr // 8) + pr % 2) + (pr % 8) // 2
    ok = b * 32 < n_cols
    tl.store(h_ptr + (b * 32)[:, None] + (2 * slot + j % 2)[None, :], v.to(tl.int16, bitcast=True), mask=ok[:, None])
    tl.store(xs_ptr + b, ((137 - c) << 23).to(tl.float32, bitcast=True), mask=ok)
    # The scaled halves are multiples of 2^-24 below 2^11: their fp64 sum is exact in any order,
    # so every producer of these pairs writes the same sums.
    down = ((127 - c) << 23).to(tl.float32, bitcast=True)
    tl.store(xsum_ptr + b, tl.sum(v.to(tl.float64), 1).to(tl.float32) * down, mask=ok)


@triton.jit
def _fp8_row(y, q_ptr, scale_ptr, cols, mask):
    """`triton_quant.act_quant_fp8` of one whole row: y [BLOCK] the fp32 values of the row as
    stored in the model dtype (0 past the row). The same operations as that kernel (the max is
    exact in any order, then the same division and clamp), so the same bits."""
    scale = tl.maximum(tl.max(tl.abs(y), 0), 1e-12) / 448.0
    tl.store(scale_ptr, scale)
    q = tl.minimum(tl.maximum(y / scale, -448.0), 448.0)
    tl.store(q_ptr + cols, q.to(q_ptr.dtype.element_ty), mask=mask)


def rmsnorm(
    x: torch.Tensor,  # [T, H], last dim contiguous
    weight: torch.Tensor,  # [H]
    eps: float,
    residual: torch.Tensor | None = None,  # [T, H]
    fp8_out: tuple[torch.Tensor, torch.Tensor] | None = None,  # ([T, H] float8_e4m3fn, [T, 1] fp32)
    pairs_out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,  # `act_pairs`' three tensors
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(norm(x + residual), x + residual) or (norm(x), None): one read of each input. With
    `fp8_out` the kernel also writes the normalized rows as `act_quant_fp8` would (FP8 values
    and per-row scales) into those tensors; with `pairs_out` (H a multiple of 32) as
    `triton_qgemv_half.act_pairs` would (the half-math GEMVs' input)."""
    n_rows, n_cols = x.shape
    out = torch.empty_like(x)
    res_out = torch.empty_like(x) if residual is not None else None
    if n_rows == 0:
        return out, res_out
    block = triton.next_power_of_2(n_cols)
    use_pdl = pdl.enabled(x.device)
    if fp8_out is not None and pairs_out is not None:
        raise ValueError("rmsnorm: fp8_out and pairs_out are two forms of one output; ask for one")
    if pairs_out is not None:
        q, scale, sums = pairs_out[0].view(torch.int16), pairs_out[1], pairs_out[2]
    else:
        q, scale = fp8_out if fp8_out is not None else (out, out)
        sums = scale
    _rmsnorm_kernel[(n_rows,)](
        x, residual if residual is not None else x, weight, out,
        res_out if res_out is not None else out, q, scale, sums,
        x.stride(0), residual.stride(0) if residual is not None else 0,
        out.stride(0), res_out.stride(0) if res_out is not None else 0,
        n_cols, eps,
        HAS_RES=residual is not None, FP8=fp8_out is not None, BLOCK=block, PDL=use_pdl,
        PAIRS=pairs_out is not None, num_warps=min(max(block // 256, 1), 16), launch_pdl=use_pdl,
    )
    return out, res_out


@triton.jit
def _silu_mul_row(g, u, dt: tl.constexpr):
    """silu(g) * u in fp32 from g in fp32 and u in the model dtype, rounded to `dt`: F.silu
    rounds its output to the input dtype before the product, so do we."""
    s = (g / (1.0 + tl.exp(-g))).to(dt)
    return (s.to(tl.float32) * u.to(tl.float32)).to(dt)


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, n_cols, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl.wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * stride_o + cols, _silu_mul_row(g, u, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _silu_mul_fp8_kernel(x_ptr, out_ptr, q_ptr, scale_ptr, stride_x, stride_o, n_cols,
                         BLOCK: tl.constexpr, PDL: tl.constexpr):
    """`_silu_mul_kernel` with a whole row a program, which also writes the row as
    `act_quant_fp8` would (the down projection's FP8 input): the row's amax while it is
    computed, then its stored values read back (in L2) and quantized, as that kernel's two passes."""
    pdl.wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for k0 in range(0, n_cols, BLOCK):
        c = k0 + cols
        mask = c < n_cols
        g = tl.load(x_ptr + row * stride_x + c, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(x_ptr + row * stride_x + n_cols + c, mask=mask, other=0.0)
        out = _silu_mul_row(g, u, out_ptr.dtype.element_ty)  # 0 past the row (silu(0) * 0)
        tl.store(out_ptr + row * stride_o + c, out, mask=mask)
        amax = tl.maximum(amax, tl.abs(out.to(tl.float32)))
    scale = tl.maximum(tl.max(amax, 0), 1e-12) / 448.0
    tl.store(scale_ptr + row, scale)
    tl.debug_barrier()  # the row's stores above are visible to every thread of this program
    for k0 in range(0, n_cols, BLOCK):
        c = k0 + cols
        mask = c < n_cols
        y = tl.load(out_ptr + row * stride_o + c, mask=mask, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(y / scale, -448.0), 448.0)
        tl.store(q_ptr + row * n_cols + c, q.to(q_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[T, 2I] (gate ‖ up) -> [T, I]: silu(gate) * up."""
    n_rows, width = x.shape
    n_cols = width // 2
    out = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    if n_rows == 0:
        return out
    block = min(triton.next_power_of_2(n_cols), 2048)
    use_pdl = pdl.enabled(x.device)
    _silu_mul_kernel[(n_rows, triton.cdiv(n_cols, block))](
        x, out, x.stride(0), out.stride(0), n_cols, BLOCK=block, PDL=use_pdl,
        num_warps=4 if block >= 1024 else 2, launch_pdl=use_pdl,
    )
    return out


def silu_fp8_block(n_cols: int, cap: int = 2048) -> int:
    """Columns `_silu_mul_fp8_kernel` takes at a time: the largest power of two <= cap that
    divides the row (no masked tail: Qwen3-0.6B's 3,072 -> 1,024, Llama-3.1-8B's 14,336 -> 2,048)
    down to 1,024, else cap (or the whole row, if shorter)."""
    block = min(triton.next_power_of_2(n_cols), cap)
    b = block
    while b > 1024 and n_cols % b:
        b //= 2
    return b if n_cols % b == 0 else block


def silu_and_mul_fp8(x: torch.Tensor, block: int = 2048) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[T, 2I] -> (silu(gate) * up [T, I], its `act_quant_fp8`: float8_e4m3fn [T, I] and fp32
    scales [T, 1]) in one kernel, the same bits as `silu_and_mul` then `act_quant_fp8`. `block`:
    the most columns a program handles at a time (a power of two; tests use small ones)."""
    n_rows, width = x.shape
    n_cols = width // 2
    out = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    q = torch.empty((n_rows, n_cols), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((n_rows, 1), dtype=torch.float32, device=x.device)
    if n_rows == 0:
        return out, q, scale
    block = silu_fp8_block(n_cols, block)
    use_pdl = pdl.enabled(x.device)
    _silu_mul_fp8_kernel[(n_rows,)](
        x, out, q, scale, x.stride(0), out.stride(0), n_cols, BLOCK=block, PDL=use_pdl,
        num_warps=4 if block >= 1024 else 2, launch_pdl=use_pdl,
    )
    return out, q, scale


@triton.jit
def _rotate(x1, x2, c, s):
    """RoPE of the pair (x1, x2) in fp32, with explicit FMAs: every kernel that rotates gets
    the same bits whatever the compiler would contract."""
    return tl.fma(x1, c, -(x2 * s)), tl.fma(x2, c, x1 * s)


# positions are a slice of the step's staging buffer whose 16-byte alignment varies per step.
@triton.jit(do_not_specialize_on_alignment=["pos_ptr", "slot_ptr"])
def _rope_qk_kernel(
    qkv_ptr,
    pos_ptr,
    cos_sin_ptr,  # [max_pos, 2 * HALF] fp32: cos ‖ sin
    qw_ptr,
    kw_ptr,
    cache_ptr,  # WRITE_KV: [2, blocks, block_size, kv_heads, 2 * HALF]
    slot_ptr,  # WRITE_KV: [T] int64, -1 = no write
    stride_t,
    stride_cs,
    num_q_heads,
    num_heads,  # q heads + k heads (they are adjacent in a fused qkv row)
    num_kv_heads,
    stride_plane,
    stride_slot,
    stride_head,
    eps,
    HALF: tl.constexpr,
    H_PAD: tl.constexpr,
    KV_PAD: tl.constexpr,
    NORM: tl.constexpr,
    WRITE_KV: tl.constexpr,  # also store the rotated k and the v of this token in the paged cache
    PDL: tl.constexpr,
):
    pdl.wait(PDL)
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    h = tl.arange(0, H_PAD)
    d = tl.arange(0, HALF)
    hmask = (h < num_heads)[:, None]
    ptr1 = qkv_ptr + t * stride_t + h[:, None] * (2 * HALF) + d[None, :]  # [H_PAD, HALF]
    x1 = tl.load(ptr1, mask=hmask, other=0.0)
    x2 = tl.load(ptr1 + HALF, mask=hmask, other=0.0)
    dtype = x1.dtype
    x1 = x1.to(tl.float32)
    x2 = x2.to(tl.float32)
    if NORM:  # Qwen3: per-head RMSNorm of q (q weight) and k (k weight) before the rotation
        inv = 1.0 / tl.sqrt_rn((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / (2 * HALF) + eps)  # [H_PAD]
        is_q = (h < num_q_heads)[:, None]
        w1 = tl.where(is_q, tl.load(qw_ptr + d)[None, :], tl.load(kw_ptr + d)[None, :]).to(tl.float32)
        w2 = tl.where(is_q, tl.load(qw_ptr + HALF + d)[None, :], tl.load(kw_ptr + HALF + d)[None, :])
        x1 = (w1 * (x1 * inv[:, None]).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
        x2 = (w2.to(tl.float32) * (x2 * inv[:, None]).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    c = tl.load(cos_sin_ptr + pos * stride_cs + d)[None, :]  # [1, HALF]
    s = tl.load(cos_sin_ptr + pos * stride_cs + HALF + d)[None, :]
    r1, r2 = _rotate(x1, x2, c, s)
    r1 = r1.to(dtype)
    r2 = r2.to(dtype)
    tl.store(ptr1, r1, mask=hmask)
    tl.store(ptr1 + HALF, r2, mask=hmask)
    if WRITE_KV:  # what attention/triton/kv_write.py would store after this kernel
        slot = tl.load(slot_ptr + t)
        if slot >= 0:  # padding rows of a CUDA-graph batch write nothing
            cdt = cache_ptr.dtype.element_ty
            is_k = ((h >= num_q_heads) & (h < num_heads))[:, None]
            kdst = cache_ptr + slot * stride_slot + (h - num_q_heads)[:, None] * stride_head + d[None, :]
            tl.store(kdst, r1.to(cdt), mask=is_k)
            tl.store(kdst + HALF, r2.to(cdt), mask=is_k)
            hv = tl.arange(0, KV_PAD)
            dd = tl.arange(0, 2 * HALF)
            vmask = (hv < num_kv_heads)[:, None]
            v = tl.load(qkv_ptr + t * stride_t + (num_heads + hv)[:, None] * (2 * HALF) + dd[None, :], mask=vmask)
            vdst = cache_ptr + stride_plane + slot * stride_slot + hv[:, None] * stride_head + dd[None, :]
            tl.store(vdst, v.to(cdt), mask=vmask)


def rope_qk_(
    qkv: torch.Tensor,  # [T, (Hq + 2 Hkv) * D]: q and k rotated in place, v untouched
    positions: torch.Tensor,  # [T]
    cos_sin: torch.Tensor,  # [max_pos, D] fp32
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    q_weight: torch.Tensor | None = None,  # [D] q/k RMSNorm weights (Qwen3), or None
    k_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    kv_cache: torch.Tensor | None = None,  # [2, blocks, block_size, kv_heads, D]: also write k, v
    slot_mapping: torch.Tensor | None = None,  # [T] int64, -1 = skip
) -> None:
    n_tokens = qkv.shape[0]
    if n_tokens == 0:
        return
    heads = num_q_heads + num_kv_heads
    norm = q_weight is not None
    h_pad = triton.next_power_of_2(heads)
    write = kv_cache is not None
    use_pdl = pdl.enabled(qkv.device)
    _rope_qk_kernel[(n_tokens,)](
        qkv, positions, cos_sin,
        q_weight if norm else cos_sin, k_weight if norm else cos_sin,
        kv_cache if write else qkv, slot_mapping if write else positions,
        qkv.stride(0), cos_sin.stride(0), num_q_heads, heads, num_kv_heads,
        kv_cache.stride(0) if write else 0, kv_cache.stride(2) if write else 0, kv_cache.stride(3) if write else 0,
        eps,
        HALF=head_dim // 2, H_PAD=h_pad, KV_PAD=triton.next_power_of_2(num_kv_heads), NORM=norm, WRITE_KV=write,
        PDL=use_pdl, num_warps=min(max(h_pad * head_dim // 1024, 1), 8), launch_pdl=use_pdl,
    )


@triton.jit
def _gemv_kernel(
    x_ptr,  # [K]
    w_ptr,  # [N, K], rows contiguous
    b_ptr,  # [N] or unused
    out_ptr,  # [N]
    N,
    K,
    stride_w,
    push_ptrs,  # PUSH: int64[WORLD], each rank's all-reduce buffer (distributed/one_shot_norm.py)
    push_slot_ptr,  # PUSH: int32, the slot the next fused all-reduce of row 0 uses
    push_rank,
    push_stride,  # PUSH: elements between two ranks' parts of a slot
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0
    PUSH: tl.constexpr,  # also send the output to every rank's all-reduce buffer
    WORLD: tl.constexpr,
    PRE: tl.constexpr,  # weight tiles loaded before waiting for the previous kernel (0-4)
    PDL: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    out = _gemv_rows(x_ptr, w_ptr, rows, row_ok, K, stride_w, BLOCK_N, BLOCK_K, EVEN_K, PRE, PDL)
    if HAS_BIAS:
        out += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    dt = out_ptr.dtype.element_ty
    tl.store(out_ptr + rows, out.to(dt), mask=row_ok)
    if PUSH:
        # The row-parallel partial sum goes straight to the ranks' buffers, in the format of
        # one_shot_norm's kernel (-0.0 marks "empty", so it is sent as +0.0); that kernel then
        # only waits for the peers' rows.
        v = out.to(dt)
        v = tl.where(v == 0, 0.0, v).to(dt)
        base = (tl.load(push_slot_ptr) * WORLD + push_rank).to(tl.int64) * push_stride
        for p in tl.static_range(WORLD):
            dst = tl.load(push_ptrs + p).to(tl.pointer_type(dt))
            tl.store(dst + base + rows, v, mask=row_ok)


@triton.jit
def _gemv_rows(x_ptr, w_ptr, rows, row_ok, K, stride_w, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               EVEN_K: tl.constexpr, PRE: tl.constexpr, PDL: tl.constexpr):
    """fp32 dot products of weight rows `rows` with x. The first PRE tiles of the rows (whole
    tiles) are requested before the PDL wait; the sums are the same, in the same order."""
    rows64 = tl.where(row_ok, rows, 0).to(tl.int64)
    w0, w1, w2, w3 = _gemv_preload(w_ptr, rows64, stride_w, BLOCK_N, BLOCK_K, PRE)
    pdl.wait(PDL)
    return _gemv_finish(x_ptr, w_ptr, rows64, K, stride_w, w0, w1, w2, w3, BLOCK_N, BLOCK_K, EVEN_K, PRE)


@triton.jit
def _gemv_preload(w_ptr, rows64, stride_w, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRE: tl.constexpr):
    """The first PRE (0-4) weight tiles of the rows; the others are placeholders, never read."""
    w_tile = w_ptr + rows64[:, None] * stride_w + tl.arange(0, BLOCK_K)[None, :]
    w0 = tl.zeros([BLOCK_N, BLOCK_K], dtype=w_ptr.dtype.element_ty)
    if PRE > 0:
        w0 = tl.load(w_tile)
    w1 = w0
    w2 = w0
    w3 = w0
    if PRE > 1:
        w1 = tl.load(w_tile + BLOCK_K)
    if PRE > 2:
        w2 = tl.load(w_tile + 2 * BLOCK_K)
    if PRE > 3:
        w3 = tl.load(w_tile + 3 * BLOCK_K)
    return w0, w1, w2, w3


@triton.jit
def _gemv_finish(x_ptr, w_ptr, rows64, K, stride_w, w0, w1, w2, w3, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 EVEN_K: tl.constexpr, PRE: tl.constexpr):
    """The dot products, from the PRE preloaded tiles and then the rest of the rows."""
    cols = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    if PRE > 0:
        acc += w0.to(tl.float32) * tl.load(x_ptr + cols).to(tl.float32)[None, :]
    if PRE > 1:
        acc += w1.to(tl.float32) * tl.load(x_ptr + BLOCK_K + cols).to(tl.float32)[None, :]
    if PRE > 2:
        acc += w2.to(tl.float32) * tl.load(x_ptr + 2 * BLOCK_K + cols).to(tl.float32)[None, :]
    if PRE > 3:
        acc += w3.to(tl.float32) * tl.load(x_ptr + 3 * BLOCK_K + cols).to(tl.float32)[None, :]
    for k0 in range(PRE * BLOCK_K, K, BLOCK_K):
        c = k0 + cols
        if EVEN_K:
            x = tl.load(x_ptr + c)
            w = tl.load(w_ptr + rows64[:, None] * stride_w + c[None, :])
        else:
            x = tl.load(x_ptr + c, mask=c < K, other=0.0)
            w = tl.load(w_ptr + rows64[:, None] * stride_w + c[None, :], mask=(c < K)[None, :], other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    return tl.sum(acc, 1)  # [BLOCK_N]


# positions and slots are slices of the step's staging buffer (alignment varies per step).
@triton.jit(do_not_specialize_on_alignment=["pos_ptr", "slot_ptr"])
def _gemv_rope_kernel(
    x_ptr,  # [K]
    w_ptr,  # [(Hq + 2 Hkv) * 2 HALF, K]: the fused q, k, v projection
    b_ptr,  # [N] or unused
    out_ptr,  # [N]: q and k rotated, v as computed
    pos_ptr,  # [1]
    cos_sin_ptr,  # [max_pos, 2 * HALF] fp32: cos ‖ sin
    cache_ptr,  # WRITE_KV: [2, blocks, block_size, kv_heads, 2 * HALF]
    slot_ptr,  # WRITE_KV: [1] int64, -1 = no write
    K,
    stride_w,
    stride_cs,
    num_q_heads,
    num_heads,  # q heads + k heads: the heads that are rotated
    stride_plane,
    stride_slot,
    stride_head,
    HAS_BIAS: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    WRITE_KV: tl.constexpr,
    PRE: tl.constexpr,
    PDL: tl.constexpr,
):
    """One program computes the two rows of a head that RoPE pairs (d and d + HALF), so the
    rotation (and the k/v store into the paged cache) happens in the epilogue: the QKV GEMV and
    `_rope_qk_kernel` in one launch, with the same bits (each row's dot product is the plain
    GEMV's, rounded to the model dtype before it is rotated as `_rope_qk_kernel` rotates)."""
    p = tl.program_id(0)
    head = p // HALF
    j = p % HALF
    pair = tl.arange(0, 2)
    rows = (head * (2 * HALF) + j + pair * HALF).to(tl.int64)  # [2]
    w0, w1, w2, w3 = _gemv_preload(w_ptr, rows, stride_w, 2, BLOCK_K, PRE)
    pdl.wait(PDL)
    # The epilogue's inputs are requested first: in flight during the dot products.
    pos = tl.load(pos_ptr).to(tl.int64)
    c = tl.load(cos_sin_ptr + pos * stride_cs + j)
    s = tl.load(cos_sin_ptr + pos * stride_cs + HALF + j)
    if WRITE_KV:
        slot = tl.load(slot_ptr)
    if HAS_BIAS:
        b = tl.load(b_ptr + rows).to(tl.float32)
    acc = _gemv_finish(x_ptr, w_ptr, rows, K, stride_w, w0, w1, w2, w3, 2, BLOCK_K, EVEN_K, PRE)
    if HAS_BIAS:
        acc += b
    dt = out_ptr.dtype.element_ty
    o = acc.to(dt)
    of = o.to(tl.float32)
    x1 = tl.sum(tl.where(pair == 0, of, 0.0), 0)
    x2 = tl.sum(tl.where(pair == 1, of, 0.0), 0)
    r1, r2 = _rotate(x1, x2, c, s)
    o = tl.where(head < num_heads, tl.where(pair == 0, r1.to(dt), r2.to(dt)), o)
    tl.store(out_ptr + rows, o)
    if WRITE_KV:
        if (slot >= 0) & (head >= num_q_heads):  # k or v, and not a padding row
            is_v = head >= num_heads
            kv_head = tl.where(is_v, head - num_heads, head - num_q_heads).to(tl.int64)
            dst = cache_ptr + is_v.to(tl.int64) * stride_plane + slot * stride_slot + kv_head * stride_head
            tl.store(dst + j + pair * HALF, o.to(cache_ptr.dtype.element_ty))


@triton.jit
def _gemv_silu_mul_kernel(
    x_ptr,  # [K]
    w_ptr,  # [2I, K]: gate rows, then up rows
    b_ptr,  # [2I] or unused
    out_ptr,  # [I]
    I,
    K,
    stride_w,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,  # gate rows per program (and as many up rows)
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    PRE: tl.constexpr,  # weight tiles loaded before waiting for the previous kernel (0-4)
    PDL: tl.constexpr,
):
    # One tile of 2 * BLOCK_N weight rows, the gate rows then the matching up rows, streamed
    # by the plain GEMV's loop: both halves' loads are in flight together.
    r = tl.arange(0, 2 * BLOCK_N)
    is_up = r >= BLOCK_N
    rows = tl.program_id(0) * BLOCK_N + r % BLOCK_N  # [2 * BLOCK_N]: gate row index of each
    row_ok = rows < I
    w_rows = tl.where(is_up, rows + I, rows)
    acc = _gemv_rows(x_ptr, w_ptr, w_rows, row_ok, K, stride_w, 2 * BLOCK_N, BLOCK_K, EVEN_K, PRE, PDL)
    if HAS_BIAS:
        acc += tl.load(b_ptr + w_rows, mask=row_ok, other=0.0).to(tl.float32)
    g, u = tl.split(tl.trans(tl.reshape(acc, [2, BLOCK_N])))  # [BLOCK_N] each
    out_rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(out_ptr + out_rows, _silu_mul_rounded(g, u, out_ptr.dtype.element_ty), mask=out_rows < I)


@triton.jit
def _silu_mul_rounded(g, u, dt: tl.constexpr):
    """silu(gate) * up from fp32 projection sums, rounded where the unfused path rounds: the
    projection's output, then `_silu_mul_kernel` (also the verify GEMM's epilogue)."""
    g = g.to(dt).to(tl.float32)
    u = u.to(dt).to(tl.float32)
    s = (g / (1.0 + tl.exp(-g))).to(dt)
    return (s.to(tl.float32) * u).to(dt)


def gemv(
    x: torch.Tensor,  # [1, K]
    weight: torch.Tensor,  # [N, K]
    bias: torch.Tensor | None = None,
    config: tuple[int, int, int] | None = None,  # (BLOCK_N, BLOCK_K, num_warps)
    push: tuple[torch.Tensor, torch.Tensor, int, int, int] | None = None,
) -> torch.Tensor:  # [1, N]
    """One row times a weight matrix (x @ weight.T + bias): every program streams BLOCK_N whole
    rows of the weight, with many 16-byte loads in flight. `push` = (buffer pointers, slot
    counter, rank, rank stride, world size) of a fused all-reduce (distributed/one_shot_norm.py):
    the output is also written into every rank's buffer."""
    n, k = weight.shape
    out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    block_n, block_k, warps = config or gemv_config(n, k)
    ptrs, slot, rank, stride, world = push if push is not None else (weight, weight, 0, 0, 1)
    use_pdl = pdl.enabled(x.device)
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, weight, bias if bias is not None else weight, out, n, k, weight.stride(0),
        ptrs, slot, rank, stride,
        HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=k % block_k == 0,
        PUSH=push is not None, WORLD=world, PRE=_preload_tiles(use_pdl, k, block_k), PDL=use_pdl,
        num_warps=warps, launch_pdl=use_pdl,
    )
    return out


def gemv_silu_mul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """silu(gate) * up of a fused gate/up projection of one row ([1, K] x [2I, K] -> [1, I]),
    in one kernel: each program computes BLOCK_N gate rows and the matching up rows. The same
    bits as `silu_and_mul(gemv(x, weight, bias))`."""
    n2, k = weight.shape
    i = n2 // 2
    out = torch.empty((1, i), dtype=x.dtype, device=x.device)
    block_n, block_k, warps = gemv_config(n2, k)
    block_n = max(1, block_n // 2)  # as many weight rows per program as the plain GEMV reads
    use_pdl = pdl.enabled(x.device)
    _gemv_silu_mul_kernel[(triton.cdiv(i, block_n),)](
        x, weight, bias if bias is not None else weight, out, i, k, weight.stride(0),
        HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=k % block_k == 0,
        PRE=_preload_tiles(use_pdl, k, block_k), PDL=use_pdl, num_warps=warps, launch_pdl=use_pdl,
    )
    return out


def _preload_setting() -> int:
    value = os.environ.get("KVSERVE_PDL_PRELOAD", "4")
    if value not in ("0", "1", "2", "3", "4"):
        raise ValueError(f"KVSERVE_PDL_PRELOAD must be an integer from 0 to 4, got {value!r}")
    return int(value)


# Weight tiles a GEMV program requests before its PDL wait (at most 4: the kernels unroll them).
# KVSERVE_PDL_PRELOAD=0..4 overrides it for measurements (e.g. around benchmarks/tp_bench.py).
PRELOAD_TILES = _preload_setting()


def _preload_tiles(use_pdl: bool, k: int, block_k: int) -> int:
    return min(PRELOAD_TILES, k // block_k) if use_pdl else 0


def gemv_rope_(
    x: torch.Tensor,  # [1, K]
    weight: torch.Tensor,  # [(Hq + 2 Hkv) * D, K]
    bias: torch.Tensor | None,
    positions: torch.Tensor,  # [1]
    cos_sin: torch.Tensor,  # [max_pos, D] fp32
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    kv_cache: torch.Tensor | None = None,  # [2, blocks, block_size, kv_heads, D]: also store k, v
    slot_mapping: torch.Tensor | None = None,  # [1] int64, -1 = skip
) -> torch.Tensor:  # [1, (Hq + 2 Hkv) * D]
    """`rope_qk_(gemv(x, weight, bias), ...)` (without q/k norm) in one kernel: the same bits."""
    n, k = weight.shape
    if n != (num_q_heads + 2 * num_kv_heads) * head_dim or head_dim % 2:
        raise ValueError(f"gemv_rope_: weight of {n} rows is not q, k and v heads of even size {head_dim}")
    out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    _, block_k, warps = gemv_config(n, k)
    write = kv_cache is not None
    use_pdl = pdl.enabled(x.device)
    _gemv_rope_kernel[(n // 2,)](
        x, weight, bias if bias is not None else weight, out, positions, cos_sin,
        kv_cache if write else weight, slot_mapping if write else positions,
        k, weight.stride(0), cos_sin.stride(0), num_q_heads, num_q_heads + num_kv_heads,
        kv_cache.stride(0) if write else 0, kv_cache.stride(2) if write else 0, kv_cache.stride(3) if write else 0,
        HAS_BIAS=bias is not None, HALF=head_dim // 2, BLOCK_K=block_k, EVEN_K=k % block_k == 0, WRITE_KV=write,
        PRE=_preload_tiles(use_pdl, k, block_k), PDL=use_pdl, num_warps=warps, launch_pdl=use_pdl,
    )
    return out


def gemv_config(n: int, k: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps). `python -m benchmarks.gpu_gemv` on an H100 (2026-11-27,
    inside CUDA graphs, us): (2, 1024, 4) was best or within 3% of the best of 16 configs at
    every Llama-3.2-1B and 3.1-8B shape, and beat cuBLAS at all of them: 8B o_proj 13.4 vs
    16.0, qkv 18.9 vs 21.4, gate_up 78.2 vs 88.0 (3.0 vs 2.67 TB/s), down 43.0 vs 44.5;
    1B o_proj 4.8 vs 6.4, down 13.9 vs 15.9."""
    return 2, min(1024, triton.next_power_of_2(k)), 4


# -- greedy argmax and the vocabulary-parallel embedding lookup ------------------------------
@triton.jit
def _argmax_chunk_kernel(x_ptr, val_ptr, idx_ptr, n_cols, stride_x, n_chunks, BLOCK: tl.constexpr):
    """Max and index of one chunk of one row; a NaN wins (as in torch.argmax), the first one."""
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    cols = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row.to(tl.int64) * stride_x + cols, mask=mask, other=float("-inf"))
    nan = x != x
    first_nan = tl.min(tl.where(nan, cols, n_cols), 0)
    clean = tl.where(nan, float("-inf"), x)
    best = tl.argmax(clean, 0, tie_break_left=True)  # an all -inf chunk gives its first column
    best_val = tl.max(clean, 0)
    has_nan = first_nan < n_cols
    out = row * n_chunks + chunk
    tl.store(val_ptr + out, tl.where(has_nan, float("nan"), best_val))
    tl.store(idx_ptr + out, tl.where(has_nan, first_nan, chunk * BLOCK + best))


@triton.jit
def _argmax_merge_kernel(val_ptr, idx_ptr, out_ptr, n_chunks, CHUNKS_PAD: tl.constexpr):
    """The first chunk holding a NaN, else the first chunk holding the row's maximum: chunks
    are in column order, so this is the first index of the maximum."""
    row = tl.program_id(0)
    offs = tl.arange(0, CHUNKS_PAD)
    valid = offs < n_chunks
    v = tl.load(val_ptr + row * n_chunks + offs, mask=valid, other=float("-inf"))
    nan = (v != v) & valid
    first_nan = tl.min(tl.where(nan, offs, n_chunks), 0)
    best = tl.argmax(tl.where(nan, float("-inf"), v), 0, tie_break_left=True)
    pick = tl.where(first_nan < n_chunks, first_nan, best)
    tl.store(out_ptr + row, tl.load(idx_ptr + row * n_chunks + pick).to(tl.int64))


_ARGMAX_BLOCK = 4096


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """[N, V] -> [N] int64: each row's `torch.argmax` (the first index of the maximum; a NaN
    counts as the maximum) in two short kernels. For one 128k-vocabulary row PyTorch's reduction
    takes ~27 us on an H200 (tp_bench --profile), about a hundredth of a decode step of an 8B
    model; this splits the row over many programs."""
    n_rows, n_cols = x.shape
    out = torch.empty(n_rows, dtype=torch.int64, device=x.device)
    if n_rows == 0:
        return out
    if n_cols == 0:
        raise ValueError("argmax_rows: rows of zero length have no maximum")
    n_chunks = triton.cdiv(n_cols, _ARGMAX_BLOCK)
    vals = torch.empty(n_rows * n_chunks, dtype=torch.float32, device=x.device)
    idxs = torch.empty(n_rows * n_chunks, dtype=torch.int32, device=x.device)
    _argmax_chunk_kernel[(n_rows, n_chunks)](
        x, vals, idxs, n_cols, x.stride(0), n_chunks, BLOCK=_ARGMAX_BLOCK, num_warps=8
    )
    _argmax_merge_kernel[(n_rows,)](
        vals, idxs, out, n_chunks, CHUNKS_PAD=max(16, triton.next_power_of_2(n_chunks)), num_warps=1
    )
    return out


@triton.jit
def _embedding_shard_kernel(
    ids_ptr, w_ptr, out_ptr, start, per_rank, n_cols, stride_w, stride_o,
    BLOCK: tl.constexpr, PDL: tl.constexpr,
):
    pdl.wait(PDL)
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    local = tl.load(ids_ptr + row) - start
    inside = (local >= 0) & (local < per_rank)
    src = tl.where(inside, local, 0).to(tl.int64) * stride_w
    v = tl.load(w_ptr + src + cols, mask=mask & inside, other=0.0)
    tl.store(out_ptr + row.to(tl.int64) * stride_o + cols, v, mask=mask)


def embedding_shard(ids: torch.Tensor, weight: torch.Tensor, start: int) -> torch.Tensor:
    """[T] ids -> [T, H]: row `id - start` of this rank's slice of the table, zeros for ids
    outside it (the vocabulary-parallel embedding before its all-reduce), in one kernel."""
    n_rows, (per_rank, n_cols) = ids.shape[0], weight.shape
    out = torch.empty((n_rows, n_cols), dtype=weight.dtype, device=weight.device)
    if n_rows == 0:
        return out
    block = min(triton.next_power_of_2(n_cols), 4096)
    use_pdl = pdl.enabled(weight.device)
    _embedding_shard_kernel[(n_rows, triton.cdiv(n_cols, block))](
        ids, weight, out, start, per_rank, n_cols, weight.stride(0), out.stride(0),
        BLOCK=block, PDL=use_pdl, num_warps=4, launch_pdl=use_pdl,
    )
    return out
