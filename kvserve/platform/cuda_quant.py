"""Quantized projection weights on CUDA: weight-only int8 / int4, FP8, and GGUF blocks repacked.

Formats (`QWeight`; the kernels and exact layouts are in `kvserve/kernels/triton_quant.py`):

| `--quantization` / GGUF type | storage                                   | w =          | group |
|------------------------------|-------------------------------------------|--------------|-------|
| int8 (HF checkpoint)         | int8, fp32 scale per output channel        | s·q, symmetric (absmax / 127) | row |
| int4 (HF checkpoint)         | 4-bit, fp16 scale and offset per group     | s·q + m, asymmetric (min / max, q 0..15) | 128 |
| fp8 (HF checkpoint, sm_89+)  | float8_e4m3fn, fp32 scale per channel      | s·q (absmax / 448) | row |
| GGUF Q8_0                    | int8 + its fp16 block scale                | d·q          | 32    |
| GGUF Q4_0 / Q4_1             | its nibbles as they are, fp16 d and m (−8d for Q4_0) | d·q + m | 32 |
| GGUF Q4_K                    | nibbles reordered, fp32 d·sc and −dmin·m   | s·q + m      | 32    |

The GGUF repacks are exact: the dequantized values equal the gguf package's (tested). A GGUF
part in another format (Q5_K, Q6_K, ...) or a layer whose parts would need two layouts is
dequantized to the model dtype and runs on the bf16 kernels; the start-up log counts them.

Products (`CudaQuantLinearMethod.apply`):

- one row: the quantized GEMV (dequantizes in registers), with SiLU·mul or RoPE + K/V store
  in its epilogue for fused gate/up and qkv projections, as the bf16 GEMV;
- up to `QMM_MAX_ROWS` rows (64): the dequantizing Triton GEMM for int8 and FP8; 4-bit
  weights of any group size take the word GEMM (`triton_qmm4`, KVSERVE_INT4_QMM=auto, the
  default; "codes" the code-at-a-time GEMM, which skipped groups of 32) up to
  `INT4_QMM_MAX_ROWS` (128) rows;
- more rows: int8 / int4 dequantized to the model dtype in one pass, then cuBLAS; FP8 with
  per-row dynamic activation scales through `torch._scaled_mm` (FP8 tensor cores); the norm /
  SiLU·mul kernel that produced x already wrote them (`fused_ops.fp8_activation`,
  KVSERVE_FP8_FUSED_ACT=1, the default), else `act_quant_fp8` here.
  (`benchmarks/gpu_quant_bench.py` measured the crossover; see benchmarks/RESULTS.md.)

Dense checkpoint shards are quantized as they arrive (on the GPU), so the bf16 model is never
held whole. Off CUDA (tests) every product is the PyTorch reference: dequantize, `F.linear`.
"""

from __future__ import annotations

import logging
import os
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvserve.models import fused_ops
from kvserve.models.layers import WeightLoadError
from kvserve.models.linear import Linear, QuantizedTensor
from kvserve.platform.cuda_linear import TritonGemvLinearMethod

logger = logging.getLogger(__name__)


def _rows_env(name: str, default: int) -> int:
    """A row-count switch from the environment: a whole number >= 0, else an error naming it."""
    value = os.environ.get(name, str(default))
    try:
        rows = int(value)
    except ValueError:
        rows = -1
    if rows < 0:
        raise ValueError(f"{name} must be a whole number >= 0 (got {value!r})")
    return rows


