"""GGML block formats kept quantized on the CPU: one copy of each weight, as in the file.

A GGUF checkpoint's Q8_0 / Q4_0 / Q4_1 / Q4_K / Q5_K / Q6_K matrices are stored in their block
bytes (uint8 [rows, row_bytes], byte for byte the file's) and multiplied by the integer-dot
kernels of `kvserve/kernels/cpu_quant.py`: activations are quantized to 8-bit blocks, then each
weight block is dotted with them (AVX2, AVX-512 VNNI, ARM dotprod, or plain C). Decode reads
the quantized bytes once per token: the built-in SmolLM2 Q4_1 model reads 98 MB a step instead
of 269 MB as bf16.

The blocks are not copied: each part is a view of the memory-mapped file (as llama.cpp maps
it), so the weights' resident memory is the file's pages, shared with the page cache. A fused
projection (q ‖ k ‖ v, gate ‖ up) therefore keeps one part per checkpoint tensor, each filling
its slice of the output (parts may differ in format: a Q4_K_M file keeps v in Q6_K); the
one-call decoder stack takes the parts as they are. A part that arrives dense (an F32/F16 tensor in the GGUF,
or an HF checkpoint) is quantized at load to the method's `quantize_to` format (`--quantization
q8_0|q4_0`), or kept dense when there is none.

Activations and outputs are fp32 (the kernels' accumulation type); other dtypes are converted
at the boundary.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from kvserve.kernels import cpu_quant
from kvserve.models.layers import WeightLoadError
from kvserve.models.linear import GGML_BLOCK, GGML_NAMES, Linear, LinearMethod, QuantizedTensor

logger = logging.getLogger(__name__)

QUANTIZE_TO = {"q8_0": 8, "q4_0": 2}  # --quantization name -> GGML type


class _Part:
    """Rows [offset, offset + rows) of the output: GGML blocks (qtype > 0) or a dense fp32
    matrix (qtype 0)."""

    __slots__ = ("offset", "rows", "qtype", "data")

    def __init__(self, offset: int, rows: int, qtype: int, data: torch.Tensor) -> None:
        self.offset, self.rows, self.qtype, self.data = offset, rows, qtype, data


class GGMLLinearMethod(LinearMethod):
    name = "ggml"

    def __init__(self, quantize_to: int | None = None) -> None:
        self.quantize_to = quantize_to  # GGML type for parts that arrive dense; None keeps them dense

    def create_weights(self, layer: Linear, dtype: torch.dtype | None) -> None:
        layer.parts = {}  # shard -> _Part, filled by load(); merged by finish()

    def load(self, layer: Linear, tensor: torch.Tensor | QuantizedTensor, shard: int) -> None:
        offset = 0 if shard < 0 else layer.shard_offset(shard)
        rows = tensor.shape[0]
        if isinstance(tensor, QuantizedTensor):
            part = _Part(offset, rows, tensor.qtype, tensor.data.contiguous())  # a view of the file
        elif self.quantize_to is not None and layer.in_features % GGML_BLOCK[self.quantize_to][0] == 0:
            data = cpu_quant.quantize_weights(self.quantize_to, tensor.detach().float().contiguous())
            part = _Part(offset, rows, self.quantize_to, data)
        else:
            part = _Part(offset, rows, 0, tensor.detach().float().contiguous().clone())
        if shard in layer.parts:
            raise WeightLoadError(f"{layer.label}: shard {shard} loaded twice")
        layer.parts[shard] = part

    def finish(self, layer: Linear) -> None:
        if isinstance(layer.parts, list):  # already final (a head tied to a GGML embedding)
            return
        parts = sorted(layer.parts.values(), key=lambda p: p.offset)
        layer.parts = parts
        # The tensors the kernels read, registered so that `model.to(device)` and state dicts see
        # them; `.to(dtype)` leaves uint8 alone.
        for i, p in enumerate(parts):
            name = f"qweight{i}"
            if name in layer._buffers:
                del layer._buffers[name]
            layer.register_buffer(name, p.data, persistent=False)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, layer.in_features)
        if x2.dtype != torch.float32:
            x2 = x2.float()
        bias = layer.bias
        if bias is not None and bias.dtype != torch.float32:
            bias = bias.float()
        parts = layer.parts
        if len(parts) > 1 and x2.shape[0] >= _merge_min_rows(parts):
            # Prefill sizes: the parts dequantized into one fp32 matrix, then one sgemm (the
            # parts' separate products were narrower, less efficient matmuls).
            w = torch.empty((layer.out_features, layer.in_features), dtype=torch.float32)
            for p in parts:
                rows = w[p.offset : p.offset + p.rows]
                if p.qtype == 0:
                    rows.copy_(p.data)
                else:
                    cpu_quant.dequantize(p.qtype, p.data, layer.in_features, out=rows)
            out = torch.addmm(bias, x2, w.T) if bias is not None else x2 @ w.T
        elif len(parts) == 1:
            p = parts[0]
            out = _part_product(p, x2, layer.in_features, bias, layer.rowwise)
        else:
            out = torch.empty((x2.shape[0], layer.out_features), dtype=torch.float32)
            for p in parts:
                b = None if bias is None else bias[p.offset : p.offset + p.rows]
                out[:, p.offset : p.offset + p.rows] = _part_product(p, x2, layer.in_features, b)
        if out.dtype != x.dtype:
            out = out.to(x.dtype)
        return out.view(*shape[:-1], layer.out_features)

    def describe(self, layer: Linear) -> str:
        parts = getattr(layer, "parts", [])
        kinds = [GGML_NAMES.get(p.qtype, "F32") for p in (parts.values() if isinstance(parts, dict) else parts)]
        return f"{self.name}[{'+'.join(kinds)}]"


def _merge_min_rows(parts: list[_Part]) -> float:
    """Rows from which a layer's parts are merged and multiplied by sgemm: the lowest of its
    quantized parts' `cpu_quant.dequant_min_rows` (Gemma 3's qkv: Q5_0 with a Q8_0 part at 48)."""
    return min((cpu_quant.dequant_min_rows(p.qtype) for p in parts if p.qtype), default=cpu_quant.DEQUANT_MIN_ROWS)


def _part_product(p: _Part, x: torch.Tensor, k: int, bias: torch.Tensor | None, rowwise: bool = False) -> torch.Tensor:
    if p.qtype == 0:
        return F.linear(x, p.data, bias)
    return cpu_quant.linear(p.qtype, p.data, k, x, bias, rowwise=rowwise)


class GGMLEmbedding(nn.Module):
    """A token embedding stored in a GGML block format; a lookup dequantizes the rows it reads.
    It also serves as a tied LM head's weight (`GGMLLinearMethod.tie_to`)."""

    def __init__(
        self, num_embeddings: int, embedding_dim: int, dtype: torch.dtype, quantize_to: int | None = None
    ) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.dtype = num_embeddings, embedding_dim, dtype
        self.quantize_to = quantize_to  # GGML type for a dense table (`--quantization`), or None
        self.qtype = 0
        self.register_buffer("data", None, persistent=False)

    def load(self, tensor: torch.Tensor | QuantizedTensor) -> None:
        if tuple(tensor.shape) != (self.num_embeddings, self.embedding_dim):
            raise WeightLoadError(
                f"shape mismatch for embed_tokens.weight: checkpoint {tuple(tensor.shape)} vs model "
                f"{(self.num_embeddings, self.embedding_dim)}"
            )
        if isinstance(tensor, QuantizedTensor):
            self.qtype, self.data = tensor.qtype, tensor.data.contiguous()  # a view of the file
        elif self.quantize_to is not None and self.embedding_dim % GGML_BLOCK[self.quantize_to][0] == 0:
            self.qtype = self.quantize_to
            self.data = cpu_quant.quantize_weights(self.quantize_to, tensor.detach().float().contiguous())
        else:
            self.qtype, self.data = 0, tensor.detach().to(self.dtype).contiguous().clone()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, hidden]
        if self.qtype == 0:
            return F.embedding(input_ids, self.data)
        rows = cpu_quant.get_rows(self.qtype, self.data, self.embedding_dim, input_ids.reshape(-1))
        return rows.to(self.dtype).view(*input_ids.shape, self.embedding_dim)

    def as_head(self, head: Linear) -> None:
        """Make `head` (an LM head Linear with a GGML method) multiply by this table."""
        data = self.data if self.qtype else self.data.float()
        head.parts = [_Part(0, self.num_embeddings, self.qtype, data)]

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, format={GGML_NAMES.get(self.qtype, 'dense')}"

