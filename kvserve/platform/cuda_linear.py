"""16-bit projections on CUDA: the Triton GEMV for one row (batch-1 decode, and the LM head of
a step that samples one row), which reads the weights faster than cuBLAS at every Llama shape
measured (see `triton_ops.gemv_config`); cuBLAS (`F.linear`) for every other row count. A fused
gate/up projection gets the GEMV with SiLU·mul in its epilogue, a fused qkv projection the GEMV
with RoPE (and the K/V cache write) in its epilogue, and with `KVSERVE_QK_NORM_GEMV=1` one with
Qwen3's q/k norm as well (`models/triton_qk_norm.py`). 2..16 rows (a verify step, a small
decode batch) take the tensor-core verify GEMM of `kernels/triton_verify_gemm.py` with the same
fused epilogues and PDL (`KVSERVE_VERIFY_GEMM=triton`, the default since an H100 run timed it
faster, `benchmarks/spec_gpu_bench.py --only kernels,verify`; `cublas`: cuBLAS then the epilogue
kernels)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvserve.models.linear import DenseLinearMethod, Linear


def _one_row(layer: Linear, x: torch.Tensor) -> bool:
    """x is one contiguous row in the layer's dtype: the Triton GEMV kernels apply."""
    w = layer.weight
    return (
        x.dim() == 2 and x.shape[0] == 1 and x.dtype == w.dtype and x.stride(1) == 1
        and w.dtype in (torch.float16, torch.bfloat16) and w.stride(1) == 1
    )


def _few_rows(layer: Linear, x: torch.Tensor) -> bool:
    """x is 2..16 contiguous rows in the layer's dtype and KVSERVE_VERIFY_GEMM=triton."""
    w = layer.weight
    if not (x.dim() == 2 and 2 <= x.shape[0] <= 16 and x.dtype == w.dtype and x.stride(1) == 1
            and w.dtype in (torch.float16, torch.bfloat16) and w.stride(1) == 1):
        return False
    from kvserve.kernels import triton_verify_gemm

    return triton_verify_gemm.requested()


class TritonGemvLinearMethod(DenseLinearMethod):
    name = "dense-triton-gemv"

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        if _one_row(layer, x):
            from kvserve.models import triton_ops

            return triton_ops.gemv(x, layer.weight, layer.bias)
        if _few_rows(layer, x):
            from kvserve.kernels import triton_verify_gemm

            return triton_verify_gemm.verify_gemm(x, layer.weight, layer.bias)
        return F.linear(x, layer.weight, layer.bias)

    def apply_silu_mul(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        """One kernel for one row, else the projection then the SiLU·mul kernel (the same bits)."""
        if _one_row(layer, x):
            from kvserve.models import triton_ops

            return triton_ops.gemv_silu_mul(x, layer.weight, layer.bias)
        if _few_rows(layer, x):
            from kvserve.kernels import triton_verify_gemm

            return triton_verify_gemm.verify_gemm_silu_mul(x, layer.weight, layer.bias)
        return self.ops.silu_and_mul(self.apply(layer, x))

    def apply_qkv_rope(self, layer: Linear, x: torch.Tensor, *args) -> torch.Tensor | None:
        if _one_row(layer, x):
            from kvserve.models import triton_ops

            return triton_ops.gemv_rope_(x, layer.weight, layer.bias, *args)
        if _few_rows(layer, x):
            from kvserve.kernels import triton_verify_gemm

            if triton_verify_gemm.supports_rope(args[4]):  # args: positions, cos_sin, hq, hkv, head_dim, ...
                return triton_verify_gemm.verify_gemm_rope_(x, layer.weight, layer.bias, *args)
        return None

    def apply_qkv_norm_rope(self, layer: Linear, x: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
                            hq: int, hkv: int, d: int, q_norm: torch.nn.Module, k_norm: torch.nn.Module,
                            kv_cache: torch.Tensor | None, slots: torch.Tensor | None) -> torch.Tensor | None:
        """The qkv GEMV with the per-head q/k norm, RoPE and the K/V store in its epilogue
        (`triton_qk_norm.gemv_qk_norm_rope_`) for one row without bias; None otherwise."""
        if not _one_row(layer, x) or layer.bias is not None or d & (d - 1) or q_norm.eps != k_norm.eps:
            return None
        from kvserve.models import triton_qk_norm

        counts = getattr(layer, "_qk_counts", None)
        if counts is None or counts.device != x.device:
            # Allocated on the first (eager) step, before any CUDA graph is captured; the kernel
            # leaves the counters at zero.
            counts = layer._qk_counts = torch.zeros(hq + hkv, dtype=torch.int32, device=x.device)
        return triton_qk_norm.gemv_qk_norm_rope_(x, layer.weight, positions, cos_sin, hq, hkv, d, q_norm.weight,
                                                 k_norm.weight, q_norm.eps, counts, kv_cache, slots)
