"""MXFP4 weights (OCP microscaling FP4): gpt-oss's expert format, and GGML type 39.

A block is 32 weights sharing one E8M0 scale byte `e` (the power of two 2^(e - 127)); each
weight is a 4-bit E2M1 code (sign, 2 exponent bits, 1 mantissa bit: 0, 0.5, 1, 1.5, 2, 3, 4, 6
and their negatives). Two layouts arrive:

- gpt-oss safetensors: `*_blocks` uint8 [..., rows, G, 16] (byte j of a block holds weights 2j in
  its low nibble and 2j + 1 in its high one) beside `*_scales` uint8 [..., rows, G];
- GGML type 39 (a GGUF file): 17-byte blocks, the scale byte then 16 bytes, byte j holding
  weights j (low nibble) and j + 16 (high).

kvserve keeps one form, GGML's (`QuantizedTensor(MXFP4, data [rows, G * 17], cols)`), so both
sources load into the same linear method and the same dequantization; `from_gpt_oss` repacks the
safetensors pair (nibbles reordered, bit-exact, still 4-bit). Everything here is plain PyTorch on
any device.
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

MXFP4 = 39  # GGML type id
BLOCK = 32
BLOCK_BYTES = 17
# E2M1 code -> value (the sign is the top bit).
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)

_LUT: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _pair_lut(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[256, 2]: a byte's (low nibble, high nibble) values: one gather per byte."""
    key = (device, dtype)
    lut = _LUT.get(key)
    if lut is None:
        v = torch.tensor(FP4_VALUES, dtype=torch.float32)
        b = torch.arange(256)
        lut = _LUT[key] = torch.stack([v[b & 15], v[b >> 4]], dim=-1).to(device=device, dtype=dtype)
    return lut


def row_bytes(cols: int) -> int:
    if cols % BLOCK:
        raise ValueError(f"MXFP4 rows must be a multiple of {BLOCK} values (got {cols})")
    return cols // BLOCK * BLOCK_BYTES


