"""The CUDA platform: Triton kernels (norms, RoPE, SiLU·mul, the one-row GEMV with its
epilogues, attention) where Triton is installed, cuBLAS for every larger product.

Quantized weights (`platform/cuda_quant.py`): `quantization="int8" | "int4" | "fp8"` quantizes
an HF checkpoint's projections at load; a GGUF file's Q8_0 / Q4_0 / Q4_1 / Q4_K matrices are
repacked exactly into the same int8 / int4 layouts (other GGML types are dequantized to the
model dtype); `quantization="none"` dequantizes everything (the reference path).
"""

from __future__ import annotations

import logging

import torch

from kvserve.attention.base import AttentionBackend
from kvserve.models.linear import DenseLinearMethod
from kvserve.models.ops import Ops
from kvserve.platform.base import TORCH_DTYPES, LayerBuilder, Platform, WeightFormat

logger = logging.getLogger(__name__)


class CudaPlatform(Platform):
    name = "cuda"
    default_token_budget = 8192
    # Llama-3.1-8B shapes on an H100: a 5-row verify step 1.084x a one-token step (RESULTS.md).
    draft_row_cost = 0.03

    def __init__(self, device: torch.device) -> None:
        super().__init__(device)
        from kvserve.models import fused_ops

        self.triton = fused_ops.available()

    def describe(self) -> str:
        props = torch.cuda.get_device_properties(self.device)
        return (
            f"cuda {props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB); "
            f"Triton kernels: {'on' if self.triton else 'off'}; quantized weights: "
            f"{'int8, int4, GGUF Q8_0/Q4_0/Q4_1/Q4_K' if self.triton else 'off (Triton missing)'}"
            f"{', fp8' if self.fp8 else ''}"
        )

    @property
    def fp8(self) -> bool:
        """FP8 tensor cores (compute capability 8.9 and later)."""
        return self.triton and torch.cuda.get_device_capability(self.device) >= (8, 9)

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
        """GGUF blocks are dequantized to the model dtype by default (the bf16 kernels are faster
        than the quantized ones at batch sizes above one so far: benchmarks/RESULTS.md, issue 17);
        `quantization="gguf"` keeps Q8_0 / Q4_0 / Q4_1 / Q4_K blocks (repacked to the GPU
        layouts). 'int8' | 'int4' | 'fp8' quantize dense projection weights at load. The quantized
        kernels are Triton's: without Triton, "gguf" and the schemes are refused."""
        from kvserve.platform.cuda_quant import SCHEMES

        if quantization in (None, "auto", "none"):
            return WeightFormat("dequantize" if checkpoint_quantized else "dense")
        if quantization == "gguf":
            if not checkpoint_quantized:
                raise ValueError("quantization='gguf' keeps a GGUF file's quantized blocks: this checkpoint has none")
            if not self.triton:
                raise ValueError("quantization='gguf' needs Triton on CUDA (not installed or KVSERVE_FUSED_OPS=0)")
            return WeightFormat("ggml", "gguf")
        if quantization not in SCHEMES:
            raise ValueError(
                f"quantization must be one of none, {', '.join(SCHEMES)} on CUDA (got {quantization!r}; "
                "q8_0 / q4_0 are the CPU's formats)"
            )
        if not self.triton:
            raise ValueError(f"quantization={quantization!r} needs Triton on CUDA (not installed or KVSERVE_FUSED_OPS=0)")
        if quantization == "fp8" and not self.fp8:
            cap = torch.cuda.get_device_capability(self.device)
            raise ValueError(f"quantization='fp8' needs compute capability 8.9 or later (this GPU: {cap[0]}.{cap[1]})")
        return WeightFormat("ggml" if checkpoint_quantized else "dense", quantization)

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
        if weights.quantize_to is not None and self.triton:
            from kvserve.platform.cuda_quant import FP8_QMM_MAX_ROWS, CudaQuantLinearMethod, fp8_fused_act_mode

            scheme = None if weights.quantize_to == "gguf" else weights.quantize_to
            qmethod = CudaQuantLinearMethod(scheme, self.device, dtype)
            qmethod.ops = ops
            if scheme == "fp8" and fp8_fused_act_mode():
                ops.fp8_act_rows = FP8_QMM_MAX_ROWS  # norms and SiLU·mul also write FP8 rows
            if scheme != "fp8":
                from kvserve.kernels.triton_quant import int4_gemv_mode, int8_gemv_mode

                # one-row norms also write the half-math GEMVs' activation pairs
                ops.half_pairs = "half" in (int4_gemv_mode(), int8_gemv_mode())
            head = None
            if scheme == "int4":  # the LM head sets every logit: 8-bit, as the CPU keeps it
                head = CudaQuantLinearMethod("int8", self.device, dtype)
                head.ops = ops
            return LayerBuilder(backend=backend, ops=ops, linear_method=qmethod, dtype=dtype, head_method=head)
        method: DenseLinearMethod = DenseLinearMethod()
        # The one-row GEMV (and its fused epilogues) goes with the Triton attention backend.
        if self.triton and backend.name == "triton" and dtype in (torch.float16, torch.bfloat16):
            from kvserve.platform.cuda_linear import TritonGemvLinearMethod

            method = TritonGemvLinearMethod()
        method.ops = ops
        return LayerBuilder(backend=backend, ops=ops, linear_method=method, dtype=dtype)

    def prepare_model(self, model: torch.nn.Module) -> None:
        super().prepare_model(model)
        from kvserve.platform.cuda_quant import CudaQuantLinearMethod, describe_weights

        if self.triton:  # sparse MoE layers: experts stacked for the fused Triton kernels
            from kvserve.platform.cuda_moe import stack_experts

            stack_experts(model)
            prepare = getattr(model, "prepare_cuda", None)  # gpt-oss: MXFP4 experts repacked for its kernels
            if callable(prepare):
                prepare()
        if any(isinstance(getattr(m, "method", None), CudaQuantLinearMethod) for m in model.modules()):
            logger.info("quantized projections: %s", describe_weights(model))
