"""The qkv projection of one row with Qwen3's per-head q/k RMSNorm, RoPE and the K/V cache store
in its epilogue: one launch where `gemv` + `_rope_qk_kernel` take two (opt-in: on an H100,
2026-12-07, a Qwen3-30B-A3B step took 3.028 ms with it against 2.977 without;
`KVSERVE_QK_NORM_GEMV=1`, read when the CUDA ops are built, `platform/cuda_ops.qk_norm_gemv_mode`;
imported only on CUDA).

`triton_ops.gemv_rope_` fuses RoPE into the qkv GEMV because each of its programs holds the two
rows RoPE pairs (d and d + D/2). The q/k norm needs the sum of squares of all D rows of a head,
which D/2 programs compute. So each program computes its two rows as `gemv_rope_` does and
stores them (rounded to the model dtype, as the projection's output is), and the LAST program
of a head to finish (an arrival counter per head: a CTA barrier, then an acq_rel atomic at GPU
scope; the loads after it bypass L1) reads the head's D values back from L2, normalizes,
rotates and stores them in place, and stores k in the paged cache; v programs store their two
values in the cache themselves. The last program leaves the counter at zero for the next call
(the next call waits for this one: stream order, PDL included). The math is `_rope_qk_kernel`'s
with NORM for one head, step for step (sums in another order, so bf16 results can differ by
rounding). Per layer at batch 1 this removes a one-program kernel from the chain (Qwen3-30B-A3B:
the qkv GEMV, then `_rope_qk_kernel` on 36 heads in one program, waiting for it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvserve.models import pdl
from kvserve.models.triton_ops import _gemv_finish, _gemv_preload, _preload_tiles, _rotate, gemv_config


# positions and slots are slices of the step's staging buffer (alignment varies per step).
@triton.jit(do_not_specialize_on_alignment=["pos_ptr", "slot_ptr"])
def _gemv_qk_norm_rope_kernel(
    x_ptr,  # [K]
    w_ptr,  # [(Hq + 2 Hkv) * 2 HALF, K]: the fused q, k, v projection
    out_ptr,  # [N]: q and k normalized and rotated, v as computed
    pos_ptr,  # [1]
    cos_sin_ptr,  # [max_pos, 2 * HALF] fp32: cos ‖ sin
    qw_ptr,  # [2 HALF] q norm weight
    kw_ptr,  # [2 HALF] k norm weight
    count_ptr,  # [Hq + Hkv] int32 arrival counters, zero between calls
    cache_ptr,  # WRITE_KV: [2, blocks, block_size, kv_heads, 2 * HALF]
    slot_ptr,  # WRITE_KV: [1] int64, -1 = no write
    K,
    stride_w,
    stride_cs,
    num_q_heads,
    num_heads,  # q heads + k heads: the heads that are normalized and rotated
    stride_plane,
    stride_slot,
    stride_head,
    eps,
    HALF: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    WRITE_KV: tl.constexpr,
    PRE: tl.constexpr,
    PDL: tl.constexpr,
):
    p = tl.program_id(0)
    head = p // HALF
    j = p % HALF
    pair = tl.arange(0, 2)
    rows = (head * (2 * HALF) + j + pair * HALF).to(tl.int64)  # [2]
    w0, w1, w2, w3 = _gemv_preload(w_ptr, rows, stride_w, 2, BLOCK_K, PRE)
    pdl.wait(PDL)
    # The epilogue's inputs are requested first: in flight during the dot products.
    d = tl.arange(0, HALF)
    pos = tl.load(pos_ptr).to(tl.int64)
    c = tl.load(cos_sin_ptr + pos * stride_cs + d)
    s = tl.load(cos_sin_ptr + pos * stride_cs + HALF + d)
    if WRITE_KV:
        slot = tl.load(slot_ptr)
    # The norm weight of the head (q or k; unused for v), so the last program does not wait for it.
    wp = tl.where(head < num_q_heads, qw_ptr, kw_ptr)  # a pointer select: 48 registers, not 56
    nw1 = tl.load(wp + d)
    nw2 = tl.load(wp + HALF + d)
    acc = _gemv_finish(x_ptr, w_ptr, rows, K, stride_w, w0, w1, w2, w3, 2, BLOCK_K, EVEN_K, PRE)
    dt = out_ptr.dtype.element_ty
    o = acc.to(dt)
    tl.store(out_ptr + rows, o)
    if head >= num_heads:  # v: no norm, no rotation
        if WRITE_KV:
            if slot >= 0:
                dst = cache_ptr + stride_plane + slot * stride_slot + (head - num_heads).to(tl.int64) * stride_head
                tl.store(dst + j + pair * HALF, o.to(cache_ptr.dtype.element_ty))
    else:
        tl.debug_barrier()  # every thread's store is issued before the release below
        arrived = tl.atomic_add(count_ptr + head, 1, sem="acq_rel", scope="gpu")
        if arrived == HALF - 1:  # the head's last program: `_rope_qk_kernel` for this head
            base = out_ptr + head.to(tl.int64) * (2 * HALF) + d
            x1 = tl.load(base, cache_modifier=".cg")
            x2 = tl.load(base + HALF, cache_modifier=".cg")
            x1 = x1.to(tl.float32)
            x2 = x2.to(tl.float32)
            inv = 1.0 / tl.sqrt_rn((tl.sum(x1 * x1, 0) + tl.sum(x2 * x2, 0)) / (2 * HALF) + eps)
            x1 = (nw1.to(tl.float32) * (x1 * inv).to(dt).to(tl.float32)).to(dt).to(tl.float32)
            x2 = (nw2.to(tl.float32) * (x2 * inv).to(dt).to(tl.float32)).to(dt).to(tl.float32)
            r1, r2 = _rotate(x1, x2, c, s)
            r1 = r1.to(dt)
            r2 = r2.to(dt)
            tl.store(base, r1)
            tl.store(base + HALF, r2)
            if WRITE_KV:
                if (slot >= 0) & (head >= num_q_heads):
                    cdt = cache_ptr.dtype.element_ty
                    dst = cache_ptr + slot * stride_slot + (head - num_q_heads).to(tl.int64) * stride_head + d
                    tl.store(dst, r1.to(cdt))
                    tl.store(dst + HALF, r2.to(cdt))
            tl.store(count_ptr + head, 0)  # ready for the next call


def gemv_qk_norm_rope_(
    x: torch.Tensor,  # [1, K]
    weight: torch.Tensor,  # [(Hq + 2 Hkv) * D, K]
    positions: torch.Tensor,  # [1]
    cos_sin: torch.Tensor,  # [max_pos, D] fp32
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    q_weight: torch.Tensor,  # [D]
    k_weight: torch.Tensor,  # [D]
    eps: float,
    counts: torch.Tensor,  # int32 [>= Hq + Hkv], zero; the kernel leaves it zero
    kv_cache: torch.Tensor | None = None,  # [2, blocks, block_size, kv_heads, D]: also store k, v
    slot_mapping: torch.Tensor | None = None,  # [1] int64, -1 = skip
) -> torch.Tensor:  # [1, (Hq + 2 Hkv) * D]
    """`rope_qk_(gemv(x, weight), ..., q_weight, k_weight, eps)` (no bias) in one kernel."""
    n, k = weight.shape
    if n != (num_q_heads + 2 * num_kv_heads) * head_dim or head_dim % 2 or head_dim & (head_dim - 1):
        raise ValueError(f"gemv_qk_norm_rope_: weight of {n} rows is not q, k and v heads of size {head_dim} "
                         f"(a power of 2)")
    if counts.numel() < num_q_heads + num_kv_heads or counts.dtype != torch.int32:
        raise ValueError(f"gemv_qk_norm_rope_: counts must be int32 with >= {num_q_heads + num_kv_heads} entries")
    out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    _, block_k, warps = gemv_config(n, k)
    write = kv_cache is not None
    use_pdl = pdl.enabled(x.device)
    _gemv_qk_norm_rope_kernel[(n // 2,)](
        x, weight, out, positions, cos_sin, q_weight, k_weight, counts,
        kv_cache if write else weight, slot_mapping if write else positions,
        k, weight.stride(0), cos_sin.stride(0), num_q_heads, num_q_heads + num_kv_heads,
        kv_cache.stride(0) if write else 0, kv_cache.stride(2) if write else 0, kv_cache.stride(3) if write else 0,
        eps,
        HALF=head_dim // 2, BLOCK_K=block_k, EVEN_K=k % block_k == 0, WRITE_KV=write,
        PRE=_preload_tiles(use_pdl, k, block_k), PDL=use_pdl, num_warps=warps, launch_pdl=use_pdl,
    )
    return out
