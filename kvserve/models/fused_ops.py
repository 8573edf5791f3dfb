"""Fused RMSNorm(+residual), SiLU·mul and RoPE(+q/k norm) for CUDA tensors.

The CUDA platform's ops (`kvserve/platform/cuda_ops.py`) call these; the model never does. The kernels
live in `triton_ops.py`, imported on first use so that CPU-only installs never import Triton.
Set `KVSERVE_FUSED_OPS=0` to run the unfused PyTorch code on the GPU too (for comparisons).

Why Triton kernels rather than `torch.compile`: the runner captures decode steps into CUDA
graphs itself and runs prefill eagerly at arbitrary token counts; compiled regions would need
dynamic shapes and their own graph handling, while a kernel is one launch at any size.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch


def available() -> bool:
    """Triton and a CUDA device are there, and `KVSERVE_FUSED_OPS` is not 0."""
    return _available()


@functools.cache
def _available() -> bool:
    if os.environ.get("KVSERVE_FUSED_OPS", "1") == "0":
        return False
    try:
        return importlib.util.find_spec("triton") is not None and torch.cuda.is_available()
    except (ImportError, ValueError):
        return False


def enabled_for(x: torch.Tensor) -> bool:
    """True when `x` lives on a CUDA device and the fused kernels can run."""
    return x.is_cuda and _available()


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    from kvserve.models import triton_ops

    shape = x.shape
    out, _ = triton_ops.rmsnorm(x.reshape(-1, shape[-1]), weight, eps)
    return out.view(shape)


def add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(x + residual), x + residual) in one pass."""
    from kvserve.models import triton_ops

    shape = x.shape
    out, res = triton_ops.rmsnorm(x.reshape(-1, shape[-1]), weight, eps, residual.reshape(-1, shape[-1]))
    return out.view(shape), res.view(shape)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    from kvserve.models import triton_ops

    return triton_ops.silu_and_mul(x)


def rope_qk_(
    qkv: torch.Tensor,  # [T, (Hq + 2 Hkv) * D]
    positions: torch.Tensor,  # [T]
    cos_sin: torch.Tensor,  # [max_pos, D] fp32 (cos ‖ sin)
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    q_norm: torch.nn.Module | None = None,
    k_norm: torch.nn.Module | None = None,
    kv_cache: torch.Tensor | None = None,
    slot_mapping: torch.Tensor | None = None,
) -> None:
    """Rotate q and k inside the fused qkv projection output, in place (after the per-head
    q/k RMSNorm when `q_norm`/`k_norm` are given). With `kv_cache` and `slot_mapping` it also
    stores this step's k and v in the paged cache (for a backend that then skips its own
    write: `TritonBackend.forward(..., kv_written=True)`)."""
    from kvserve.models import triton_ops

    if qkv.stride(-1) != 1:
        raise ValueError("rope_qk_ needs the qkv rows to be contiguous")
    triton_ops.rope_qk_(
        qkv, positions, cos_sin, num_heads, num_kv_heads, head_dim,
        q_norm.weight if q_norm is not None else None,
        k_norm.weight if k_norm is not None else None,
        q_norm.eps if q_norm is not None else 1e-6,
        kv_cache=kv_cache, slot_mapping=slot_mapping,
    )


def build_cos_sin(inv_freq: torch.Tensor, max_positions: int) -> torch.Tensor:
    """[max_positions, head_dim] fp32 table, cos ‖ sin, with the same arithmetic as
    `RotaryEmbedding.cos_sin` (positions in fp32 times inv_freq)."""
    pos = torch.arange(max_positions, device=inv_freq.device, dtype=torch.float32)
    freqs = pos[:, None] * inv_freq[None, :].float()  # [P, D/2]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).contiguous()