def dequantize(data: torch.Tensor, cols: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [rows, G * 17] (GGML layout) -> [rows, cols] in `dtype`. The products by powers of
    two are exact, so any dtype wide enough for the scales gives the exact weights."""
    rows = data.shape[0]
    g = cols // BLOCK
    blocks = data.reshape(rows, g, BLOCK_BYTES)
    qs = blocks[..., 1:].long()  # [rows, G, 16]
    vals = _pair_lut(data.device, dtype)[qs]  # [rows, G, 16, 2]: (weight j, weight j + 16)
    vals = vals.transpose(-1, -2).reshape(rows, g, BLOCK)  # weights 0..15, then 16..31
    e = blocks[..., 0].to(torch.int32) - 127
    scale = torch.ldexp(torch.ones(e.shape, dtype=torch.float32, device=data.device), e)
    return (vals * scale.to(dtype)[..., None]).reshape(rows, cols)


_SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "mxfp4_f32.c"
_FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC"]


@lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    """The CPU kernels of `csrc/mxfp4_f32.c` (built on first use), or None: PyTorch then
    dequantizes and multiplies (`KVSERVE_CPU_KERNELS=0` forces that)."""
    if os.environ.get("KVSERVE_CPU_KERNELS", "1") == "0":
        return None
    from kvserve.kernels import cbuild
    from kvserve.platform.cpuinfo import isa_level

    # AVX2 + FMA where the ISA level allows (KVSERVE_CPU_ISA caps it), else portable C.
    flags = _FLAGS + (["-mavx2", "-mfma"] if isa_level().startswith(("avx2", "avx512")) else [])
    path = cbuild.library_path("kvserve_mxfp4", [_SOURCE], flags)
    try:
        if not path.exists():
            cbuild.build(path, [_SOURCE], flags, timeout=120)
        torch.zeros(1).add_(1)  # PyTorch's OpenMP runtime first (shared)
        lib = ctypes.CDLL(str(path))
        if lib.kv_mxfp4_abi_version() != 1:
            raise RuntimeError("stale kernel build")
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        logger.warning("MXFP4 CPU kernels unavailable (%s); using PyTorch", e)
        return None
    vp, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.kv_mxfp4_linear_f32.argtypes = [vp, i64, i64, vp, i64, vp, vp]
    lib.kv_mxfp4_linear_f32.restype = ctypes.c_int
    lib.kv_mxfp4_dequant_f32.argtypes = [vp, i64, i64, vp]
    lib.kv_mxfp4_dequant_f32.restype = ctypes.c_int
    return lib


def linear(data: torch.Tensor, cols: int, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, cols] times the MXFP4 matrix `data` [N, G * 17] transposed (+ bias) -> [M, N] in x's
    dtype. On the CPU, up to 8 rows run the C kernel straight from the blocks (no dense copy);
    more rows dequantize once (C) and run one sgemm; elsewhere PyTorch dequantizes."""
    lib = _library() if data.device.type == "cpu" and x.device.type == "cpu" else None
    if lib is None:
        return torch.nn.functional.linear(x, dequantize(data, cols, x.dtype), bias)
    n, m = data.shape[0], x.shape[0]
    data = data.contiguous()
    xf = x.float().contiguous()
    bf = None if bias is None else bias.float().contiguous()
    if 1 <= m <= 8:
        out = torch.empty(m, n, dtype=torch.float32)
        lib.kv_mxfp4_linear_f32(data.data_ptr(), n, cols, xf.data_ptr(), m, None if bf is None else bf.data_ptr(),
                                out.data_ptr())
    else:
        w = torch.empty(n, cols, dtype=torch.float32)
        lib.kv_mxfp4_dequant_f32(data.data_ptr(), n, cols, w.data_ptr())
        out = torch.addmm(bf, xf, w.t()) if bf is not None else xf @ w.t()
    return out.to(x.dtype)


def from_gpt_oss(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """gpt-oss's pair, blocks uint8 [..., rows, G, 16] and scales uint8 [..., rows, G] ->
    GGML-layout bytes uint8 [..., rows, G * 17] (the same codes and scales, nibbles reordered)."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks and scales must be uint8 (got {blocks.dtype}, {scales.dtype})")
    if blocks.shape[-1] != 16 or tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} do not match scales {tuple(scales.shape)}")
    codes = torch.stack([blocks & 15, blocks >> 4], dim=-1).flatten(-2)  # [..., G, 32] in weight order
    qs = codes[..., :16] | (codes[..., 16:] << 4)  # byte j: weight j low, weight j + 16 high
    out = torch.cat([scales[..., None], qs], dim=-1)  # [..., G, 17]
    return out.flatten(-2)


def to_gpt_oss(data: torch.Tensor, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of `from_gpt_oss` (for writing checkpoints in gpt-oss's layout)."""
    b = data.reshape(*data.shape[:-1], cols // BLOCK, BLOCK_BYTES)
    scales, qs = b[..., 0].contiguous(), b[..., 1:]
    codes = torch.cat([qs & 15, qs >> 4], dim=-1)  # [..., G, 32]
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks.contiguous(), scales


def quantize(w: torch.Tensor) -> torch.Tensor:
    """[rows, cols] float -> GGML-layout MXFP4 bytes, each value rounded to the nearest code
    under a block scale of 2^(floor(log2(max|w|)) - 2) (the largest code, 6, covers the max).
    For tests and random-weight benchmarks; real checkpoints arrive quantized."""
    rows, cols = w.shape
    row_bytes(cols)
    x = w.float().reshape(rows, cols // BLOCK, BLOCK)
    amax = x.abs().amax(dim=-1)
    e = torch.where(amax > 0, torch.floor(torch.log2(amax.clamp_min(1e-30))) - 2 + 127, torch.zeros_like(amax))
    e = e.clamp(0, 254)
    scaled = x / torch.ldexp(torch.ones_like(e), (e - 127).to(torch.int32))[..., None]
    values = torch.tensor(FP4_VALUES)
    codes = (scaled[..., None] - values).abs().argmin(dim=-1).to(torch.uint8)  # [rows, G, 32]
    qs = codes[..., :16] | (codes[..., 16:] << 4)
    return torch.cat([e.to(torch.uint8)[..., None], qs], dim=-1).reshape(rows, -1)
