"""The CPU platform: probes the instruction sets once and picks every CPU path from them.

| what                       | chosen when                                                      |
|----------------------------|------------------------------------------------------------------|
| dtype "auto"               | bf16 for 16-bit checkpoints only with native bf16 (AVX512-BF16,   |
|                            | ARM bf16); fp32 otherwise, and for fp32 and GGML checkpoints      |
| GGML weights               | kept quantized (integer-dot kernels at the CPU's ISA level)       |
| bf16 projections           | oneDNN-prepacked where oneDNN has bf16 on this CPU, + the bf16    |
|                            | GEMV C kernel with AVX512-BF16; plain `F.linear` elsewhere        |
| norm / RoPE of a few rows  | bf16 C kernels with AVX512-BF16; PyTorch elsewhere                |
| whole decode step in C     | bf16 stack (AVX512-BF16) or GGML stack (any ISA level)            |

`KVSERVE_CPU_ISA` caps the level (`platform/cpuinfo.py`), so the AVX2 and plain-C paths are
tested on any machine. Nothing here raises for a missing instruction set: a path that can't run
falls back, and the start-up line says which paths are in use.
"""

from __future__ import annotations

import logging

import torch

from kvserve.models.linear import DenseLinearMethod
from kvserve.models.ops import Ops
from kvserve.platform.base import TORCH_DTYPES, LayerBuilder, Platform, WeightFormat
from kvserve.platform.cpuinfo import CpuInfo, at_least, cpu_info, isa_level

logger = logging.getLogger(__name__)