SCHEMES = ("int8", "int4", "fp8")
INT4_GROUP = 128
# GGML type ids (kernels/cpu_quant.QTYPES) that repack exactly.
Q4_0, Q4_1, Q8_0, Q4_K = 2, 3, 8, 12
REPACKABLE = {Q4_0: "int4", Q4_1: "int4", Q8_0: "int8", Q4_K: "int4"}
# Rows up to which the dequantizing Triton GEMM runs; above it, dequantize-then-cuBLAS (int8 /
# int4) or _scaled_mm (fp8). On an H200 (benchmarks/RESULTS.md) the int8 GEMM beat
# dequantize + cuBLAS up to 64 rows on every Llama-3.1-8B shape, and lost from 128 rows on two
# of three. KVSERVE_QMM_MAX_ROWS / KVSERVE_FP8_QMM_MAX_ROWS override them.
QMM_MAX_ROWS = _rows_env("KVSERVE_QMM_MAX_ROWS", 64)
# 4-bit weights in groups of 32 (GGUF Q4_0 / Q4_1 / Q4_K) skip the GEMM: on an H100 (2026-12-07,
# `gpu_quant_bench --only qmm`, Llama-3.1-8B gate_up, 2-64 rows) it took 740-780 us where
# dequantize + cuBLAS took 275-280 (int4 in groups of 128: 102-133 vs 215-219, GEMM kept).
QMM_MIN_INT4_GROUP = 64
FP8_QMM_MAX_ROWS = _rows_env("KVSERVE_FP8_QMM_MAX_ROWS", 64)
# 4-bit weights of every group size take the word GEMM (`kernels/triton_qmm4.py`,
# KVSERVE_INT4_QMM=auto by default) up to this many rows: one pass over the 4-bit weight, where
# dequantize + cuBLAS writes and reads it in 16 bits first. NVIDIA H100, 2026-12-07
# (`gpu_quant_bench --only qmm1`, Llama-3.1-8B gate_up int4 g128): 2-16 rows 48-54 µs against
# 80-85 for bf16 cuBLAS and 210-214 dequantized; 64 rows 89 vs 215 dequantized; 256 rows 326 vs
# 228 — the crossover lies between, so 128 (o_proj: 25.0 vs 28.5 at 64, 46 vs 37 at 256).
INT4_QMM_MAX_ROWS = _rows_env("KVSERVE_INT4_QMM_MAX_ROWS", 128)


def fp8_fused_act_mode() -> bool:
    """`KVSERVE_FP8_FUSED_ACT`: "1" (the default) has the RMSNorm (with or without the residual
    add) and SiLU·mul kernels also write their output in FP8 with per-row scales where FP8
    projections read it through `_scaled_mm` (more than FP8_QMM_MAX_ROWS rows), so those
    projections launch no `act_quant_fp8` of their own (the same bits:
    `fused_ops.fp8_activation`); "0" quantizes in each projection; other values are an error.
    Timed on an NVIDIA H100 (2026-12-07, `gpu_quant_bench --only prefill,throughput`): Llama-3.1-8B
    prefill 8 x 2048 264.6 -> 260.2 ms; the 256-request workload (Qwen3-0.6B shapes, noisy run to
    run) median 16,422 out tok/s over six runs against 14,075 in one run without it and 15,588
    for bf16 (median of five)."""
    value = os.environ.get("KVSERVE_FP8_FUSED_ACT", "1")
    if value not in ("0", "1"):
        raise ValueError(f"KVSERVE_FP8_FUSED_ACT must be 0 or 1 (got {value!r})")
    return value == "1"


