"""CPU ops with the bf16 C kernels (`kvserve/models/cpu_kernels.py`, AVX512-BF16): for a few bf16
rows (decode), one C call per op instead of several PyTorch ops, each of which costs more in
fixed overhead than the arithmetic. Everything else takes the native PyTorch ops."""

from __future__ import annotations

import torch

from kvserve.models import cpu_kernels
from kvserve.models.layers import RotaryEmbedding, StepRope
from kvserve.models.ops import Ops


def _few_bf16_rows(x: torch.Tensor) -> bool:
    return x.dtype == torch.bfloat16 and x.shape[0] <= cpu_kernels.MAX_ROWS


class CpuBf16KernelOps(Ops):
    name = "cpu-bf16-kernels"

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        if _few_bf16_rows(x) and weight.dtype == torch.bfloat16:
            return cpu_kernels.rmsnorm(x, weight, eps)
        return super().rms_norm(x, weight, eps)

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if _few_bf16_rows(x) and weight.dtype == torch.bfloat16:
            return cpu_kernels.add_rmsnorm(x, residual, weight, eps)
        return super().add_rms_norm(x, residual, weight, eps)

    def rope_for_step(self, rotary: RotaryEmbedding, positions: torch.Tensor, dtype: torch.dtype) -> StepRope:
        if dtype == torch.bfloat16 and positions.dtype == torch.int64 and positions.shape[0] <= cpu_kernels.MAX_ROWS:
            # one call (a dozen PyTorch ops cost ~0.1 ms of a batch-1 step)
            cos, sin_signed = cpu_kernels.rope_factors(positions, rotary.inv_freq)
            return StepRope(cos=cos, sin_signed=sin_signed)
        return super().rope_for_step(rotary, positions, dtype)

    def rotate(self, x: torch.Tensor, rope: StepRope) -> torch.Tensor:
        if _few_bf16_rows(x) and rope.cos.dtype == torch.bfloat16:
            return cpu_kernels.rope(x, rope.cos, rope.sin_signed)
        return super().rotate(x, rope)
