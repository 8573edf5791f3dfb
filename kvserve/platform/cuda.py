"""The CUDA platform: Triton kernels (norms, RoPE, SiLU·mul, the one-row GEMV with its
epilogues, attention) where Triton is installed, cuBLAS for every larger product.

GGML-quantized GGUF weights are dequantized to the model dtype at load here (quantized GPU
kernels are not built yet); the start-up line says so.
"""

from __future__ import annotations

import torch

from kvserve.attention.base import AttentionBackend
from kvserve.models.linear import DenseLinearMethod
from kvserve.models.ops import Ops
from kvserve.platform.base import TORCH_DTYPES, LayerBuilder, Platform, WeightFormat


class CudaPlatform(Platform):
    name = "cuda"
    default_token_budget = 8192

    def __init__(self, device: torch.device) -> None:
        super().__init__(device)
        from kvserve.models import fused_ops

        self.triton = fused_ops.available()

    def describe(self) -> str:
        props = torch.cuda.get_device_properties(self.device)
        return (
            f"cuda {props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB); "
            f"Triton kernels: {'on' if self.triton else 'off'}; GGML weights dequantized at load"
        )

    def resolve_dtype(self, dtype: str, checkpoint_dtype: str | None, weights: WeightFormat = WeightFormat()) -> torch.dtype:
        """'auto' runs bf16 (fp16 when the checkpoint is fp16)."""
        from kvserve.core.config import normalize_dtype

        name = normalize_dtype(dtype)
        if name != "auto":
            return TORCH_DTYPES[name]
        try:
            ckpt = normalize_dtype(checkpoint_dtype) if checkpoint_dtype else None
        except ValueError:
            ckpt = None
        return torch.float16 if ckpt == "float16" else torch.bfloat16

    def weight_format(
        self, checkpoint_quantized: bool, quantization: str | None, dtype: str = "auto"
    ) -> WeightFormat:
        if quantization not in (None, "auto", "none"):
            raise ValueError(f"quantization={quantization!r} is not supported on CUDA yet (only on the CPU)")
        return WeightFormat("dequantize" if checkpoint_quantized else "dense")

    def attention_backend(self, name: str) -> AttentionBackend:
        if name in ("triton", "auto"):
            try:
                from kvserve.attention.triton import TritonBackend, is_available
            except ImportError:
                is_available = None
            if is_available is not None and is_available():
                return TritonBackend()
            if name == "triton":
                raise ValueError("attention_backend='triton' needs CUDA and the triton package")
        return super().attention_backend("torch")

    def layer_builder(self, backend: AttentionBackend, dtype: torch.dtype, weights: WeightFormat) -> LayerBuilder:
        ops: Ops = Ops()
        if self.triton:
            from kvserve.platform.cuda_ops import CudaTritonOps

            ops = CudaTritonOps()
        method: DenseLinearMethod = DenseLinearMethod()
        # The one-row GEMV (and its fused epilogues) goes with the Triton attention backend.
        if self.triton and backend.name == "triton" and dtype in (torch.float16, torch.bfloat16):
            from kvserve.platform.cuda_linear import TritonGemvLinearMethod

            method = TritonGemvLinearMethod()
        method.ops = ops
        return LayerBuilder(backend=backend, ops=ops, linear_method=method, dtype=dtype)
