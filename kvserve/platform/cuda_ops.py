"""CUDA ops: the Triton kernels of `kvserve/models/triton_ops.py` (via `fused_ops`).

RMSNorm (with the residual add), SiLU·mul and RoPE are one kernel each; RoPE reads a cos/sin
table of every position built once per model (before any CUDA graph is captured), rotates q and
k in place inside the fused qkv output, applies the per-head q/k norm on the way and, for an
attention backend that allows it, stores k and v in the paged cache (one launch less). For one
row the projection itself joins in: the qkv GEMV with RoPE in its epilogue
(`TritonGemvLinearMethod.apply_qkv_rope`; with Qwen3's q/k norm too when `KVSERVE_QK_NORM_GEMV=1`,
`apply_qkv_norm_rope`). A sparse MoE layer's experts run as the fused
Triton MoE (`kernels/triton_moe.py`) over the weights `platform/cuda_moe.py` stacked; by default
(`KVSERVE_MOE_DECODE=fused`) its routing is one Triton launch and the decode batches the pairs path
would take run the PDL expert kernels of `kernels/triton_moe_decode.py`; `KVSERVE_MOE_DECODE=torch`
keeps the routing as torch ops and the pairs kernels; `KVSERVE_MOE_DECODE=fused-router` also does a
decode batch's post-attention add-and-norm, router projection and routing in one launch.
For FP8 weights with `KVSERVE_FP8_FUSED_ACT=1` the norm and SiLU·mul kernels of batches the FP8
projections run through `_scaled_mm` also write their output in e4m3 with per-row scales, carried
on the output tensor (`fused_ops.fp8_activation`) for those projections.
"""

from __future__ import annotations

import os

import torch

from kvserve.models import fused_ops
from kvserve.models.layers import RotaryEmbedding, StepRope
from kvserve.models.linear import Linear
from kvserve.models.ops import Ops


def qk_norm_gemv_mode() -> bool:
    """`KVSERVE_QK_NORM_GEMV`: "1" gives one-row qkv projections with a q/k norm (Qwen3, Qwen3-MoE)
    the GEMV with the norm, RoPE and the K/V store in its epilogue (`models/triton_qk_norm.py`);
    "0" (the default) keeps the GEMV then the `rope_qk_` kernel; other values are an error."""
    value = os.environ.get("KVSERVE_QK_NORM_GEMV", "0")
    if value not in ("0", "1"):
        raise ValueError(f"KVSERVE_QK_NORM_GEMV must be 0 or 1 (got {value!r})")
    return value == "1"


