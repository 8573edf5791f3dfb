"""The row ops of a decoder layer (norm, activation, rotary embedding, q/k/v + RoPE), in plain
PyTorch: the native implementation every platform starts from and the oracle its kernels are
tested against.

A platform (`kvserve/platform/`) hands the model one `Ops` object when it builds the layers;
CPU and CUDA subclass it with their kernels (`platform/cpu_ops.py`, `platform/cuda_ops.py`),
so the model code never asks which device it runs on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from kvserve.models.layers import RotaryEmbedding, StepRope
    from kvserve.models.linear import Linear


class Ops:
    name = "torch"

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        # One op; in fp32 bit-identical to HF's `weight * (x * rsqrt(mean(x^2) + eps))`. In
        # bf16/fp16 it rounds once where HF rounds twice (at most one ulp apart).
        return F.rms_norm(x, weight.shape, weight, eps)

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual): the pre-norm block's add-then-norm."""
        residual = x + residual
        return self.rms_norm(residual, weight, eps), residual

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """[T, 2I] (gate ‖ up) -> [T, I]: silu(gate) * up."""
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate).mul_(up)  # into silu's fresh output: no third [T, I] tensor, same bits

    def gelu_tanh_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """[T, 2I] (gate ‖ up) -> [T, I]: gelu_tanh(gate) * up (GeGLU: Gemma's MLP)."""
        gate, up = x.chunk(2, dim=-1)
        return F.gelu(gate, approximate="tanh").mul_(up)

    def rope_for_step(self, rotary: RotaryEmbedding, positions: torch.Tensor, dtype: torch.dtype) -> StepRope:
        """What every layer of one step needs to rotate its q and k."""
        from kvserve.models.layers import StepRope

        cos, sin = rotary.cos_sin(positions, dtype)
        half = rotary.head_dim // 2
        sin_signed = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        return StepRope(cos=cos, sin_signed=sin_signed)

    def rotate(self, x: torch.Tensor, rope: StepRope) -> torch.Tensor:
        """RoPE on x [T, H, D] (any heads: q and k side by side rotate in one go) in four ops.
        `roll` by D/2 gives (x2, x1); times (-sin, sin) that is rotate_half(x) * sin exactly, so
        the result equals HF's `x * cos + rotate_half(x) * sin` bit for bit."""
        return x * rope.cos + torch.roll(x, x.shape[-1] // 2, dims=-1) * rope.sin_signed

    def qkv_rope(
        self,
        qkv_proj: Linear,
        x: torch.Tensor,  # [T, hidden]
        rope: StepRope,
        heads: tuple[int, int, int],  # (query heads, KV heads, head_dim) of this rank
        q_norm: torch.nn.Module | None,
        k_norm: torch.nn.Module | None,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
        backend_fuses_kv_write: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
        """q [T, Hq, D], k and v [T, Hkv, D] with q and k rotated (after the per-head q/k norm
        where the model has one), and whether k and v are already in the cache."""
        hq, hkv, d = heads
        t = x.shape[0]
        qkv = qkv_proj(x)  # [T, (Hq + 2 Hkv) D]
        if q_norm is None:  # rotate q and k together: fewer ops
            qk = self.rotate(qkv[:, : (hq + hkv) * d].view(t, hq + hkv, d), rope)
            return qk[:, :hq], qk[:, hq:], qkv[:, (hq + hkv) * d :].view(t, hkv, d), False
        q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
        q = self.rotate(q_norm(q.view(t, hq, d)), rope)
        k = self.rotate(k_norm(k.view(t, hkv, d)), rope)
        return q, k, v.view(t, hkv, d), False

    def route_experts(
        self, logits: torch.Tensor, top_k: int, renorm: bool, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A sparse MoE layer's routing: router logits [T, E] -> (weights [T, k] in `dtype`, expert
        ids [T, k] int64): softmax in fp32, the k largest, renormalized to sum to 1 if `renorm`
        (Qwen3-MoE's norm_topk_prob; Mixtral always), as HF's Qwen3-MoE and Mixtral blocks."""
        probs = torch.softmax(logits, dim=-1, dtype=torch.float)
        weights, ids = torch.topk(probs, top_k, dim=-1)
        if renorm:
            weights /= weights.sum(dim=-1, keepdim=True)
        return weights.to(dtype), ids

    def moe_norm_route(
        self, moe: torch.nn.Module, x: torch.Tensor, residual: torch.Tensor, norm: torch.nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """A sparse layer's post-attention add-and-RMSNorm, router projection and routing as one
        op where the platform has one for this batch: (norm(x + residual), x + residual, weights
        [T, k], ids [T, k]); else None (the layer runs the norm, then `route_experts`)."""
        return None

    def fused_moe_norm(
        self, moe: torch.nn.Module, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
        residual: torch.Tensor, norm: torch.nn.Module,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """`fused_moe` followed by the next pre-norm block's add-and-RMSNorm as one op where the
        platform has one for this batch: (norm(out + residual), out + residual); else None."""
        return None

    def fused_moe(
        self, moe: torch.nn.Module, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
    ) -> torch.Tensor | None:
        """A sparse MoE layer's expert MLPs as one fused op ([T, hidden] out, the routing weights
        applied and the k experts summed) where the platform has one for `moe`'s experts (CUDA:
        the Triton grouped GEMM over weights it stacked at load, `platform/cuda_moe.py`), else
        None: the model runs its own loop over the experts."""
        return None
