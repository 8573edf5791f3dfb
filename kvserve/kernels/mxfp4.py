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

import torch

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