class CudaTritonOps(Ops):
    name = "cuda-triton"

    def __init__(self) -> None:
        from kvserve.platform.cuda_moe import moe_decode_mode, moe_decode_tiles

        self.moe_decode = moe_decode_mode()  # KVSERVE_MOE_DECODE, checked when the engine is built
        self.moe_decode_tiles = moe_decode_tiles()  # KVSERVE_MOE_DECODE_TILES, likewise
        self.qk_norm_gemv = qk_norm_gemv_mode()  # KVSERVE_QK_NORM_GEMV, likewise
        # Set by the platform for FP8 weights with KVSERVE_FP8_FUSED_ACT=1: batches of more rows
        # than this (the rows FP8 projections take through `_scaled_mm`) get norm and SiLU·mul
        # outputs that also carry their FP8 form (`fused_ops.fp8_activation`).
        self.fp8_act_rows: int | None = None
        # Set by the platform where one-row int4 / int8 products take the half-math GEMV: one-row
        # norm outputs also carry its activation pairs (`fused_ops.half_pairs`).
        self.half_pairs = False

    def _fp8_act(self, x: torch.Tensor, cols: int) -> bool:
        rows = self.fp8_act_rows
        return (rows is not None and x.dim() == 2 and x.shape[0] > rows and cols % 16 == 0
                and x.dtype in (torch.bfloat16, torch.float16))

    def _half_pairs(self, x: torch.Tensor) -> bool:
        return (self.half_pairs and x.dim() == 2 and x.shape[0] == 1 and x.shape[1] % 32 == 0
                and x.dtype in (torch.bfloat16, torch.float16))

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        if self._fp8_act(x, x.shape[-1]):
            return fused_ops.rmsnorm_fp8(x, weight, eps)
        if self._half_pairs(x):
            return fused_ops.rmsnorm_pairs(x, weight, eps)
        return fused_ops.rmsnorm(x, weight, eps)

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self._fp8_act(x, x.shape[-1]) and residual.shape == x.shape:
            return fused_ops.add_rmsnorm_fp8(x, residual, weight, eps)
        if self._half_pairs(x) and residual.shape == x.shape:
            return fused_ops.add_rmsnorm_pairs(x, residual, weight, eps)
        return fused_ops.add_rmsnorm(x, residual, weight, eps)

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        if self._fp8_act(x, x.shape[-1] // 2):
            return fused_ops.silu_and_mul_fp8(x)
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
        elif self.qk_norm_gemv and k_norm is not None:  # the same with the q/k norm (opt-in)
            fused = getattr(qkv_proj.method, "apply_qkv_norm_rope", None)
            if fused is not None:
                qkv = fused(qkv_proj, x, rope.positions, rope.cos_sin_table, hq, hkv, d, q_norm, k_norm, cache, slots)
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
                                    fused_decode=self.moe_decode != "torch", decode_configs=self.moe_decode_tiles)

    def moe_norm_route(
        self, moe: torch.nn.Module, x: torch.Tensor, residual: torch.Tensor, norm: torch.nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """`KVSERVE_MOE_DECODE=fused-router`: the add-and-norm, router and routing of a decode
        batch in one launch (`triton_moe_decode.norm_route`)."""
        from kvserve.kernels import triton_moe_decode as tmd

        router = moe.gate.weight
        if (self.moe_decode not in ("fused-router", "fused-chain") or not x.is_cuda or x.dim() != 2
                or x.shape[0] > tmd.NORM_ROUTE_MAX_ROWS or not isinstance(router, torch.Tensor)
                or router.dtype != x.dtype or residual.dtype != x.dtype or norm.weight.dtype != x.dtype
                or moe.gate.bias is not None):
            return None
        counts = getattr(moe, "_route_counts", None)
        if counts is None or counts.device != x.device:
            # Allocated on the first (eager) step, before any CUDA graph is captured; the kernel
            # leaves the counters at zero.
            counts = moe._route_counts = torch.zeros(tmd.NORM_ROUTE_MAX_ROWS, dtype=torch.int32, device=x.device)
        stacked = getattr(moe, "stacked_experts", None)  # its gate/up rows are prefetched into L2
        return tmd.norm_route(x.contiguous(), residual.contiguous(), norm.weight, norm.eps, router,
                              moe.top_k, moe.renorm, counts, w13=stacked[0] if stacked is not None else None)

    def fused_moe_norm(
        self, moe: torch.nn.Module, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
        residual: torch.Tensor, norm: torch.nn.Module,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """`KVSERVE_MOE_DECODE=fused-chain`: the decode expert kernels with the next add-and-norm in
        the down kernel's epilogue (`fused_moe_decode(next_norm=...)`) -> (norm(out + residual),
        out + residual), for the batches the decode kernels take; else None."""
        from kvserve.kernels import triton_moe, triton_moe_decode as tmd

        stacked = getattr(moe, "stacked_experts", None)
        if (self.moe_decode != "fused-chain" or stacked is None or not x.is_cuda or x.dtype != stacked[0].dtype
                or x.shape[0] > tmd.NORM_ROUTE_MAX_ROWS or residual.dtype != x.dtype or norm.weight.dtype != x.dtype
                or not triton_moe.use_pairs(x.shape[0], stacked[0].shape[0], topk_ids.shape[1])):
            return None
        counts = getattr(moe, "_norm_counts", None)
        if counts is None or counts.device != x.device:  # first (eager) step, as moe_norm_route's
            counts = moe._norm_counts = torch.zeros(tmd.NORM_ROUTE_MAX_ROWS, dtype=torch.int32, device=x.device)
        w13, w2 = stacked
        return tmd.fused_moe_decode(x.contiguous(), w13, w2, topk_weights, topk_ids, configs=self.moe_decode_tiles,
                                    next_norm=(residual.contiguous(), norm.weight, norm.eps, counts))

    def route_experts(
        self, logits: torch.Tensor, top_k: int, renorm: bool, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.moe_decode == "torch" or not logits.is_cuda:
            return super().route_experts(logits, top_k, renorm, dtype)
        from kvserve.kernels import triton_moe_decode

        return triton_moe_decode.route(logits, top_k, renorm, dtype)
