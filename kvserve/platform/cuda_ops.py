"""CUDA ops: the Triton kernels of `kvserve/models/triton_ops.py` (via `fused_ops`).

RMSNorm (with the residual add), SiLU·mul and RoPE are one kernel each; RoPE reads a cos/sin
table of every position built once per model (before any CUDA graph is captured), rotates q and
k in place inside the fused qkv output, applies the per-head q/k norm on the way and, for an
attention backend that allows it, stores k and v in the paged cache (one launch less). For one
row the projection itself joins in: the qkv GEMV with RoPE in its epilogue
(`TritonGemvLinearMethod.apply_qkv_rope`). A sparse MoE layer's experts run as the fused
Triton MoE (`kernels/triton_moe.py`) over the weights `platform/cuda_moe.py` stacked; by default
(`KVSERVE_MOE_DECODE=fused`) its routing is one Triton launch and the decode batches the pairs path
would take run the PDL expert kernels of `kernels/triton_moe_decode.py`; `KVSERVE_MOE_DECODE=torch`
keeps the routing as torch ops and the pairs kernels.
"""

from __future__ import annotations

import torch

from kvserve.models import fused_ops
from kvserve.models.layers import RotaryEmbedding, StepRope
from kvserve.models.linear import Linear
from kvserve.models.ops import Ops


class CudaTritonOps(Ops):
    name = "cuda-triton"

    def __init__(self) -> None:
        from kvserve.platform.cuda_moe import moe_decode_mode

        self.moe_decode = moe_decode_mode()  # KVSERVE_MOE_DECODE, checked when the engine is built

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return fused_ops.rmsnorm(x, weight, eps)

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return fused_ops.add_rmsnorm(x, residual, weight, eps)

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        return fused_ops.silu_and_mul(x)

    def rope_for_step(self, rotary: RotaryEmbedding, positions: torch.Tensor, dtype: torch.dtype) -> StepRope:
        if rotary.max_positions and rotary.head_dim & (rotary.head_dim - 1) == 0:
            table = rotary._cos_sin_table
            if table is None or table.device != positions.device:
                # Built on the first (eager) step, before any CUDA graph is captured.
                table = rotary._cos_sin_table = fused_ops.build_cos_sin(rotary.inv_freq, rotary.max_positions)
            return StepRope(positions=positions, cos_sin_table=table)
        return super().rope_for_step(rotary, positions, dtype)

    def qkv_rope(
        self,
        qkv_proj: Linear,
        x: torch.Tensor,
        rope: StepRope,
        heads: tuple[int, int, int],
        q_norm: torch.nn.Module | None,
        k_norm: torch.nn.Module | None,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
        backend_fuses_kv_write: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
        if not rope.fused:
            return super().qkv_rope(qkv_proj, x, rope, heads, q_norm, k_norm, kv_cache, slot_mapping, backend_fuses_kv_write)
        hq, hkv, d = heads
        t = x.shape[0]
        # The Triton backend lets the RoPE kernel also store k and v in the cache.
        kv_written = backend_fuses_kv_write
        cache, slots = (kv_cache, slot_mapping) if kv_written else (None, None)
        qkv = None
        if q_norm is None:  # one row (or 2..16 with KVSERVE_VERIFY_GEMM=triton): projection + RoPE (+ cache write) in one kernel
            qkv = qkv_proj.method.apply_qkv_rope(
                qkv_proj, x, rope.positions, rope.cos_sin_table, hq, hkv, d, cache, slots
            )
        if qkv is None:
            qkv = qkv_proj(x)  # [T, (Hq + 2 Hkv) D]; q/k norm + rotation in one kernel, in place
            fused_ops.rope_qk_(
                qkv, rope.positions, rope.cos_sin_table, hq, hkv, d, q_norm, k_norm,
                kv_cache=cache, slot_mapping=slots,
            )
        q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
        return q.view(t, hq, d), k.view(t, hkv, d), v.view(t, hkv, d), kv_written

    def fused_moe(
        self, moe: torch.nn.Module, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
    ) -> torch.Tensor | None:
        stacked = getattr(moe, "stacked_experts", None)  # platform/cuda_moe.py, after loading
        if stacked is None or not x.is_cuda or x.dtype != stacked[0].dtype:
            return None
        from kvserve.kernels import triton_moe

        w13, w2 = stacked
        return triton_moe.fused_moe(x.contiguous(), w13, w2, topk_weights, topk_ids,
                                    fused_decode=self.moe_decode == "fused")

    def route_experts(
        self, logits: torch.Tensor, top_k: int, renorm: bool, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.moe_decode != "fused" or not logits.is_cuda:
            return super().route_experts(logits, top_k, renorm, dtype)
        from kvserve.kernels import triton_moe_decode

        return triton_moe_decode.route(logits, top_k, renorm, dtype)
