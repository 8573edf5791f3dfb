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


# -- FP8 activations written by the kernel that produces them ----------------------------------
# A norm or SiLU·mul whose output feeds FP8 projections can also write that output as
# `act_quant_fp8` would (FP8 rows and per-row scales: `rmsnorm_fp8`, `silu_and_mul_fp8`). The
# pair travels on the output tensor itself (`fp8_activation`), so every other consumer (a bf16
# projection, the residual, an MoE block) reads the tensor as before and the model code does not
# change; the FP8 linear method takes the pair instead of quantizing again (platform/cuda_quant.py).
_FP8_ATTR = "_kvserve_fp8_act"


def fp8_activation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(float8_e4m3fn [T, K], fp32 scales [T, 1]) written with `x` by the kernel that produced it,
    or None. Only the tensor object the op returned carries it (a view or copy of it does not)."""
    return getattr(x, _FP8_ATTR, None)


def _with_fp8(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    setattr(x, _FP8_ATTR, (q, scale))
    return x


def _fp8_pair(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device),
            torch.empty((x.shape[0], 1), dtype=torch.float32, device=x.device))


def rmsnorm_fp8(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`rmsnorm` of x [T, H] carrying its `act_quant_fp8` (see `fp8_activation`), one kernel."""
    from kvserve.models import triton_ops

    pair = _fp8_pair(x)
    out, _ = triton_ops.rmsnorm(x, weight, eps, fp8_out=pair)
    return _with_fp8(out, *pair)


def add_rmsnorm_fp8(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`add_rmsnorm` of [T, H] rows, the normalized rows carrying their `act_quant_fp8`."""
    from kvserve.models import triton_ops

    pair = _fp8_pair(x)
    out, res = triton_ops.rmsnorm(x, weight, eps, residual, fp8_out=pair)
    return _with_fp8(out, *pair), res


def silu_and_mul_fp8(x: torch.Tensor) -> torch.Tensor:
    """`silu_and_mul` of [T, 2I] rows carrying its `act_quant_fp8`."""
    from kvserve.models import triton_ops

    out, q, scale = triton_ops.silu_and_mul_fp8(x)
    return _with_fp8(out, q, scale)


# -- activation pairs of the half-math GEMVs written by the norm that produces them -------------
# Where one-row int4 / int8 products take the half-math GEMV (KVSERVE_INT4_GEMV / KVSERVE_INT8_GEMV
# =half), the RMSNorm kernel also writes its output as `triton_qgemv_half.act_pairs` would (the
# same bits), carried on the output tensor as the FP8 pair is, so the qkv and gate/up products
# launch no activation kernel of their own.
_PAIRS_ATTR = "_kvserve_half_pairs"


def half_pairs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(int32 [T, K / 2] pairs, fp32 [T, K / 32] 2^(10 - c), fp32 [T, K / 32] block sums) written
    with `x` by the kernel that produced it, or None (only that tensor object carries them)."""
    return getattr(x, _PAIRS_ATTR, None)


def _new_pairs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    t, k = x.shape
    return (torch.empty((t, k // 2), dtype=torch.int32, device=x.device),
            torch.empty((t, k // 32), dtype=torch.float32, device=x.device),
            torch.empty((t, k // 32), dtype=torch.float32, device=x.device))


def rmsnorm_pairs(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`rmsnorm` of x [T, H] (H a multiple of 32) carrying its `act_pairs` (see `half_pairs`)."""
    from kvserve.models import triton_ops

    pairs = _new_pairs(x)
    out, _ = triton_ops.rmsnorm(x, weight, eps, pairs_out=pairs)
    setattr(out, _PAIRS_ATTR, pairs)
    return out


def add_rmsnorm_pairs(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`add_rmsnorm` of [T, H] rows, the normalized rows carrying their `act_pairs`."""
    from kvserve.models import triton_ops

    pairs = _new_pairs(x)
    out, res = triton_ops.rmsnorm(x, weight, eps, residual, pairs_out=pairs)
    setattr(out, _PAIRS_ATTR, pairs)
    return out, res


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
