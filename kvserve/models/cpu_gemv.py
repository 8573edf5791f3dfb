"""The bf16 GEMV kernel for CPU decode (`kvserve/csrc/gemv_bf16.c`): build, load, call.

Batch-1 decode reads every weight once per token, so its speed is the memory bandwidth the
matrix-vector products reach. oneDNN's prepacked bf16 linear reaches about 16 GB/s on the
2-core reference machine; the kernel here, which streams each thread's half of the weight
front to back, reaches about 27 GB/s (`benchmarks/RESULTS.md`). It needs an x86-64 CPU with
AVX512-BF16 and a C compiler (`$CC`, else `cc`); it is compiled once into
`$KVSERVE_CACHE_DIR` (default `~/.cache/kvserve`) and loaded with ctypes. Anywhere it can't be
built the caller falls back to oneDNN, with one log line saying why. `KVSERVE_CPU_GEMV=0`
turns it off.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "gemv_bf16.c"
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-fopenmp", "-shared", "-fPIC"]
# Up to this many input rows the kernel beats oneDNN (it multiplies each weight row by every
# input row while the row is in L1); above it, matmuls are compute-bound and oneDNN wins.
MAX_ROWS = 4


def _cpu_has_avx512_bf16() -> bool:
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return "avx512_bf16" in line.split()
    except OSError:
        return False
    return False


def _cache_dir() -> Path:
    return Path(os.environ.get("KVSERVE_CACHE_DIR") or Path.home() / ".cache" / "kvserve")


def _build(out: Path) -> None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler found (set $CC)")
    out.parent.mkdir(parents=True, exist_ok=True)
    # Compile to a temporary name, then rename: concurrent processes never load a partial file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        proc = subprocess.run(
            [cc, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=120
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed: {proc.stderr.strip()[-500:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@lru_cache(maxsize=1)
def load() -> ctypes._CFuncPtr | None:
    """The kernel's entry point, or None (with the reason logged once) where it can't run."""
    if os.environ.get("KVSERVE_CPU_GEMV", "1") == "0":
        logger.info("bf16 GEMV kernel off (KVSERVE_CPU_GEMV=0)")
        return None
    if not _cpu_has_avx512_bf16():
        logger.info("bf16 GEMV kernel not used: this CPU has no AVX512-BF16; using oneDNN")
        return None
    src = SOURCE.read_bytes()
    key = hashlib.sha256(src + " ".join(FLAGS).encode()).hexdigest()[:16]
    lib_path = _cache_dir() / f"gemv_bf16-{key}.so"
    try:
        if not lib_path.exists():
            _build(lib_path)
        torch.zeros(1).add_(1)  # make sure PyTorch's OpenMP runtime is loaded first (shared)
        lib = ctypes.CDLL(str(lib_path))
        if lib.kv_gemv_abi_version() != 1:
            raise RuntimeError("stale kernel build")
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        logger.warning("bf16 GEMV kernel unavailable (%s); using oneDNN", e)
        return None
    fn = lib.kv_gemv_bf16
    fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 3
    fn.restype = None
    logger.info("bf16 GEMV kernel loaded from %s", lib_path)
    return fn


def gemv(
    fn: ctypes._CFuncPtr, weight: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """[M, I] bf16 @ weight[O, I].T (+ bias) -> [M, O] bf16. `weight` must be contiguous."""
    x = x.contiguous()
    m, o = x.shape[0], weight.shape[0]
    out = torch.empty((m, o), dtype=torch.bfloat16)
    fn(weight.data_ptr(), x.data_ptr(), out.data_ptr(), bias.data_ptr() if bias is not None else None,
       m, o, weight.shape[1])
    return out
