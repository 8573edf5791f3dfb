"""Projections whose weight format and kernel are chosen once, by a linear method.

A model builds every projection as a `Linear` (the platform's `LayerBuilder.linear`), giving
only shapes: input features, the output rows of each fused part (q ‖ k ‖ v, gate ‖ up) and
whether it has a bias. How the weight is stored and multiplied belongs to the layer's
`LinearMethod`, picked by the platform for the device and the checkpoint's format:

- `DenseLinearMethod`: a plain [out, in] weight in the model's dtype and `F.linear`. The
  platforms subclass it for their kernels (oneDNN prepacking and the bf16 GEMV on CPUs with
  AVX512-BF16, the Triton GEMV on CUDA) without the model knowing.
- `GGMLLinearMethod` (`kvserve/platform/cpu_quant_linear.py`): GGUF's quantized blocks kept
  as they are in the file and multiplied with integer dot products.

A checkpoint tensor reaches `Linear.load_shard` either dense (`torch.Tensor`) or as a
`QuantizedTensor` (GGML block bytes); each method takes either and converts what it must, so
a layer never silently changes format and the loader never needs to know the method.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from kvserve.kernels import cpu_quant, mxfp4
from kvserve.models.layers import NATIVE_OPS, WeightLoadError, copy_into
from kvserve.models.ops import Ops

# GGML type id -> (values, bytes) per block, and -> name, for the formats the kernels take.
GGML_BLOCK = cpu_quant.BLOCKS
# Also MXFP4 (GGML type 39: gpt-oss's experts), which only `platform/mxfp4_linear.py` multiplies.
_BLOCK_OF = {**GGML_BLOCK, mxfp4.MXFP4: (mxfp4.BLOCK, mxfp4.BLOCK_BYTES)}
GGML_NAMES = {**{qtype: name for name, qtype in cpu_quant.QTYPES.items()}, mxfp4.MXFP4: "MXFP4"}


@dataclass
class QuantizedTensor:
    """A [rows, cols] matrix in a GGML block format: `data` is uint8 [rows, row_bytes], each
    row cols / block_size blocks, byte for byte as in the GGUF file."""

    qtype: int
    data: torch.Tensor  # uint8 [rows, row_bytes]
    cols: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.data.shape[0], self.cols)

    @property
    def name(self) -> str:
        return GGML_NAMES.get(self.qtype, str(self.qtype))

    def dim(self) -> int:
        return 2

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.qtype == mxfp4.MXFP4:
            return mxfp4.dequantize(self.data, self.cols, dtype)
        return cpu_quant.dequantize(self.qtype, self.data, self.cols).to(dtype)

    def narrow(self, dim: int, start: int, length: int) -> QuantizedTensor | torch.Tensor:
        """Rows slice in place; a column slice stays quantized only on block boundaries (else
        it is dequantized first: tensor parallelism of an odd-sized row-parallel shard)."""
        if dim == 0:
            return QuantizedTensor(self.qtype, self.data.narrow(0, start, length), self.cols)
        block, nbytes = _BLOCK_OF[self.qtype]
        if start % block or length % block:
            return self.dequantize().narrow(1, start, length)
        return QuantizedTensor(
            self.qtype, self.data.narrow(1, start // block * nbytes, length // block * nbytes), length
        )

    def pad_rows(self, rows: int) -> QuantizedTensor:
        """Zero rows appended (all-zero blocks dequantize to 0)."""
        if rows == self.data.shape[0]:
            return self
        pad = self.data.new_zeros(rows - self.data.shape[0], self.data.shape[1])
        return QuantizedTensor(self.qtype, torch.cat([self.data, pad]), self.cols)


class LinearMethod:
    """How a `Linear` stores and multiplies its weight. One instance serves every layer that
    uses it; per-layer state lives on the layer."""

    name = "abstract"
    ops: Ops = NATIVE_OPS  # the platform's row ops (set by the platform that builds the method)

    def create_weights(self, layer: Linear, dtype: torch.dtype | None) -> None:
        raise NotImplementedError

    def load(self, layer: Linear, tensor: torch.Tensor | QuantizedTensor, shard: int) -> None:
        """Fill output rows of part `shard` (-1: the whole weight) from a checkpoint tensor."""
        raise NotImplementedError

    def finish(self, layer: Linear) -> None:
        """After every shard is loaded: repack, merge parts, drop what is no longer needed."""

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def apply_silu_mul(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up of a fused gate/up projection; methods with a fused kernel override."""
        return self.ops.silu_and_mul(self.apply(layer, x))

    def apply_qkv_rope(self, layer: Linear, x: torch.Tensor, *args) -> torch.Tensor | None:
        """The fused q/k/v projection with RoPE (and the K/V cache write) in one kernel, or None
        where the method has no such kernel (the caller runs the steps)."""
        return None

    def describe(self, layer: Linear) -> str:
        return self.name


class DenseLinearMethod(LinearMethod):
    """An [out, in] weight in the model's dtype; `F.linear`."""

    name = "dense"

    def create_weights(self, layer: Linear, dtype: torch.dtype | None) -> None:
        layer.weight = nn.Parameter(torch.empty(layer.out_features, layer.in_features, dtype=dtype), requires_grad=False)

    def load(self, layer: Linear, tensor: torch.Tensor | QuantizedTensor, shard: int) -> None:
        weight = layer.weight
        if isinstance(tensor, QuantizedTensor):
            tensor = tensor.dequantize(torch.float32)
        if shard < 0:
            copy_into(weight, tensor, layer.label)
        else:
            copy_into(weight, tensor, layer.label, offset=layer.shard_offset(shard))

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, layer.weight, layer.bias)


class Linear(nn.Module):
    """y = x W^T (+ b) with W of `out_sizes` fused parts, computed by `method`."""

    def __init__(
        self,
        in_features: int,
        out_sizes: list[int] | int,
        bias: bool,
        method: LinearMethod,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.out_sizes = [out_sizes] if isinstance(out_sizes, int) else list(out_sizes)
        self.in_features = in_features
        self.out_features = sum(self.out_sizes)
        self.method = method
        self.label = "linear"  # the parameter's name, for error messages (set by the loader)
        # Each output row the same bits whatever the number of rows, where the method can choose
        # (LM heads: a speculative verify step's k + 1 rows must give one-row decodes' logits).
        self.rowwise = False
        self.bias = nn.Parameter(torch.empty(self.out_features, dtype=dtype), requires_grad=False) if bias else None
        self.weight: torch.Tensor | None = None
        method.create_weights(self, dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # Straight to the method: nn.Module's hook dispatch costs microseconds per call, which
        # adds up over the ~200 projections of a CPU decode step. (No hooks on these layers.)
        return self.method.apply(self, x)

    forward = __call__

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply_silu_mul(self, x)

    def shard_offset(self, shard: int) -> int:
        return sum(self.out_sizes[:shard])

    def load_shard(self, tensor: torch.Tensor | QuantizedTensor, shard: int = -1) -> None:
        rows = self.out_features if shard < 0 else self.out_sizes[shard]
        if tensor.dim() != 2 or tuple(tensor.shape) != (rows, self.in_features):
            raise WeightLoadError(
                f"shape mismatch for {self.label}{'' if shard < 0 else f'[shard {shard}]'}: checkpoint "
                f"{tuple(tensor.shape)} vs model {(rows, self.in_features)}"
            )
        self.method.load(self, tensor, shard)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, method={self.method.describe(self)}"
        )


def finish_loading(model: nn.Module) -> None:
    """Let every projection's method repack or merge what was loaded."""
    for module in model.modules():
        if isinstance(module, Linear):
            module.method.finish(module)
