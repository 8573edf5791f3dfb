"""How much GPU memory the KV cache may take."""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

# Headroom for activations of the largest step, until the profiled pass (GPU issue) lands.
_ACTIVATION_RESERVE = 2 << 30


def cuda_kv_budget(gpu_memory_utilization: float) -> int:
    """Bytes left for KV blocks: `utilization` x total, minus what is already in use (weights,
    other processes), minus an activation reserve."""
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    in_use = total - free
    budget = int(total * gpu_memory_utilization) - in_use - _ACTIVATION_RESERVE
    if budget <= 0:
        raise ValueError(
            f"no GPU memory left for the KV cache: {in_use / 2**30:.1f} GiB of {total / 2**30:.1f} GiB "
            f"in use with gpu_memory_utilization={gpu_memory_utilization}"
        )
    return budget
