"""Triton GPU attention backend.

Importing this package never imports Triton or touches CUDA: the kernels live in submodules
that are loaded on first use, so CPU-only machines (CI, laptops) can import `kvserve` freely and
ask `is_available()` before choosing a backend.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvserve.attention.triton.backend import TritonBackend

__all__ = ["TritonBackend", "is_available"]


def is_available() -> bool:
    """True when Triton is installed and a CUDA device is visible."""
    try:
        if importlib.util.find_spec("triton") is None:
            return False
    except (ImportError, ValueError):  # e.g. sys.modules["triton"] set to None
        return False
    import torch

    return torch.cuda.is_available()


def __getattr__(name: str) -> Any:
    # Lazy so that `import kvserve.attention.triton` works without Triton installed.
    if name == "TritonBackend":
        from kvserve.attention.triton.backend import TritonBackend

        return TritonBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
