"""Building blocks shared by the model families: norms, rotary embedding, fused weight loading."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from kvserve.models.ops import Ops

NATIVE_OPS = Ops()


class RMSNorm(nn.Module):
    """RMSNorm through the platform's ops (a fused kernel where the platform has one, else
    `F.rms_norm`, bit-identical to HF's formula in fp32)."""

    def __init__(self, dim: int, eps: float, ops: Ops | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.ops = ops or NATIVE_OPS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_norm(x, self.weight, self.eps)

    def forward_with_residual(
        self, x: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (norm(x + residual), x + residual): the pre-norm block's add-then-norm."""
        return self.ops.add_rms_norm(x, residual, self.weight, self.eps)


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's tanh approximation of GELU."""
    return F.gelu(x, approximate="tanh")


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """[head_dim // 2] fp32 inverse frequencies, with linear or Llama-3 scaling applied."""
    # On the CPU even while a model is built on the meta device: meta arithmetic would pull in
    # torch._dynamo (seconds of imports); the buffer is recomputed after materializing anyway.
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if scaling is None:
        return inv_freq
    kind = scaling["rope_type"]
    factor = float(scaling.get("factor", 1.0))
    if kind == "linear":
        return inv_freq / factor
    if kind == "llama3":
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_len = float(scaling.get("original_max_position_embeddings", 8192))
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths (low frequencies) are slowed by `factor`; short ones are kept;
        # the band in between is interpolated smoothly.
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    if kind == "yarn":
        return _yarn_inv_freq(head_dim, theta, scaling)
    raise ValueError(f"unsupported rope_scaling type {kind!r}")


def _yarn_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any]) -> torch.Tensor:
    """YaRN (gpt-oss): frequencies below the correction range are interpolated (divided by
    `factor`), those above it kept, a linear ramp in between; HF's arithmetic in fp32."""
    factor = float(scaling["factor"])
    orig = float(scaling["original_max_position_embeddings"])
    beta_fast = float(scaling.get("beta_fast") or 32)
    beta_slow = float(scaling.get("beta_slow") or 1)

    def correction_dim(rotations: float) -> float:
        return (head_dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    pos_freqs = theta ** (torch.arange(0, head_dim, 2, device="cpu").float() / head_dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    ramp = torch.clamp((torch.arange(head_dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low), 0, 1)
    keep = 1 - ramp  # 1 = extrapolate (keep the frequency), 0 = interpolate
    return interpolation * (1 - keep) + extrapolation * keep


def yarn_attention_factor(scaling: dict[str, Any] | None) -> float:
    """YaRN's cos/sin multiplier (`attention_factor`, else 0.1 ln(factor) + 1, or the
    mscale / mscale_all_dim ratio); 1.0 for other RoPE types."""
    if not scaling or scaling.get("rope_type") != "yarn":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor = float(scaling["factor"])

    def mscale(m: float = 1.0) -> float:
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

    ms, ms_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
    return mscale(float(ms)) / mscale(float(ms_all)) if ms and ms_all else mscale()


class RotaryEmbedding(nn.Module):
    """Non-interleaved RoPE (rotate_half). One instance per model: cos/sin are computed once
    per step for the step's positions and shared by every layer, by the platform's ops (on
    CUDA a cos/sin table for every position, built once, that a fused kernel reads)."""

    def __init__(
        self, head_dim: int, theta: float, scaling: dict[str, Any] | None, max_positions: int = 0,
        ops: Ops | None = None,
    ) -> None:
        super().__init__()
        self.head_dim, self.theta, self.scaling = head_dim, theta, scaling
        self.max_positions = max_positions
        self.ops = ops or NATIVE_OPS
        self.register_buffer("inv_freq", rope_inv_freq(head_dim, theta, scaling), persistent=False)
        # Plain attribute, not a buffer: `model.to(dtype)` must not round it.
        self._cos_sin_table: torch.Tensor | None = None

    def for_step(self, positions: torch.Tensor, dtype: torch.dtype) -> StepRope:
        """What every layer of one step needs to rotate its q and k."""
        return self.ops.rope_for_step(self, positions, dtype)

    def reset_parameters(self) -> None:
        """Recompute `inv_freq` (after materializing a model built on the meta device)."""
        self.inv_freq = rope_inv_freq(self.head_dim, self.theta, self.scaling).to(self.inv_freq.device)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, D/2], fp32 like HF
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [T, 1, D]
        return emb.cos().to(dtype), emb.sin().to(dtype)


class StepRope:
    """One step's rotary state: cos and sin with its first half negated, [T, 1, D], for the
    PyTorch path, or the step's positions and the fp32 cos/sin table for the fused CUDA kernel."""

    __slots__ = ("cos", "sin_signed", "positions", "cos_sin_table")

    def __init__(
        self,
        cos: torch.Tensor | None = None,
        sin_signed: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        cos_sin_table: torch.Tensor | None = None,
    ) -> None:
        self.cos, self.sin_signed = cos, sin_signed
        self.positions, self.cos_sin_table = positions, cos_sin_table

    @property
    def fused(self) -> bool:
        return self.cos_sin_table is not None


class WeightLoadError(ValueError):
    pass


def copy_into(param: torch.Tensor, loaded: torch.Tensor, name: str, offset: int = 0) -> None:
    """Copy `loaded` into rows [offset, offset + len) of `param` (a fused weight's shard)."""
    rows = loaded.shape[0]
    target = param.data[offset : offset + rows] if offset or rows != param.shape[0] else param.data
    if tuple(target.shape) != tuple(loaded.shape):
        raise WeightLoadError(
            f"shape mismatch for {name}: checkpoint {tuple(loaded.shape)} vs model "
            f"{tuple(target.shape)} (at row offset {offset})"
        )
    target.copy_(loaded.to(target.dtype))
