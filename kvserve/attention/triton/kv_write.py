"""Fused scatter of one step's new K and V into the paged cache (one launch for both)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize_on_alignment=["slot_ptr"])
def _write_kv_kernel(
    k_ptr,
    v_ptr,
    cache_ptr,
    slot_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_plane,  # elements between the K and V halves of the cache
    stride_slot,  # elements between consecutive token slots (= num_kv_heads * head_dim)
    stride_head,  # elements between KV heads inside a slot (= head_dim)
    num_kv_heads,
    H_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    tok = tl.program_id(0)
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    if slot < 0:  # padding token of a CUDA-graph batch: nothing to store
        return
    offs_h = tl.arange(0, H_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    mask = (offs_h < num_kv_heads)[:, None]
    tok64 = tok.to(tl.int64)
    k_src = k_ptr + tok64 * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :]
    v_src = v_ptr + tok64 * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :]
    k = tl.load(k_src, mask=mask)  # [H_PAD, HEAD_DIM]
    v = tl.load(v_src, mask=mask)
    dst = cache_ptr + slot * stride_slot + offs_h[:, None] * stride_head + offs_d[None, :]
    tl.store(dst, k.to(cache_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + stride_plane, v.to(cache_ptr.dtype.element_ty), mask=mask)


def write_kv_cache_triton(
    k: torch.Tensor,  # [T, num_kv_heads, head_dim]
    v: torch.Tensor,  # [T, num_kv_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim], contiguous
    slot_mapping: torch.Tensor,  # [T] int64, -1 = skip
) -> None:
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    # k/v usually arrive as views into a fused qkv projection: any token/head stride is fine,
    # but the head_dim elements must be contiguous.
    if k.stride(2) != 1:
        k = k.contiguous()
    if v.stride(2) != 1:
        v = v.contiguous()
    _write_kv_kernel[(num_tokens,)](
        k,
        v,
        kv_cache,
        slot_mapping,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        kv_cache.stride(0),
        kv_cache.stride(2),
        kv_cache.stride(3),
        num_kv_heads,
        H_PAD=triton.next_power_of_2(num_kv_heads),
        HEAD_DIM=head_dim,
        num_warps=4 if num_kv_heads * head_dim >= 1024 else 1,
    )