class CpuPlatform(Platform):
    name = "cpu"
    default_token_budget = 2048

    def __init__(self, device: torch.device | None = None, info: CpuInfo | None = None) -> None:
        super().__init__(device or torch.device("cpu"))
        from kvserve.platform.cpu_linear import onednn_bf16_supported

        self.info = info or cpu_info()
        self.level = isa_level(self.info)
        arm_bf16 = self.info.is_arm and self.info.has("bf16") and self.level != "baseline"
        self.native_bf16 = self.level == "avx512_bf16" or arm_bf16
        # oneDNN runs bf16 linears with AVX512-BW/VL/DQ or AVX-NE-CONVERT (emulated without BF16
        # instructions): prepacking is worth it wherever it works, when bf16 is asked for. Capped
        # like every other path, so a forced `avx2` level behaves as an AVX2-only CPU would.
        capped = self.info.is_x86 and not at_least(self.level, "avx512", self.info)
        self.onednn_bf16 = not capped and onednn_bf16_supported()
        self._bf16_kernels: bool | None = None  # the bf16 C kernels loaded (lazily: compiles)

    @property
    def bf16_kernels(self) -> bool:
        if self._bf16_kernels is None:
            from kvserve.models import cpu_kernels

            self._bf16_kernels = self.level == "avx512_bf16" and cpu_kernels.library() is not None
        return self._bf16_kernels

    def describe(self) -> str:
        from kvserve.kernels import cpu_quant

        flags = " ".join(self.info.reported_flags()) or "no SIMD flags read"
        quant = cpu_quant.isa_level() if cpu_quant.library() is not None else "PyTorch fallback"
        return (
            f"cpu {self.info.model} ({self.info.arch}: {flags}); ISA level {self.level}; "
            f"GGML int8 kernels: {quant}; bf16: {'native' if self.native_bf16 else 'not native (auto dtype float32)'}"
            f"{', oneDNN prepacked' if self.onednn_bf16 else ''}"
        )

    def resolve_dtype(self, dtype: str, checkpoint_dtype: str | None, weights: WeightFormat = WeightFormat()) -> torch.dtype:
        """'auto' keeps an fp32 checkpoint in fp32, computes GGML-quantized weights in fp32 (the
        integer kernels' accumulation type) and 16-bit checkpoints in bf16 only where the CPU
        has bf16 instructions (elsewhere bf16 runs emulated, slower than fp32)."""
        from kvserve.core.config import normalize_dtype

        name = normalize_dtype(dtype)
        if name != "auto":
            return TORCH_DTYPES[name]
        if weights.kind == "ggml" or weights.quantize_to is not None:
            return torch.float32
        ckpt = _canonical(checkpoint_dtype)
        if ckpt == "float32" or not self.native_bf16:
            return torch.float32
        return torch.bfloat16

    def weight_format(
        self, checkpoint_quantized: bool, quantization: str | None, dtype: str = "auto"
    ) -> WeightFormat:
        """GGML blocks stay quantized (computed in fp32) unless `quantization="none"`, or a 16-bit
        dtype is asked for explicitly: then they are dequantized to it, as that dtype's kernels
        (the bf16 ones with AVX512-BF16) need."""
        from kvserve.core.config import normalize_dtype
        from kvserve.platform.ggml_linear import QUANTIZE_TO

        if quantization == "gguf":  # the CPU's default for a quantized GGUF, asked for explicitly
            if not checkpoint_quantized:
                raise ValueError("quantization='gguf' keeps a GGUF file's quantized blocks: this checkpoint has none")
            return WeightFormat("ggml")
        if quantization in (None, "auto"):
            if checkpoint_quantized and normalize_dtype(dtype) in ("bfloat16", "float16"):
                logger.info("dtype=%s: GGUF blocks dequantized to it (the quantized kernels compute in fp32)", dtype)
                return WeightFormat("dequantize")
            return WeightFormat("ggml" if checkpoint_quantized else "dense")
        if quantization == "none":
            return WeightFormat("dequantize" if checkpoint_quantized else "dense")
        if quantization in QUANTIZE_TO:
            # Quantized checkpoints keep their own blocks; dense parts are quantized at load.
            return WeightFormat("ggml", QUANTIZE_TO[quantization])
        raise ValueError(f"quantization must be one of none, gguf, q8_0, q4_0 on the CPU (got {quantization!r})")

    def layer_builder(self, backend, dtype: torch.dtype, weights: WeightFormat) -> LayerBuilder:
        ops = self.ops(dtype)
        if weights.kind == "ggml":
            from kvserve.platform.ggml_linear import GGMLLinearMethod

            method = GGMLLinearMethod(weights.quantize_to)
            if weights.quantize_to is not None:  # quantized at load: embedding and head in Q8_0
                head = GGMLLinearMethod(8)
                head.ops = ops
                return LayerBuilder(backend=backend, ops=ops, linear_method=method, dtype=dtype, head_method=head)
        elif dtype == torch.bfloat16 and self.onednn_bf16:
            from kvserve.platform.cpu_linear import PackedBf16LinearMethod

            method = PackedBf16LinearMethod(use_gemv=self.bf16_kernels)
        else:
            method = DenseLinearMethod()
        method.ops = ops
        return LayerBuilder(backend=backend, ops=ops, linear_method=method, dtype=dtype)

    def ops(self, dtype: torch.dtype) -> Ops:
        if dtype == torch.bfloat16 and self.bf16_kernels:
            from kvserve.platform.cpu_ops import CpuBf16KernelOps

            return CpuBf16KernelOps()
        return Ops()

    def prepare_model(self, model: torch.nn.Module) -> None:
        super().prepare_model(model)
        if hasattr(model, "decode_stack_builder"):
            model.decode_stack_builder = self.decode_stack

    def decode_stack(self, model: torch.nn.Module):
        """The whole-decode-step C call for this model, or None where none applies: the bf16
        stack (AVX512-BF16, prepacked bf16 projections) or the GGML stack (quantized weights)."""
        from kvserve.models.cpu_decoder import DecoderStack
        from kvserve.platform.ggml_linear import GGMLLinearMethod
        from kvserve.platform.ggml_stack import GGMLDecoderStack

        if isinstance(model.layers[0].self_attn.qkv_proj.method, GGMLLinearMethod):
            return GGMLDecoderStack.build(model)
        return DecoderStack.build(model)

    def tune_process(self) -> None:
        from kvserve.runner.cpu_memory import tune_malloc

        tune_malloc()  # steps must not re-fault their activation pages (runner/cpu_memory.py)


def _canonical(checkpoint_dtype: str | None) -> str | None:
    from kvserve.core.config import normalize_dtype

    try:
        return normalize_dtype(checkpoint_dtype) if checkpoint_dtype else None
    except ValueError:
        return None
