"""Quantized GGML block-format matmuls on the CPU (`kvserve/csrc/quant/kvq_*.c`): build, load, call.

Weights stay in their GGUF block bytes (uint8 tensors [N, row_bytes]; Q8_0, Q4_0, Q4_1, Q5_0, Q4_K,
Q5_K, Q6_K) and are multiplied directly: activations are quantized to 8-bit blocks and integer
dot products run over the blocks (as llama.cpp does). For prefill-sized inputs `linear` instead
dequantizes the weight to fp32 and calls torch.matmul, whichever is faster (see
`dequant_min_rows`).

One library is built per instruction-set level (`baseline` plain C; x86 `avx2`, `avx512`;
aarch64 `neon`, `neon-dotprod`), compiled once into `$KVSERVE_CACHE_DIR` (default
`~/.cache/kvserve`) and loaded with ctypes. The platform's ISA level picks the build
(`platform/cpuinfo.py`: `KVSERVE_CPU_ISA` = baseline | avx2 | avx512 | avx512_bf16 | neon |
dotprod | native caps it); `KVSERVE_CPU_KERNELS=0` turns the C kernels off. Without them every function here falls back to PyTorch (dequantizing through
the gguf package), with one log line saying why.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import subprocess
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from kvserve.kernels import cbuild

logger = logging.getLogger(__name__)

QUANT_DIR = Path(__file__).resolve().parent.parent / "csrc" / "quant"
ABI_VERSION = 1

QTYPES: dict[str, int] = {"Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q8_0": 8, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14}
# GGML id -> (values per block, bytes per block)
BLOCKS: dict[int, tuple[int, int]] = {2: (32, 18), 3: (32, 20), 6: (32, 22), 8: (32, 34), 12: (256, 144), 13: (256, 176), 14: (256, 210)}
_QUANTIZABLE = (2, 3, 8)

# -ffp-contract=off: dequantization must round like the gguf package (no fused multiply-adds).
_COMMON_FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC", "-ffp-contract=off"]
_AVX2 = ["-mavx2", "-mfma", "-mf16c"]
_LEVEL_FLAGS: dict[str, list[str]] = {
    "baseline": ["-DKVQ_SCALAR"],
    "avx2": _AVX2,
    "avx512": [*_AVX2, "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"],
    "neon": ["-march=armv8-a"],
    "neon-dotprod": ["-march=armv8.2-a+dotprod"],
}

# Rows (tokens) from which `linear` dequantizes the weight to fp32 and calls torch.matmul instead
# of the int8 kernel. Measured on the 2-core AMD EPYC (Zen 3 class, AVX2+FMA+F16C, no AVX-512)
# reference machine, one thread (the machine was shared, so 2-thread timings were unusable),
# SmolLM2-135M shapes, int8 vs dequant+sgemm in ms:
#   Q4_1 1536x576  M=16 0.57 vs 0.75, M=32 1.08 vs 1.08, M=64 2.11 vs 1.63, M=256 16.4 vs 9.4
#   Q4_1 576x1536  M=16 0.50 vs 0.73, M=32 0.94 vs 1.00, M=64 1.82 vs 1.60, M=256 11.6 vs 6.5
#   Q8_0 4096x576  M=16 1.46 vs 2.14, M=32 2.79 vs 4.95, M=64 9.44 vs 6.48, M=256 41.6 vs 26.9
# so the crossover lies between 32 and 64 rows.
DEQUANT_MIN_ROWS = 48
# The AVX-512 VNNI build's Q4_0 / Q4_1 / Q5_0 kernels (gemm_zdirect, 48-row chunks above 48 rows)
# beat dequant+sgemm at every row count measured, so there these formats never switch. 2-core AMD
# EPYC Zen 5, torch fp32 sgemm, weights cycled through 48 MB of copies, median µs of int8 (one
# gemm_int8 per part) vs the path GGMLLinearMethod.apply takes from here (parts dequantized into
# one matrix, one sgemm; benchmarks/cpu_dequant_threshold.py), 1 thread / 2 threads:
#   Q4_1 qkv 3 parts 960x576  M=64  743 vs 912 / 675 vs 870     M=256 2638 vs 3179 / 1845 vs 2051
#                             M=512 4653 vs 6362 / 3249 vs 3311
#   Q4_1 576x576              M=64  354 vs 578 / 242 vs 480     M=256 1407 vs 1955 / 739 vs 1213
#   Q4_1 gate/up 2x1536x576   M=64 1867 vs 3411 / 1090 vs 2890  M=256 5269 vs 10960 / 3950 vs 7229
#   Q4_1 576x1536             M=64  591 vs 1483 / 414 vs 1275   M=256 3171 vs 5564 / 1729 vs 3351
#   Q5_0 2x2048x640 (Gemma 3) M=64 1477 vs 2789 (2 threads)     M=256 4639 vs 9819
# (from 128 rows the ratio stays at 0.45-0.75, 0.96-0.98 for qkv on 2 threads at 384-512).
# End to end, LLM("smollm2") prefill (max_tokens=1, no prefix-cache hits) of 64 / 128 / 200 / 400
# tokens, best of 4 interleaved, 2 threads 128 / 221 / 335 / 696 ms -> 63 / 107 / 199 / 495 ms, 1
# thread 255 / 403 / 587 / 1229 -> 127 / 233 / 317 / 747 ms (32 tokens, the same path: 59 / 72 ms).
# Q4_0 shares gemm_zdirect with Q4_1 (not timed apart). Other formats (Q8_0, K formats: the tile
# path above 48 rows; not measured here) and other builds keep 48.
_VNNI_NEVER_DEQUANT = frozenset(QTYPES[name] for name in ("Q4_0", "Q4_1", "Q5_0"))


# ---- build and load ----


def available_levels() -> list[str]:
    """The library builds this CPU can run, lowest first (from `platform/cpuinfo.py`'s probe)."""
    from kvserve.platform.cpuinfo import cpu_info

    return sorted({_build_for(level) for level in cpu_info().levels()}, key=list(_LEVEL_FLAGS).index)


def _build_for(level: str) -> str:
    """The library build for a platform ISA level (`platform/cpuinfo.py`): AVX-512 builds use
    VNNI's dot products, so an AVX-512 CPU without VNNI takes the AVX2 build."""
    from kvserve.platform.cpuinfo import cpu_info

    if level in ("avx512", "avx512_bf16"):
        return "avx512" if cpu_info().has("avx512_vnni") else "avx2"
    return {"dotprod": "neon-dotprod"}.get(level, level)


def isa_level() -> str:
    """The build `library()` loads: the platform's ISA level (`KVSERVE_CPU_ISA` caps it; default
    native, the best this CPU has), mapped onto the builds above."""
    from kvserve.platform.cpuinfo import isa_level as platform_level

    return _build_for(platform_level())


def _sources() -> list[Path]:
    # every .c here: the decoder stack (decoder_stack_f32.c) links against the kvq kernels
    return sorted(QUANT_DIR.glob("*.c"))


def _declare(lib: ctypes.CDLL) -> None:
    i64, p, i = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    sigs = {
        "kvq_abi_version": ([], i),
        "kvq_isa": ([], ctypes.c_char_p),
        "kvq_row_bytes": ([i, i64], i64),
        "kvq_act_bytes": ([i, i64, i64], i64),
        "kvq_quantize_act": ([i, p, i64, p, i64, i64], None),
        "kvq_quantize_act_range": ([i, p, i64, p, i64, i64, i64, i64], None),
        "kvq_gemm": ([i, p, i64, p, p, p, i64, i64, i64, i64], None),
        "kvq_gemm_range": ([i, p, i64, p, p, p, i64, i64, i64, i64, i64, i64], None),
        "kvq_gemm_rows": ([i, p, i64, p, p, p, i64, i64, i64, i64], None),
        "kvq_dequantize": ([i, p, i64, p, i64, i64], None),
        "kvq_get_rows": ([i, p, i64, i64, p, i64, i64, p], i),
        "kvq_quantize_weights": ([i, p, p, i64, i64], i),
    }
    for name, (args, res) in sigs.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res


@lru_cache(maxsize=None)
def load_library(level: str) -> ctypes.CDLL | None:
    """Build (once) and load the library of one level; None, with one warning, if that fails.
    Tests call this directly to compare levels; everything else goes through `library()`."""
    if level not in _LEVEL_FLAGS:
        raise ValueError(f"unknown CPU ISA level {level!r}; expected one of {', '.join(_LEVEL_FLAGS)}")
    flags = [*_COMMON_FLAGS, *_LEVEL_FLAGS[level]]
    lib_path = cbuild.library_path(f"kvq-{level}", [*_sources(), *sorted(QUANT_DIR.glob("*.h"))], flags)
    try:
        if not lib_path.exists():
            cbuild.build(lib_path, _sources(), flags)
        torch.zeros(1).add_(1)  # make sure PyTorch's OpenMP runtime is loaded first (shared)
        lib = ctypes.CDLL(str(lib_path))
        if lib.kvq_abi_version() != ABI_VERSION:
            raise RuntimeError("stale kernel build")
        _declare(lib)
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        logger.warning("quantized CPU kernels (%s) unavailable (%s); using PyTorch", level, e)
        return None
    logger.info("quantized CPU kernels (%s, %s) loaded from %s", level, lib.kvq_isa().decode(), lib_path)
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded library for `isa_level()`, or None where the C kernels are off or can't be built.
    Called on every product: the choice is cached per value of the two switches (tests change
    them), so a call is two environment reads."""
    return _library_for(os.environ.get("KVSERVE_CPU_KERNELS", "1"), os.environ.get("KVSERVE_CPU_ISA", ""))


@lru_cache(maxsize=None)
def _library_for(kernels: str, isa: str) -> ctypes.CDLL | None:
    if kernels == "0":
        return None
    return load_library(isa_level())


_DEFAULT = object()


def _lib(lib: ctypes.CDLL | None | object) -> ctypes.CDLL | None:
    return library() if lib is _DEFAULT else lib  # type: ignore[return-value]


# ---- formats ----


def _qid(qtype: str | int) -> int:
    if isinstance(qtype, str):
        if qtype.upper() not in QTYPES:
            raise ValueError(f"qtype {qtype!r}: expected one of {', '.join(QTYPES)}")
        return QTYPES[qtype.upper()]
    if qtype not in BLOCKS:
        raise ValueError(f"qtype {qtype}: expected a GGML id in {sorted(BLOCKS)}")
    return int(qtype)


def block_size(qtype: str | int) -> int:
    """Values per block: 32, or 256 for the K formats."""
    return BLOCKS[_qid(qtype)][0]


def row_bytes(qtype: str | int, K: int) -> int:
    """Bytes of one row of K values."""
    bs, bb = BLOCKS[_qid(qtype)]
    if K <= 0 or K % bs != 0:
        raise ValueError(f"K={K}: must be a positive multiple of the block size {bs}")
    return K // bs * bb


def _check_weight(q: int, w: torch.Tensor, K: int) -> None:
    rb = row_bytes(q, K)
    if w.dtype != torch.uint8 or w.dim() != 2 or w.shape[1] != rb or w.stride(1) != 1:
        raise ValueError(f"w: expected uint8 [N, {rb}] with contiguous rows, got {w.dtype} {tuple(w.shape)}")


def _gguf_type(q: int):  # noqa: ANN202 - gguf.GGMLQuantizationType
    import gguf

    return gguf.GGMLQuantizationType(q)


# ---- API ----


def dequantize(
    qtype: str | int, w: torch.Tensor, K: int, *, lib: ctypes.CDLL | None | object = _DEFAULT,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """uint8 [N, row_bytes] -> float32 [N, K], equal to gguf.quants.dequantize bit for bit
    (into `out`, a contiguous float32 [N, K], when given)."""
    q = _qid(qtype)
    _check_weight(q, w, K)
    lib = _lib(lib)
    if out is not None and (out.dtype != torch.float32 or tuple(out.shape) != (w.shape[0], K) or not out.is_contiguous()):
        raise ValueError(f"out: expected a contiguous float32 tensor of shape {(w.shape[0], K)}")
    if lib is None:
        import gguf

        got = torch.from_numpy(gguf.quants.dequantize(w.contiguous().numpy(), _gguf_type(q)).astype(np.float32))
        return got if out is None else out.copy_(got)
    if out is None:
        out = torch.empty((w.shape[0], K), dtype=torch.float32)
    lib.kvq_dequantize(q, w.data_ptr(), w.stride(0), out.data_ptr(), w.shape[0], K)
    return out


def get_rows(
    qtype: str | int, w: torch.Tensor, K: int, ids: torch.Tensor, *, lib: ctypes.CDLL | None | object = _DEFAULT
) -> torch.Tensor:
    """An embedding lookup: float32 [n, K] = dequantized rows `ids` [n] of w. IndexError for an
    id outside [0, N)."""
    q = _qid(qtype)
    _check_weight(q, w, K)
    ids = ids.reshape(-1).to(torch.int64).contiguous()
    n_rows = w.shape[0]
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= n_rows):
        bad = ids[(ids < 0) | (ids >= n_rows)][0].item()
        raise IndexError(f"row id {bad} out of range [0, {n_rows})")
    lib = _lib(lib)
    if lib is None:
        return dequantize(q, w[ids], K, lib=None)
    out = torch.empty((ids.numel(), K), dtype=torch.float32)
    if lib.kvq_get_rows(q, w.data_ptr(), w.stride(0), n_rows, ids.data_ptr(), ids.numel(), K, out.data_ptr()) != 0:
        raise IndexError(f"row id out of range [0, {n_rows})")
    return out


def quantize_weights(qtype: str | int, x: torch.Tensor, *, lib: ctypes.CDLL | None | object = _DEFAULT) -> torch.Tensor:
    """float32 [N, K] -> uint8 [N, row_bytes] in Q8_0, Q4_0 or Q4_1 (bytes equal gguf.quants.quantize)."""
    q = _qid(qtype)
    if q not in _QUANTIZABLE:
        raise ValueError(f"qtype {qtype!r}: quantize_weights supports Q8_0, Q4_0 and Q4_1")
    if x.dim() != 2:
        raise ValueError(f"x: expected [N, K], got {tuple(x.shape)}")
    n, k = x.shape
    rb = row_bytes(q, k)
    x = x.to(torch.float32).contiguous()
    lib = _lib(lib)
    if lib is None:
        import gguf

        return torch.from_numpy(np.ascontiguousarray(gguf.quants.quantize(x.numpy(), _gguf_type(q))))
    out = torch.empty((n, rb), dtype=torch.uint8)
    lib.kvq_quantize_weights(q, x.data_ptr(), out.data_ptr(), n, k)
    return out


def quantize_act_reference(x: torch.Tensor) -> torch.Tensor:
    """The activation rounding of the int8 path, in PyTorch: x [M, K] float32 -> the float32
    values the integer dots actually multiply (per 32 values d = max|x|/127, round(x/d)*d)."""
    m, k = x.shape
    xb = x.to(torch.float32).reshape(m, k // 32, 32)
    d = xb.abs().amax(-1, keepdim=True) / 127.0
    inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
    return (torch.round(xb * inv) * d).reshape(m, k)


def _flatten(x: torch.Tensor, K: int) -> torch.Tensor:
    if x.shape[-1] != K:
        raise ValueError(f"x: last dim {x.shape[-1]} != K={K}")
    return x.reshape(-1, K).to(torch.float32).contiguous()


def gemm_int8(
    qtype: str | int,
    w: torch.Tensor,
    K: int,
    x: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    lib: ctypes.CDLL | None | object = _DEFAULT,
    rowwise: bool = False,
) -> torch.Tensor:
    """x [..., K] -> [..., N] through 8-bit activations and integer block dots.

    rowwise: each output row is the same bits whatever the number of rows (`kvq_gemm_rows`:
    Q8_0 one weight row at a time at every row count, Q5_0 its direct kernel up to 48 rows; the
    other formats' kernels already are)."""
    q = _qid(qtype)
    _check_weight(q, w, K)
    x2 = _flatten(x, K)  # [M, K]
    m, n = x2.shape[0], w.shape[0]
    lib = _lib(lib)
    if lib is None:
        out = quantize_act_reference(x2) @ dequantize(q, w, K, lib=None).T
        if bias is not None:
            out += bias.to(torch.float32)
        return out.reshape(*x.shape[:-1], n)
    out = torch.empty((m, n), dtype=torch.float32)
    if m:
        xq = torch.empty(lib.kvq_act_bytes(q, m, K), dtype=torch.uint8)
        lib.kvq_quantize_act(q, x2.data_ptr(), K, xq.data_ptr(), m, K)
        b = bias.to(torch.float32).contiguous() if bias is not None else None
        gemm = lib.kvq_gemm_rows if rowwise else lib.kvq_gemm
        gemm(q, w.data_ptr(), w.stride(0), xq.data_ptr(), b.data_ptr() if b is not None else None,
             out.data_ptr(), n, m, n, K)
    return out.reshape(*x.shape[:-1], n)


def linear_dequant(
    qtype: str | int,
    w: torch.Tensor,
    K: int,
    x: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    lib: ctypes.CDLL | None | object = _DEFAULT,
) -> torch.Tensor:
    """x [..., K] -> [..., N]: the weight dequantized to fp32, then one sgemm (prefill sizes)."""
    q = _qid(qtype)
    _check_weight(q, w, K)
    x2 = _flatten(x, K)
    wf = dequantize(q, w, K, lib=lib)  # [N, K]
    out = torch.addmm(bias.to(torch.float32), x2, wf.T) if bias is not None else x2 @ wf.T
    return out.reshape(*x.shape[:-1], w.shape[0])


def dequant_min_rows(qtype: str | int, lib: ctypes.CDLL | None | object = _DEFAULT) -> float:
    """Rows from which `linear` dequantizes W and calls sgemm: DEQUANT_MIN_ROWS, or never (inf)
    for the formats whose AVX-512 VNNI kernels win at every row count, where the library (default
    the loaded one) is that build. Called on every product: the build's answer is cached."""
    lib = _lib(lib)
    return math.inf if lib is not None and _qid(qtype) in _never_dequant(lib) else DEQUANT_MIN_ROWS


@lru_cache(maxsize=None)
def _never_dequant(lib: ctypes.CDLL) -> frozenset[int]:
    return _VNNI_NEVER_DEQUANT if lib.kvq_isa() == b"avx512vnni" else frozenset()


def linear(
    qtype: str | int, w: torch.Tensor, K: int, x: torch.Tensor, bias: torch.Tensor | None = None, rowwise: bool = False
) -> torch.Tensor:
    """x [..., K] float32 @ W[N, K].T (+ bias) -> [..., N] float32 for block-quantized W.

    Few rows (decode): int8 activations and integer dots, streaming W once. From
    `dequant_min_rows` rows (prefill) or without the C library: dequantize W and use sgemm.
    rowwise (LM heads): below that each row's output is the same bits whatever the
    row count (`gemm_int8`), so a speculative verify step's rows equal one-row decodes."""
    lib = library()
    rows = x.numel() // max(K, 1)
    if lib is None or rows >= dequant_min_rows(qtype, lib):
        return linear_dequant(qtype, w, K, x, bias, lib=lib)
    return gemm_int8(qtype, w, K, x, bias, lib=lib, rowwise=rowwise)
