"""16-bit projections on CUDA: the Triton GEMV for one row (batch-1 decode, and the LM head of
a step that samples one row), which reads the weights faster than cuBLAS at every Llama shape
measured (see `triton_ops.gemv_config`); the Triton skinny product (`kernels/triton_skinny.py`:
the same weight stream with one accumulator per row) for 2..`SKINNY_MAX_ROWS` rows (speculative
verify steps at small batch, plain decode at batch 2..8; opt-in, `KVSERVE_SKINNY_MAX_ROWS=8`, until
measured on a GPU); cuBLAS (`F.linear`) for more rows. A
fused gate/up projection gets SiLU·mul in the Triton kernels' epilogue, a fused qkv projection
RoPE (and the K/V cache write)."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from kvserve.models.linear import DenseLinearMethod, Linear


def _skinny_max_rows() -> int:
    value = os.environ.get("KVSERVE_SKINNY_MAX_ROWS", "1")
    if value not in {str(i) for i in range(1, 9)}:
        raise ValueError(f"KVSERVE_SKINNY_MAX_ROWS must be an integer from 1 (off) to 8, got {value!r}")
    return int(value)


# Rows up to which a 16-bit product takes the Triton skinny kernel instead of cuBLAS (1 = never;
# at most 8, the kernel's accumulators). Off by default: the kernel has passed its checks under
# the Triton interpreter and its compiled sm_90 SASS has been read, but it has not run on a GPU
# (an earlier kernel that read better in SASS measured slower there). KVSERVE_SKINNY_MAX_ROWS=8
# turns it on; benchmarks/spec_gpu_bench.py --only kernels,verify measures it on and off. Read at
# every call, so a benchmark can set it on the module.
SKINNY_MAX_ROWS = _skinny_max_rows()


def _triton_rows(layer: Linear, x: torch.Tensor) -> int:
    """The number of rows of x if the Triton GEMV (1 row) or skinny (2..SKINNY_MAX_ROWS rows)
    kernels apply (x's rows have contiguous columns in the layer's 16-bit dtype), else 0."""
    w = layer.weight
    ok = (
        x.dim() == 2 and 1 <= x.shape[0] <= max(1, SKINNY_MAX_ROWS) and x.dtype == w.dtype and x.stride(1) == 1
        and w.dtype in (torch.float16, torch.bfloat16) and w.stride(1) == 1
    )
    return x.shape[0] if ok else 0


class TritonGemvLinearMethod(DenseLinearMethod):
    name = "dense-triton-gemv"

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        rows = _triton_rows(layer, x)
        if rows == 1:
            from kvserve.models import triton_ops

            return triton_ops.gemv(x, layer.weight, layer.bias)
        if rows:
            from kvserve.kernels import triton_skinny

            return triton_skinny.skinny(x, layer.weight, layer.bias)
        return F.linear(x, layer.weight, layer.bias)

    def apply_silu_mul(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        """One kernel for 1..SKINNY_MAX_ROWS rows, else the projection then the SiLU·mul kernel
        (the same rounding points)."""
        rows = _triton_rows(layer, x)
        if rows == 1:
            from kvserve.models import triton_ops

            return triton_ops.gemv_silu_mul(x, layer.weight, layer.bias)
        if rows:
            from kvserve.kernels import triton_skinny

            return triton_skinny.skinny_silu_mul(x, layer.weight, layer.bias)
        return self.ops.silu_and_mul(self.apply(layer, x))

    def apply_qkv_rope(self, layer: Linear, x: torch.Tensor, *args) -> torch.Tensor | None:
        rows = _triton_rows(layer, x)
        if rows == 1:
            from kvserve.models import triton_ops

            return triton_ops.gemv_rope_(x, layer.weight, layer.bias, *args)
        if rows:
            from kvserve.kernels import triton_skinny

            return triton_skinny.skinny_rope_(x, layer.weight, layer.bias, *args)
        return None
