"""MXFP4 weights kept 4-bit (gpt-oss's experts), on any device.

The weight stays in its blocks (`kernels/mxfp4.py`: 17 bytes per 32 weights, 4.25 bits a weight)
as a uint8 buffer. On the CPU a product of up to 8 rows runs the C kernel straight from the
blocks (`csrc/mxfp4_f32.c`: decoded in L1, never stored dense); more rows dequantize once and
run one sgemm; elsewhere PyTorch dequantizes to the activations' dtype and multiplies. The dequantization is exact (codes times powers of two), so results equal the
dense model's on the dequantized weights. A mixture-of-experts layer calls only the experts that
received tokens, so a step dequantizes the selected experts alone. A part that arrives dense
(an unquantized checkpoint) is kept dense.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvserve.kernels import mxfp4
from kvserve.models.layers import WeightLoadError
from kvserve.models.linear import Linear, LinearMethod, QuantizedTensor


class _Part:
    """Rows [offset, offset + rows) of the output: MXFP4 bytes (qtype 39) or dense (qtype 0)."""

    __slots__ = ("offset", "rows", "qtype", "data")

    def __init__(self, offset: int, rows: int, qtype: int, data: torch.Tensor) -> None:
        self.offset, self.rows, self.qtype, self.data = offset, rows, qtype, data


class Mxfp4LinearMethod(LinearMethod):
    name = "mxfp4"

    def create_weights(self, layer: Linear, dtype: torch.dtype | None) -> None:
        layer.parts = {}  # shard -> _Part, filled by load(); merged by finish()
        layer.dense_dtype = dtype

    def load(self, layer: Linear, tensor: torch.Tensor | QuantizedTensor, shard: int) -> None:
        offset = 0 if shard < 0 else layer.shard_offset(shard)
        if shard in layer.parts:
            raise WeightLoadError(f"{layer.label}: shard {shard} loaded twice")
        # The layer's device (its bias was materialized there); checkpoint tensors arrive on the CPU.
        device = layer.bias.device if layer.bias is not None and layer.bias.device.type != "meta" else None
        if isinstance(tensor, QuantizedTensor) and tensor.qtype == mxfp4.MXFP4:
            part = _Part(offset, tensor.shape[0], mxfp4.MXFP4, tensor.data.to(device=device).contiguous())
        else:
            if isinstance(tensor, QuantizedTensor):
                tensor = tensor.dequantize(torch.float32)
            part = _Part(offset, tensor.shape[0], 0, tensor.detach().to(device=device, dtype=layer.dense_dtype).contiguous().clone())
        layer.parts[shard] = part

    def random_init(self, layer: Linear, device: torch.device) -> None:
        """Random MXFP4 blocks (`load_format="dummy"`: speed work at real shapes): uniform codes
        under a scale of 2^-6, so the weights have a standard deviation of about 0.04."""
        cols = layer.in_features
        data = torch.randint(0, 256, (layer.out_features, mxfp4.row_bytes(cols)), dtype=torch.uint8, device=device)
        data.view(layer.out_features, cols // mxfp4.BLOCK, mxfp4.BLOCK_BYTES)[..., 0] = 127 - 6
        layer.parts = {-1: _Part(0, layer.out_features, mxfp4.MXFP4, data)}

    def finish(self, layer: Linear) -> None:
        if isinstance(layer.parts, list):
            return
        parts = sorted(layer.parts.values(), key=lambda p: p.offset)
        if len({p.qtype for p in parts}) == 1 and len(parts) > 1:  # one buffer: one product per call
            parts = [_Part(0, layer.out_features, parts[0].qtype, torch.cat([p.data for p in parts]))]
        layer.parts = parts
        for i, p in enumerate(parts):  # registered, so `model.to(device)` moves them
            name = f"qweight{i}"
            if name in layer._buffers:
                del layer._buffers[name]
            layer.register_buffer(name, p.data, persistent=False)

    def weight(self, layer: Linear, dtype: torch.dtype) -> torch.Tensor:
        """The [out, in] weight dequantized to `dtype` (exact)."""
        parts = layer.parts
        if len(parts) == 1:
            p = parts[0]
            data = layer._buffers.get("qweight0", p.data)
            return mxfp4.dequantize(data, layer.in_features, dtype) if p.qtype else data.to(dtype)
        w = torch.empty(layer.out_features, layer.in_features, dtype=dtype, device=parts[0].data.device)
        for i, p in enumerate(parts):
            data = layer._buffers.get(f"qweight{i}", p.data)
            rows = mxfp4.dequantize(data, layer.in_features, dtype) if p.qtype else data
            w[p.offset : p.offset + p.rows] = rows
        return w

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        parts = layer.parts
        if len(parts) == 1 and parts[0].qtype and x.dim() == 2:  # straight from the blocks
            return mxfp4.linear(layer._buffers.get("qweight0", parts[0].data), layer.in_features, x, layer.bias)
        return F.linear(x, self.weight(layer, x.dtype), layer.bias)

    def describe(self, layer: Linear) -> str:
        parts = layer.parts.values() if isinstance(layer.parts, dict) else layer.parts
        return f"{self.name}[{'+'.join('MXFP4' if p.qtype else 'dense' for p in parts)}]"
