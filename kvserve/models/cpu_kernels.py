"""The C kernels for CPU decode (`kvserve/csrc/*.c`): build, load, call.

- `gemv`: bf16 matrix x few-rows products. Batch-1 decode reads every weight once per token,
  so its speed is the memory bandwidth these products reach. oneDNN's prepacked bf16 linear
  reaches about 16 GB/s on the 2-core reference machine; this kernel, which streams each
  thread's half of the weight front to back, about 27 GB/s.
- `decode_attention`: paged decode attention over a bf16 cache, reading keys and values in
  place through the block table (PyTorch needs a gather copy and then several small matmuls
  whose fixed costs dominate at decode sizes).
- `rmsnorm`, `add_rmsnorm`, `rope`, `gemv_silu_mul`: the row ops of a decode step, one pass each.
- `kv_decoder_stack_bf16`: all of a Llama model's layers for a decode step in one call, bound
  and driven by `models/cpu_decoder.py` (`library()` hands it the loaded library).

They need an x86-64 CPU with AVX512-BF16 (ISA level `avx512_bf16`, see `platform/cpuinfo.py`:
`KVSERVE_CPU_ISA=avx2` turns them off like a CPU without it) and a C compiler (`$CC`, else `cc`); they are
compiled once into `$KVSERVE_CACHE_DIR` (default `~/.cache/kvserve`) and loaded with ctypes.
Wherever they can't be built, callers fall back to PyTorch (oneDNN), with one log line saying
why. `KVSERVE_CPU_KERNELS=0` turns them off.
"""

from __future__ import annotations

import ctypes
import logging
import os
import subprocess
from functools import lru_cache
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parent.parent / "csrc"
SOURCES = [CSRC / "gemv_bf16.c", CSRC / "decode_attn_bf16.c", CSRC / "decoder_stack_bf16.c"]
HEADERS = [CSRC / "bf16_kernels.h"]
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-fopenmp", "-shared", "-fPIC"]
# Up to this many input rows the kernel beats oneDNN (it multiplies each weight row by every
# input row while the row is in L1); above it, matmuls are compute-bound and oneDNN wins.
MAX_ROWS = 4


@lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    if os.environ.get("KVSERVE_CPU_KERNELS", "1") == "0":
        logger.info("CPU C kernels off (KVSERVE_CPU_KERNELS=0)")
        return None
    from kvserve.platform.cpuinfo import isa_level

    level = isa_level()
    if level != "avx512_bf16":
        logger.info("bf16 C kernels not used: ISA level %s (they need AVX512-BF16); using PyTorch", level)
        return None
    from kvserve.kernels import cbuild

    lib_path = cbuild.library_path("kvserve_cpu", SOURCES + HEADERS, FLAGS)
    try:
        if not lib_path.exists():
            cbuild.build(lib_path, SOURCES, FLAGS, timeout=120)
        torch.zeros(1).add_(1)  # make sure PyTorch's OpenMP runtime is loaded first (shared)
        lib = ctypes.CDLL(str(lib_path))
        if (lib.kv_gemv_abi_version(), lib.kv_decode_attn_abi_version(), lib.kv_decoder_stack_abi_version()) != (5, 3, 2):
            raise RuntimeError("stale kernel build")
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        logger.warning("CPU C kernels unavailable (%s); using PyTorch", e)
        return None
    lib.kv_gemv_bf16.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 3
    lib.kv_gemv_bf16.restype = None
    lib.kv_gemv_silu_mul_bf16.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int] * 3
    lib.kv_gemv_silu_mul_bf16.restype = None
    lib.kv_rmsnorm_bf16.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int] * 2 + [ctypes.c_float]
    lib.kv_rmsnorm_bf16.restype = None
    lib.kv_add_rmsnorm_bf16.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int] * 2 + [ctypes.c_float]
    lib.kv_add_rmsnorm_bf16.restype = None
    lib.kv_rope_factors_bf16.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 2
    lib.kv_rope_factors_bf16.restype = None
    lib.kv_rope_bf16.argtypes = [ctypes.c_void_p, ctypes.c_int64] + [ctypes.c_void_p] * 3 + [ctypes.c_int] * 3
    lib.kv_rope_bf16.restype = None
    lib.kv_decode_attn_bf16.argtypes = (
        [ctypes.c_void_p] * 3 + [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
        + [ctypes.c_int] * 5 + [ctypes.c_float, ctypes.c_int]
        + [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
    )
    lib.kv_decode_attn_bf16.restype = ctypes.c_int
    lib.kv_decoder_stack_scratch.argtypes = [ctypes.c_int] * 6
    lib.kv_decoder_stack_scratch.restype = ctypes.c_int64
    lib.kv_decoder_stack_bf16.argtypes = (
        [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        + [ctypes.c_void_p] * 5 + [ctypes.c_int]
        + [ctypes.c_void_p] * 3 + [ctypes.c_int] * 7 + [ctypes.c_float, ctypes.c_int, ctypes.c_float]
    )
    lib.kv_decoder_stack_bf16.restype = ctypes.c_int
    logger.info("CPU C kernels loaded from %s", lib_path)
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, or None (with the reason logged once) where it can't run."""
    return _library()


def load() -> ctypes._CFuncPtr | None:
    """The GEMV entry point, or None (with the reason logged once) where it can't run."""
    lib = _library()
    return lib.kv_gemv_bf16 if lib is not None else None


def attention_available() -> bool:
    return _library() is not None


def usable(x: torch.Tensor) -> bool:
    """True for a few bf16 tokens (rows of dim 0) on the CPU, where the kernels beat PyTorch's
    op-per-step costs."""
    return (
        x.dtype == torch.bfloat16
        and x.device.type == "cpu"
        and x.shape[0] <= MAX_ROWS
        and _library() is not None
    )


def gemv_silu_mul(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """silu(x @ gate.T) * (x @ up.T) for the fused [2N, I] gate/up `weight`: [M, I] -> [M, N]."""
    x = x.contiguous()
    m, n = x.shape[0], weight.shape[0] // 2
    out = torch.empty((m, n), dtype=torch.bfloat16)
    _library().kv_gemv_silu_mul_bf16(weight.data_ptr(), x.data_ptr(), out.data_ptr(), m, n, weight.shape[1])
    return out


def rope_factors(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin_signed) [T, 1, D] bf16 for int64 `positions` [T] and fp32 `inv_freq` [D/2]: what
    `RotaryEmbedding.for_step` builds in a dozen PyTorch ops, in one call (libm's sinf/cosf
    where PyTorch uses its vectorized ones: the bf16 results agree to within one ulp)."""
    positions, inv_freq = positions.contiguous(), inv_freq.float().contiguous()
    t, d = positions.shape[0], 2 * inv_freq.shape[0]
    cos, sin_signed = torch.empty((t, 1, d), dtype=torch.bfloat16), torch.empty((t, 1, d), dtype=torch.bfloat16)
    _library().kv_rope_factors_bf16(positions.data_ptr(), inv_freq.data_ptr(), cos.data_ptr(), sin_signed.data_ptr(), t, d)
    return cos, sin_signed


def rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """`Ops.rotate` for bf16 rows: x [T, H, D] (heads contiguous in a row) with cos and
    sin_signed [T, 1, D] -> a new [T, H, D], bit for bit what the PyTorch ops give."""
    t, h, d = x.shape
    if x.stride(2) != 1 or x.stride(1) != d:
        x = x.contiguous()
    cos, sin_signed = cos.contiguous(), sin_signed.contiguous()
    out = torch.empty((t, h, d), dtype=torch.bfloat16)
    _library().kv_rope_bf16(x.data_ptr(), x.stride(0), cos.data_ptr(), sin_signed.data_ptr(), out.data_ptr(), t, h, d)
    return out


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """rmsnorm(x) * weight for bf16 rows: `F.rms_norm`'s formula in one pass (fp32, rounded once;
    the sum of squares in the same order as `add_rmsnorm`, so the two agree bit for bit)."""
    x, weight = x.contiguous(), weight.contiguous()
    out = torch.empty_like(x)
    n = x.shape[-1]
    _library().kv_rmsnorm_bf16(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.numel() // n, n, eps)
    return out


def add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rmsnorm(x + residual) * weight, x + residual) for bf16 rows, in one pass."""
    x, residual, weight = x.contiguous(), residual.contiguous(), weight.contiguous()
    out, total = torch.empty_like(x), torch.empty_like(x)
    n = x.shape[-1]
    _library().kv_add_rmsnorm_bf16(
        x.data_ptr(), residual.data_ptr(), weight.data_ptr(), out.data_ptr(), total.data_ptr(),
        x.numel() // n, n, eps,
    )
    return out, total


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


def decode_attention(
    q: torch.Tensor,  # [B, Hq, D] bf16, rows may be strided
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, Hkv, D] bf16, contiguous
    tables: torch.Tensor,  # [B, nblk] int32, contiguous
    lens: torch.Tensor,  # [B] int32
    scale: float,
    sliding_window: int | None,
    new_kv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:  # [B, Hq, D] bf16
    """One query row per sequence over the paged cache. `new_kv` = (k [B, Hkv, D], v, slots
    [B] int64): this step's keys and values, written to their slots (-1 = skip) first, in the
    same call; without it they must already be in the cache."""
    lib = _library()
    b, hq, d = q.shape
    _, num_blocks, bs, hkv, _ = kv_cache.shape
    if q.stride(2) != 1 or q.stride(1) != d:
        q = q.contiguous()
    out = torch.empty((b, hq, d), dtype=torch.bfloat16)
    k_ptr = kv_cache.data_ptr()
    v_ptr = k_ptr + num_blocks * bs * hkv * d * kv_cache.element_size()
    write = (None, 0, None, 0, None)
    if new_kv is not None:
        k, v, slots = new_kv
        k = k if k.stride(2) == 1 and k.stride(1) == d else k.contiguous()
        v = v if v.stride(2) == 1 and v.stride(1) == d else v.contiguous()
        slots = slots.to(torch.int64).contiguous()
        write = (k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0), slots.data_ptr())
    rc = lib.kv_decode_attn_bf16(
        k_ptr, v_ptr, q.data_ptr(), q.stride(0), out.data_ptr(), tables.data_ptr(), tables.stride(0),
        lens.data_ptr(), b, hq, hkv, d, bs, scale, sliding_window or 0, *write,
    )
    if rc != 0:
        raise MemoryError("decode attention: scratch allocation failed")
    return out
