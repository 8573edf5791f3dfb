"""bf16 projections on CPUs with native bf16 (AVX512-BF16): oneDNN-prepacked weights, and the
streaming bf16 GEMV C kernel for a few rows.

PyTorch's default bf16 `linear` on CPU re-lays the weight out for every call, which makes the
small-batch matmuls of decode about twice as slow as reading the weight once; prepacking the
weight into oneDNN's blocked layout up front removes that (identical results, measured in
benchmarks/RESULTS.md). Large-batch (prefill) matmuls run at the same speed either way.

Products of at most `cpu_kernels.MAX_ROWS` rows (batch-1 and small-batch decode) go to the
streaming GEMV kernel of `cpu_kernels`, which reads the plain weight at close to the memory
bandwidth; the layer then keeps the plain weight as well as the packed one (twice the bf16
weight memory, for the speed of decode).

The platform picks this method only where oneDNN has a bf16 path on this CPU
(`torch.ops.mkldnn._is_mkldnn_bf16_supported()`): elsewhere prepacking raises, so bf16 layers
keep `DenseLinearMethod`.
"""

from __future__ import annotations

import torch

from kvserve.models import cpu_kernels
from kvserve.models.linear import DenseLinearMethod, Linear


def onednn_bf16_supported() -> bool:
    """oneDNN can prepack and run bf16 linears on this CPU (AVX512-BW/VL/DQ or AVX-NE-CONVERT)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class PackedBf16LinearMethod(DenseLinearMethod):
    name = "dense-bf16-onednn"

    def __init__(self, use_gemv: bool) -> None:
        self.use_gemv = use_gemv  # the bf16 C kernels loaded (AVX512-BF16)

    def finish(self, layer: Linear) -> None:
        w = layer.weight.detach()
        if w.dtype != torch.bfloat16:
            return  # only bf16 weights are packed
        # The batch-size hint only tunes the layout; any batch size is accepted.
        layer.packed_weight = torch.ops.mkldnn._reorder_linear_weight(w, 1)
        layer.gemv = cpu_kernels.load() if self.use_gemv else None
        if layer.gemv is not None and not w.is_contiguous():
            layer.weight = torch.nn.Parameter(w.contiguous(), requires_grad=False)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        packed = getattr(layer, "packed_weight", None)
        if packed is None:
            return super().apply(layer, x)
        shape = x.shape
        x2 = x.reshape(-1, layer.in_features)
        if layer.gemv is not None and x2.shape[0] <= cpu_kernels.MAX_ROWS and x2.dtype == torch.bfloat16:
            out = cpu_kernels.gemv(layer.gemv, layer.weight, x2, layer.bias)
        else:
            out = torch.ops.mkldnn._linear_pointwise(x2, packed, layer.bias, "none", [], "")
        return out.view(*shape[:-1], layer.out_features)

    def apply_silu_mul(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up of this fused gate/up projection's output, in one kernel for a few
        rows (the [T, 2I] product is never materialized)."""
        x2 = x.reshape(-1, layer.in_features)
        if getattr(layer, "gemv", None) is not None and layer.bias is None and cpu_kernels.usable(x2):
            out = cpu_kernels.gemv_silu_mul(layer.weight, x2)
            return out.view(*x.shape[:-1], out.shape[-1])
        return super().apply_silu_mul(layer, x)

    def describe(self, layer: Linear) -> str:
        return self.name + ("+gemv" if getattr(layer, "gemv", None) is not None else "")
