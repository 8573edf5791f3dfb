"""Fused RMSNorm(+residual), SiLU·mul and RoPE(+q/k norm) for CUDA tensors.

The model layers call `enabled_for(x)` and take these paths only for CUDA tensors; on the CPU
they keep their plain PyTorch code (bit-identical to HF transformers in fp32). The kernels
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


def _one_row(module: torch.nn.Linear, x: torch.Tensor) -> bool:
    """x is one contiguous row in the layer's dtype: the Triton GEMV kernels apply."""
    return x.dim() == 2 and x.shape[0] == 1 and x.dtype == module.weight.dtype and x.stride(1) == 1


def _linear_forward(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if _one_row(module, x):
        from kvserve.models import triton_ops

        return triton_ops.gemv(x, module.weight, module.bias)
    return torch.nn.functional.linear(x, module.weight, module.bias)


def use_triton_gemv(model: torch.nn.Module) -> int:
    """Send the one-row products of the model's 16-bit CUDA `nn.Linear` layers (batch-1
    decode, and the LM head of a step that samples one row) to the Triton GEMV, which reads
    the weights faster than cuBLAS at every Llama shape measured (see `triton_ops.gemv_config`);
    a fused gate/up projection also gets the GEMV with SiLU·mul in its epilogue. Other row
    counts keep `F.linear`. Returns how many layers were routed."""
    n = 0
    for name, module in model.named_modules():
        w = getattr(module, "weight", None)
        if (
            type(module) is torch.nn.Linear
            and w is not None
            and enabled_for(w)
            and w.dtype in (torch.float16, torch.bfloat16)
            and w.stride(1) == 1
        ):
            module.forward = functools.partial(_linear_forward, module)
            if name.endswith("gate_up_proj"):  # read by layers.gate_up_silu_and_mul
                module.silu_and_mul = functools.partial(_gate_up_silu_forward, module)
            if name.endswith("qkv_proj"):  # read by qkv_rope_ (llama.LlamaAttention)
                module.gemv_rope_ = functools.partial(_qkv_rope_forward, module)
            n += 1
    return n


def _gate_up_silu_forward(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of a fused gate/up projection: one kernel for one row, else the
    projection then the SiLU·mul kernel (the same bits)."""
    if _one_row(module, x):
        from kvserve.models import triton_ops

        return triton_ops.gemv_silu_mul(x, module.weight, module.bias)
    return silu_and_mul(module(x))


def _qkv_rope_forward(module: torch.nn.Linear, x: torch.Tensor, *args, **kwargs) -> torch.Tensor | None:
    if _one_row(module, x):
        from kvserve.models import triton_ops

        return triton_ops.gemv_rope_(x, module.weight, module.bias, *args, **kwargs)
    return None


def qkv_rope_(
    qkv_proj: torch.nn.Module,
    x: torch.Tensor,  # [T, hidden]
    positions: torch.Tensor,
    cos_sin: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    kv_cache: torch.Tensor | None = None,
    slot_mapping: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """The fused q/k/v projection of one row with q and k rotated (and, with `kv_cache`, k
    and v stored in the cache) in one kernel: the bits of `qkv_proj(x)` then `rope_qk_`
    without q/k norm. None when the projection is not on the Triton GEMV (see
    `use_triton_gemv`) or `x` is not one contiguous row: the caller runs the two steps."""
    fused = getattr(qkv_proj, "gemv_rope_", None)
    if fused is None:
        return None
    return fused(x, positions, cos_sin, num_heads, num_kv_heads, head_dim, kv_cache, slot_mapping)


def build_cos_sin(inv_freq: torch.Tensor, max_positions: int) -> torch.Tensor:
    """[max_positions, head_dim] fp32 table, cos ‖ sin, with the same arithmetic as
    `RotaryEmbedding.cos_sin` (positions in fp32 times inv_freq)."""
    pos = torch.arange(max_positions, device=inv_freq.device, dtype=torch.float32)
    freqs = pos[:, None] * inv_freq[None, :].float()  # [P, D/2]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).contiguous()
