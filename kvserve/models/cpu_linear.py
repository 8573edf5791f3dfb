"""bf16 linear layers with oneDNN-prepacked weights for CPU inference.

PyTorch's default bf16 `linear` on CPU re-lays the weight out for every call, which makes the
small-batch matmuls of decode about twice as slow as reading the weight once; prepacking the
weight into oneDNN's blocked layout up front removes that (identical results, measured in
benchmarks/RESULTS.md). Large-batch (prefill) matmuls run at the same speed either way.

Products of at most `cpu_kernels.MAX_ROWS` rows (batch-1 and small-batch decode) go to the
streaming GEMV kernel of `cpu_kernels` where the CPU has AVX512-BF16, which reads the plain weight
at close to the memory bandwidth; the layer then keeps the plain weight as well as the packed
one (twice the bf16 weight memory, for the speed of decode).
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

from kvserve.models import cpu_kernels
from kvserve.models.layers import silu_and_mul

logger = logging.getLogger(__name__)


def prepack_supported(device: torch.device, dtype: torch.dtype) -> bool:
    return (
        device.type == "cpu"
        and dtype == torch.bfloat16
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


class PackedLinear(nn.Module):
    """Inference-only stand-in for `nn.Linear` holding a prepacked weight."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        w = linear.weight.detach()
        # The batch-size hint only tunes the layout; any batch size is accepted.
        self.register_buffer("packed_weight", torch.ops.mkldnn._reorder_linear_weight(w, 1), persistent=False)
        self.bias = linear.bias
        self._gemv = cpu_kernels.load()
        # The plain [out, in] weight for the GEMV kernel (shared with a tied embedding).
        self.weight = w.contiguous() if self._gemv is not None else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # Straight to forward: nn.Module's hook dispatch costs microseconds per call, which
        # adds up over the ~120 linears of a CPU decode step. (No hooks on these layers.)
        return self.forward(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self._gemv is not None and x2.shape[0] <= cpu_kernels.MAX_ROWS and x2.dtype == torch.bfloat16:
            out = cpu_kernels.gemv(self._gemv, self.weight, x2, self.bias)
        else:
            out = torch.ops.mkldnn._linear_pointwise(x2, self.packed_weight, self.bias, "none", [], "")
        return out.view(*shape[:-1], self.out_features)

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up of this fused gate/up projection's output, in one kernel for a few
        rows (the [T, 2I] product is never materialized)."""
        x2 = x.reshape(-1, self.in_features)
        if self._gemv is not None and self.bias is None and cpu_kernels.usable(x2):
            out = cpu_kernels.gemv_silu_mul(self.weight, x2)
            return out.view(*x.shape[:-1], out.shape[-1])
        return silu_and_mul(self(x))


def prepack_linears(model: nn.Module) -> int:
    """Replace every `nn.Linear` in `model` by a `PackedLinear`. Returns how many."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, PackedLinear(child))
                count += 1
    logger.info("prepacked %d linear layers for oneDNN bf16", count)
    return count
