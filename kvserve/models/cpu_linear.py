"""bf16 linear layers with oneDNN-prepacked weights for CPU inference.

PyTorch's default bf16 `linear` on CPU re-lays the weight out for every call, which makes the
small-batch matmuls of decode about twice as slow as reading the weight once; prepacking the
weight into oneDNN's blocked layout up front removes that (identical results, measured in
benchmarks/RESULTS.md). Large-batch (prefill) matmuls run at the same speed either way.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        out = torch.ops.mkldnn._linear_pointwise(
            x.reshape(-1, self.in_features), self.packed_weight, self.bias, "none", [], ""
        )
        return out.view(*shape[:-1], self.out_features)


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