@dataclass
class QWeight:
    """A quantized [N, K] matrix (see the module table). `q`: int8 / float8 [N, K] or uint8
    [N, K / 2] (int4); `scale` [N, K / group]; `offset` like `scale` or None."""

    kind: str  # "int8" | "int4" | "fp8"
    q: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor | None
    group: int
    cols: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.q.shape[0], self.cols)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.q, self.scale, self.offset) if t is not None)

    def layout(self) -> tuple:
        return (self.kind, self.group, self.scale.dtype, self.offset is not None)

    def to(self, device: torch.device) -> QWeight:
        return QWeight(
            self.kind, self.q.to(device), self.scale.to(device),
            None if self.offset is None else self.offset.to(device), self.group, self.cols,
        )

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The reference: [N, K] in fp32 arithmetic (s * q, then + m), then `dtype`."""
        n, k = self.shape
        if self.kind == "int4":
            b = self.q.view(n, k // 32, 16)
            q = torch.stack([b & 15, b >> 4], dim=2).reshape(n, k)
        else:
            q = self.q
        g = k // self.scale.shape[1]
        w = q.float() * self.scale.float().repeat_interleave(g, dim=1)
        if self.offset is not None:
            w = w + self.offset.float().repeat_interleave(g, dim=1)
        return w.to(dtype)


def cat_rows(parts: list[QWeight]) -> QWeight:
    if len(parts) == 1:
        return parts[0]
    p0 = parts[0]
    return QWeight(
        p0.kind, torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]),
        None if p0.offset is None else torch.cat([p.offset for p in parts]), p0.group, p0.cols,
    )


# -- quantizing dense weights ---------------------------------------------------------------
def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 values 0..15 [N, K] -> [N, K / 2] in GGML's chunk order (see triton_quant)."""
    n, k = q.shape
    c = q.to(torch.uint8).view(n, k // 32, 2, 16)
    return (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(n, k // 2)


def quantize(w: torch.Tensor, scheme: str, group: int = INT4_GROUP) -> QWeight:
    """A dense [N, K] weight (any float dtype, any device) in `scheme`; the arithmetic is fp32
    on w's device, and q is computed from the stored (rounded) scales so that the reference
    dequantization is exactly what the kernels multiply by."""
    n, k = w.shape
    w = w.float()
    if scheme == "int8":
        scale = (w.abs().amax(dim=1, keepdim=True) / 127.0)
        q = torch.where(scale > 0, w / torch.where(scale > 0, scale, 1.0), 0.0).round().clamp(-127, 127)
        return QWeight("int8", q.to(torch.int8), scale, None, k, k)
    if scheme == "fp8":
        scale = (w.abs().amax(dim=1, keepdim=True) / 448.0)
        safe = torch.where(scale > 0, scale, 1.0)
        q = (w / safe).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
        return QWeight("fp8", q, safe, None, k, k)
    if scheme == "int4":
        if k % group:
            raise ValueError(f"int4: {k} columns are not a multiple of the group size {group}")
        wg = w.view(n, k // group, group)
        lo, hi = wg.amin(dim=2), wg.amax(dim=2)
        scale = ((hi - lo) / 15.0).to(torch.float16)
        offset = lo.to(torch.float16)
        s, m = scale.float()[:, :, None], offset.float()[:, :, None]
        q = torch.where(s > 0, (wg - m) / torch.where(s > 0, s, 1.0), 0.0).round().clamp(0, 15)
        return QWeight("int4", pack_int4(q.view(n, k)), scale, offset, group, k)
    raise ValueError(f"quantization scheme must be one of {SCHEMES} (got {scheme!r})")


def int4_group(k: int) -> int | None:
    """Group size for an HF int4 layer of k input features (128; 32 where 128 does not divide
    a tensor-parallel shard), None where not even 32 does."""
    for g in (INT4_GROUP, 64, 32):
        if k % g == 0:
            return g
    return None


# -- GGUF blocks -> QWeight (exact) ---------------------------------------------------------
def _f16(b: torch.Tensor) -> torch.Tensor:
    """[..., 2] uint8 (little-endian) -> fp16 [...]."""
    return b.contiguous().view(torch.float16).squeeze(-1)


def repack_ggml(t: QuantizedTensor) -> QWeight | None:
    """GGML blocks -> the equivalent QWeight (on t's device), or None for a type without an
    exact repack."""
    n, k = t.shape
    data = t.data
    if t.qtype == Q8_0:
        blk = data.reshape(n, k // 32, 34)
        d = _f16(blk[:, :, 0:2])
        q = blk[:, :, 2:].contiguous().view(torch.int8).reshape(n, k)
        return QWeight("int8", q, d, None, 32, k)
    if t.qtype in (Q4_0, Q4_1):
        size = 18 if t.qtype == Q4_0 else 20
        blk = data.reshape(n, k // 32, size)
        d = _f16(blk[:, :, 0:2])
        if t.qtype == Q4_0:
            m = (d.float() * -8.0).to(torch.float16)
            if not torch.isfinite(m).all():  # -8d overflows fp16: keep it in fp32
                d, m = d.float(), d.float() * -8.0
        else:
            m = _f16(blk[:, :, 2:4])
        q = blk[:, :, size - 16:].reshape(n, k // 2).contiguous()
        return QWeight("int4", q, d, m, 32, k)
    if t.qtype == Q4_K:
        blk = data.reshape(n, k // 256, 144)
        d = _f16(blk[:, :, 0:2]).float()
        dmin = _f16(blk[:, :, 2:4]).float()
        sc_b = blk[:, :, 4:16].to(torch.int32)  # [n, nb, 12]
        qs = blk[:, :, 16:].to(torch.int32)  # [n, nb, 128]
        sc, mn = [], []
        for j in range(8):
            if j < 4:
                sc.append(sc_b[:, :, j] & 63)
                mn.append(sc_b[:, :, j + 4] & 63)
            else:
                sc.append((sc_b[:, :, j + 4] & 0xF) | ((sc_b[:, :, j - 4] >> 6) << 4))
                mn.append((sc_b[:, :, j + 4] >> 4) | ((sc_b[:, :, j] >> 6) << 4))
        sc = torch.stack(sc, dim=2).float()  # [n, nb, 8]
        mn = torch.stack(mn, dim=2).float()
        scale = (d[:, :, None] * sc).reshape(n, k // 32)
        offset = -(dmin[:, :, None] * mn).reshape(n, k // 32)
        # Sub-block 2p takes the low nibbles of qs[32p:32p+32], 2p+1 the high ones.
        pairs = qs.view(n, k // 256, 4, 32)
        vals = torch.stack([pairs & 15, pairs >> 4], dim=3).reshape(n, k)  # column order
        return QWeight("int4", pack_int4(vals), scale, offset, 32, k)
    return None


# -- the linear method ----------------------------------------------------------------------
def _cuda_kernels(x: torch.Tensor) -> bool:
    from kvserve.models import fused_ops

    return fused_ops.enabled_for(x)


class CudaQuantLinearMethod(TritonGemvLinearMethod):
    """Quantized weights (`scheme` for dense shards; GGUF blocks repacked where exact). A
    layer that cannot be quantized (see the module doc) keeps a dense weight and runs the bf16
    Triton GEMV / cuBLAS, as `TritonGemvLinearMethod`."""

    def __init__(self, scheme: str | None, device: torch.device, dtype: torch.dtype) -> None:
        if scheme is not None and scheme not in SCHEMES:
            raise ValueError(f"quantization must be one of {SCHEMES} (got {scheme!r})")
        self.scheme = scheme
        self.device = device
        self.dtype = dtype  # the model dtype: dense fallbacks and dequantized products
        self.name = f"cuda-{scheme or 'gguf'}"
        self._dummy = 0  # layers given random weights (load_format="dummy")

    # -- loading ----------------------------------------------------------------------------
    def create_weights(self, layer: Linear, dtype: torch.dtype | None) -> None:
        # Nothing is allocated up front: each shard is quantized (or repacked) as it arrives.
        layer.weight = None
        layer.qparts = {}  # shard -> (row offset, QWeight | dense tensor)
        layer.qweight = None
        layer.qdtype = dtype or self.dtype

    def load(self, layer: Linear, tensor: torch.Tensor | QuantizedTensor, shard: int) -> None:
        offset = 0 if shard < 0 else layer.shard_offset(shard)
        if shard in layer.qparts:
            raise WeightLoadError(f"{layer.label}: shard {shard} loaded twice")
        part: QWeight | torch.Tensor | None = None
        if isinstance(tensor, QuantizedTensor):
            part = repack_ggml(tensor)
            if part is not None:
                part = part.to(self.device)
            else:
                tensor = tensor.dequantize(torch.float32)
        if part is None:
            dense = tensor.detach().to(self.device)
            part = self._quantize_dense(layer, dense)
        layer.qparts[shard] = (offset, part)

    def _quantize_dense(self, layer: Linear, dense: torch.Tensor) -> QWeight | torch.Tensor:
        k = dense.shape[1]
        if self.scheme == "int4":
            g = int4_group(k)
            if g is not None:
                return quantize(dense, "int4", g)
        elif self.scheme in ("int8", "fp8") and k % 32 == 0:
            return quantize(dense, self.scheme)
        return dense.to(layer.qdtype)

    def finish(self, layer: Linear) -> None:
        if layer.weight is not None and not layer.qparts:  # tied to a dense table, or already final
            return
        if not layer.qparts:  # load_format="dummy": random weights, quantized like a checkpoint's
            self._dummy += 1
            gen = torch.Generator(device=self.device).manual_seed(zlib.crc32(layer.label.encode()) + self._dummy)
            w = torch.randn(layer.out_features, layer.in_features, generator=gen, device=self.device) * 0.02
            layer.qparts = {-1: (0, self._quantize_dense(layer, w))}
        parts = [p for _, p in sorted(layer.qparts.values(), key=lambda op: op[0])]
        layer.qparts = {}
        quantized = [p for p in parts if isinstance(p, QWeight)]
        if len(quantized) == len(parts) and len({p.layout() for p in parts}) == 1:
            qw = cat_rows(parts)
            layer.qweight = qw
            for name in ("q", "scale", "offset"):  # visible to model.to() / memory accounting
                t = getattr(qw, name)
                if t is not None:
                    layer.register_buffer(f"qweight_{name}", t, persistent=False)
            return
        if quantized:
            logger.info("%s: parts %s kept dense (no common quantized layout)", layer.label,
                        [p.layout() if isinstance(p, QWeight) else "dense" for p in parts])
        dense = torch.cat([p.dequantize(layer.qdtype) if isinstance(p, QWeight) else p.to(layer.qdtype) for p in parts])
        layer.weight = torch.nn.Parameter(dense.contiguous(), requires_grad=False)

    def make_dense(self, layer: Linear) -> None:
        """Drop any quantized storage: the layer's `weight` (set by the caller) is used."""
        layer.qparts = {}
        layer.qweight = None

    # -- products ---------------------------------------------------------------------------
    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        qw = layer.qweight
        if qw is None:
            return super().apply(layer, x)
        shape = x.shape
        x2 = x.reshape(-1, layer.in_features)
        act = fused_ops.fp8_activation(x) if qw.kind == "fp8" else fused_ops.half_pairs(x)
        out = self._product(qw, x2, layer.bias, act)
        return out.view(*shape[:-1], out.shape[-1])

    def _product(
        self, qw: QWeight, x: torch.Tensor, bias: torch.Tensor | None,
        act: tuple | None = None,  # x's act_quant_fp8 (fp8) / act_pairs (int4, int8), if written with it
    ) -> torch.Tensor:
        if not _cuda_kernels(x):
            return F.linear(x, qw.dequantize(x.dtype), bias)
        from kvserve.kernels import triton_quant

        m = x.shape[0]
        if m == 0:
            return x.new_empty((0, qw.shape[0]))
        if not x.is_contiguous():
            x = x.contiguous()
        if m == 1:
            return triton_quant.qgemv(x, qw, bias, pairs=act if qw.kind != "fp8" else None)
        if qw.kind == "int4" and triton_quant.INT4_QMM != "codes":
            if m <= INT4_QMM_MAX_ROWS:
                return triton_quant.qmm(x, qw, bias)
            return F.linear(x, triton_quant.dequantize(qw, x.dtype), bias)
        if m <= (FP8_QMM_MAX_ROWS if qw.kind == "fp8" else QMM_MAX_ROWS) and not (
            qw.kind == "int4" and qw.group < QMM_MIN_INT4_GROUP
        ):
            return triton_quant.qmm(x, qw, bias)
        if qw.kind == "fp8" and x.dtype in (torch.bfloat16, torch.float16):
            if act is not None and act[0].shape == x.shape:
                xq, xs = act  # written by the norm / SiLU·mul kernel (KVSERVE_FP8_FUSED_ACT=1)
            else:
                xq, xs = triton_quant.act_quant_fp8(x)
            out = torch._scaled_mm(xq, qw.q.t(), scale_a=xs, scale_b=qw.scale.view(1, -1), out_dtype=x.dtype)
            return out if bias is None else out + bias
        return F.linear(x, triton_quant.dequantize(qw, x.dtype), bias)

    def apply_silu_mul(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        qw = layer.qweight
        if qw is None:
            return super().apply_silu_mul(layer, x)
        if x.dim() == 2 and x.shape[0] == 1 and _cuda_kernels(x):
            from kvserve.kernels import triton_quant

            return triton_quant.qgemv(x.contiguous(), qw, layer.bias, silu=True, pairs=fused_ops.half_pairs(x))
        return self.ops.silu_and_mul(self.apply(layer, x))

    def apply_qkv_rope(self, layer: Linear, x: torch.Tensor, *args) -> torch.Tensor | None:
        qw = layer.qweight
        if qw is None:
            return super().apply_qkv_rope(layer, x, *args)
        if x.dim() == 2 and x.shape[0] == 1 and _cuda_kernels(x):
            from kvserve.kernels import triton_quant

            return triton_quant.qgemv_rope_(x.contiguous(), qw, layer.bias, *args, pairs=fused_ops.half_pairs(x))
        return None

    def describe(self, layer: Linear) -> str:
        qw = getattr(layer, "qweight", None)
        if qw is None:
            return f"{self.name}[dense]"
        return f"{self.name}[{qw.kind} g{qw.group}]"


def describe_weights(model: torch.nn.Module) -> str:
    """'int4 g128 x 112, dense x 1'-style summary of a model's projections."""
    from collections import Counter

    kinds: Counter[str] = Counter()
    for m in model.modules():
        if isinstance(m, Linear):
            qw = getattr(m, "qweight", None)
            kinds["dense" if qw is None else f"{qw.kind} g{qw.group}"] += 1
    return ", ".join(f"{k} x {n}" for k, n in kinds.most_common())
