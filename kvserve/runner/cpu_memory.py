"""Keep freed memory in the process on CPU, so each step's activations don't page-fault.

glibc's malloc serves large blocks (over a dynamic threshold, 128 KiB at first) with fresh
`mmap`s and hands trimmed heap memory back to the kernel; every step of a CPU forward then
re-faults its activation pages, which on the 2-core reference machine made a 512-token prefill
up to 2× slower and batch-1 decode about 25% slower (benchmarks/RESULTS.md). PyTorch's CPU
tuning guides fix this by preloading jemalloc or tcmalloc; the same effect is had here with
`mallopt`: blocks up to 1 GiB come from the heap and freed heap memory is kept. The cost is
that the process keeps its peak activation memory. Only on glibc; `KVSERVE_TUNE_MALLOC=0`, or
any `MALLOC_*_` variable already set, leaves malloc alone.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc <malloc.h>
_MMAP_THRESHOLD = 1 << 30
_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: about 2 GiB, in effect never

_done = False


def tune_malloc() -> bool:
    """Apply the settings once per process; True if they are in effect."""
    global _done
    if _done:
        return True
    if os.environ.get("KVSERVE_TUNE_MALLOC", "1") == "0" or any(
        k.startswith("MALLOC_") and k.endswith("_") for k in os.environ
    ):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) == 1
        ok = libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1 and ok
    except (OSError, AttributeError):
        return False
    _done = ok
    if ok:
        logger.info("malloc tuned for CPU inference (mmap threshold 1 GiB, no trimming)")
    return ok


# -- KV cache sizing ----------------------------------------------------------------------
# The default CPU KV cache is what the engine's requests can use at most (max_num_seqs x
# max_model_len tokens), bounded by this fraction of the RAM available at start-up. Its pages
# come zeroed from the OS on first touch (runner/model_runner.py `_zeros`), so resident memory
# grows with the blocks in use, not with this size; the bound keeps a busy server from growing
# into swap.
KV_RAM_FRACTION = 0.4


def available_ram() -> int:
    """Bytes of RAM available to new allocations (Linux `MemAvailable`), else total RAM / 2."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 4 << 30


def default_kv_cache_bytes(wanted: int) -> int:
    """The default CPU KV cache: `wanted` bytes (what the requests can use), at most
    `KV_RAM_FRACTION` of the available RAM."""
    return int(min(wanted, KV_RAM_FRACTION * available_ram()))


def lazy_zeros(shape: tuple[int, ...], dtype) -> "torch.Tensor":
    """A zero-filled CPU tensor whose pages the OS maps (zeroed) on first touch, so resident
    memory grows with what is written, 4 KiB at a time. An anonymous `mmap`, not numpy's
    `calloc`: numpy advises huge pages for large arrays, and then writing one token's K/V to
    each layer's cache faulted in 2 MiB per layer (58 MiB of RSS on the built-in model's first
    step)."""
    import mmap
    import math

    import torch

    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if nbytes == 0:
        return torch.zeros(shape, dtype=dtype)
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    # frombuffer keeps `buf` alive as long as the tensor (or a view of it) lives.
    return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).view(shape)
