"""The platform: one object per engine, chosen once at start-up, that knows the device and
builds its pieces.

    platform = get_platform(device)                # probes the CPU's instruction sets or the GPU
    dtype = platform.resolve_dtype("auto", ckpt)   # what the hardware computes natively
    builder = platform.layer_builder(backend, dtype, weights)   # linear method + row ops
    model = build_model(cfg, builder)              # device-free model code
    ... load weights ...
    platform.prepare_model(model)                  # repack / merge weights, fast decode hooks

Model files only call the builder (`builder.linear(...)`, `builder.ops`, `builder.backend`): a
new weight format is a new `LinearMethod`, a new device a new `Platform`, and neither touches a
model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from kvserve.attention.base import AttentionBackend
from kvserve.models.linear import DenseLinearMethod, Linear, LinearMethod
from kvserve.models.ops import Ops

logger = logging.getLogger(__name__)

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class WeightFormat:
    """How the checkpoint's projection weights arrive and should be kept.

    kind: "dense"      16/32-bit tensors (an HF folder, or a GGUF file of F16/BF16/F32 matrices)
          "ggml"       GGML quantized blocks in a GGUF file, kept quantized where the platform can
          "dequantize" GGML blocks expanded to the model dtype at load (the reference path)
    quantize_to: a GGML type to quantize dense weights into at load (`--quantization q8_0`).
    """

    kind: str = "dense"
    quantize_to: int | None = None


@dataclass
class LayerBuilder:
    """What a model needs from the platform to build its layers."""

    backend: AttentionBackend
    ops: Ops
    linear_method: LinearMethod
    dtype: torch.dtype | None = None
    # The LM head's method where it differs (a quantized head stays 8-bit: it sets every logit).
    head_method: LinearMethod | None = None

    @classmethod
    def native(cls, backend: AttentionBackend, dtype: torch.dtype | None = None) -> LayerBuilder:
        """Plain PyTorch layers (dense weights, native ops): the reference any platform is tested
        against, and what a test builds a model with."""
        return cls(backend=backend, ops=Ops(), linear_method=DenseLinearMethod(), dtype=dtype)

    def linear(self, in_features: int, out_sizes: list[int] | int, bias: bool = False) -> Linear:
        return Linear(in_features, out_sizes, bias, self.linear_method)

    def lm_head(self, in_features: int, vocab_rows: int) -> Linear:
        head = Linear(in_features, vocab_rows, False, self.head_method or self.linear_method)
        head.rowwise = True  # verify rows give the logits of one-row decodes (`Linear.rowwise`)
        return head

    def dense_linear(self, in_features: int, out_features: int) -> Linear:
        """A projection that must keep a dense weight (one tied to a dense embedding table)."""
        if isinstance(self.linear_method, DenseLinearMethod):
            return self.linear(in_features, out_features)
        method = DenseLinearMethod()
        method.ops = self.ops
        return Linear(in_features, out_features, False, method)

    def mxfp4_linear(self, in_features: int, out_sizes: list[int] | int, bias: bool = False) -> Linear:
        """A projection whose checkpoint weight is MXFP4 blocks (gpt-oss's experts): kept 4-bit
        by `Mxfp4LinearMethod` on any device (a dense part stays dense)."""
        from kvserve.platform.mxfp4_linear import Mxfp4LinearMethod

        method = Mxfp4LinearMethod()
        method.ops = self.ops
        return Linear(in_features, out_sizes, bias, method, self.dtype)

    @property
    def quantized(self) -> bool:
        return not isinstance(self.linear_method, DenseLinearMethod)


class Platform:
    name = "abstract"

    def __init__(self, device: torch.device) -> None:
        self.device = device

    # -- what runs here -------------------------------------------------------------------
    def describe(self) -> str:
        """One line: what the hardware has and which paths kvserve will use."""
        raise NotImplementedError

    def log_once(self) -> None:
        logger.info("platform: %s", self.describe())

    def resolve_dtype(self, dtype: str, checkpoint_dtype: str | None, weights: WeightFormat = WeightFormat()) -> torch.dtype:
        raise NotImplementedError

    def weight_format(
        self, checkpoint_quantized: bool, quantization: str | None, dtype: str = "auto"
    ) -> WeightFormat:
        """How this platform keeps the checkpoint's weights (see `WeightFormat`)."""
        raise NotImplementedError

    def attention_backend(self, name: str) -> AttentionBackend:
        from kvserve.attention.torch_ref import TorchRefBackend

        if name not in ("auto", "torch"):
            raise ValueError(f"attention_backend={name!r} is not available on {self.name}")
        return TorchRefBackend()

    def layer_builder(self, backend: AttentionBackend, dtype: torch.dtype, weights: WeightFormat) -> LayerBuilder:
        raise NotImplementedError

    def prepare_model(self, model: torch.nn.Module) -> None:
        """After the weights are loaded: let each projection's method finish (repack, merge)."""
        from kvserve.models.linear import finish_loading

        finish_loading(model)

    def tune_process(self) -> None:
        """Process-wide settings for this device (CPU: malloc)."""

    default_token_budget = 2048  # tokens one step may compute (chunked prefill)
    # r = b / a for a decode step of B rows costing a + B*b (speculative decoding's back-off: a
    # draft pays when its chance of acceptance beats B*r / (1 + B*r)). The CPU's: SmolLM2-135M
    # Q4_1 on 2 Zen 5 cores, an extra verify row 0.23-0.25 of a one-row step (RESULTS.md, ninth
    # session); CUDA sets its own.
    draft_row_cost = 0.3

