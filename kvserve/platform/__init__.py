"""One device seam: the platform (see `base.py`)."""

from __future__ import annotations

import torch

from kvserve.platform.base import LayerBuilder, Platform, WeightFormat


def get_platform(device: torch.device) -> Platform:
    """The platform for `device`, probed now (one per engine)."""
    if device.type == "cuda":
        from kvserve.platform.cuda import CudaPlatform

        return CudaPlatform(device)
    if device.type == "cpu":
        from kvserve.platform.cpu import CpuPlatform

        return CpuPlatform(device)
    raise ValueError(f"device {device} is not supported (cpu or cuda)")


def resolve_device(device: str) -> torch.device:
    if not isinstance(device, str):
        raise ValueError(f"device must be a string such as 'auto', 'cpu' or 'cuda' (got {device!r})")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"device {device!r} is not a valid torch device ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return dev


__all__ = ["LayerBuilder", "Platform", "WeightFormat", "get_platform", "resolve_device"]
