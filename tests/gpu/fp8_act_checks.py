"""The FP8 activation written by the norm and SiLU·mul kernels (KVSERVE_FP8_FUSED_ACT=1,
`fused_ops.rmsnorm_fp8` / `add_rmsnorm_fp8` / `silu_and_mul_fp8`) equals the unfused path bit for
bit: the kernel's output, then `triton_quant.act_quant_fp8` of it. Shared by the GPU tests
(`tests/gpu/test_quant_gpu.py`, real shapes, bf16) and the CPU test that runs them under
TRITON_INTERPRET=1 on tiny shapes (`tests/kernels/test_fp8_act.py`)."""

from __future__ import annotations

import torch


def _same(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype, (what, a.shape, b.shape, a.dtype, b.dtype)
    if a.dtype == torch.float8_e4m3fn:
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    assert torch.equal(a.cpu(), b.cpu()), what


def _rows(t: int, h: int, device: str, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=g) * 3
    x[0] = 0.0  # an all-zero row: the 1e-12 floor of the scale
    x[1, : h // 2] *= 1e3  # a wide range in one row: the rest of it rounds to tiny or zero e4m3 values
    return x.to(device=device, dtype=dtype)


def check_norms(t: int, h: int, device: str, dtype: torch.dtype) -> None:
    from kvserve.kernels import triton_quant
    from kvserve.models import fused_ops

    x = _rows(t, h, device, dtype, 1)
    res = _rows(t, h, device, dtype, 2)
    res[0] = 0.0
    w = (torch.rand(h, generator=torch.Generator().manual_seed(3)) + 0.5).to(device=device, dtype=dtype)
    want = fused_ops.rmsnorm(x, w, 1e-6)
    got = fused_ops.rmsnorm_fp8(x, w, 1e-6)
    _same(got, want, "rmsnorm out")
    q, s = fused_ops.fp8_activation(got)
    wq, ws = triton_quant.act_quant_fp8(want)
    _same(s, ws, "rmsnorm scale")
    _same(q, wq, "rmsnorm fp8")
    want, want_res = fused_ops.add_rmsnorm(x, res, w, 1e-6)
    got, got_res = fused_ops.add_rmsnorm_fp8(x, res, w, 1e-6)
    _same(got, want, "add_rmsnorm out")
    _same(got_res, want_res, "add_rmsnorm residual")
    assert fused_ops.fp8_activation(got_res) is None
    q, s = fused_ops.fp8_activation(got)
    wq, ws = triton_quant.act_quant_fp8(want)
    _same(s, ws, "add_rmsnorm scale")
    _same(q, wq, "add_rmsnorm fp8")


def check_silu(t: int, inter: int, device: str, dtype: torch.dtype, block: int | None = None) -> None:
    """`block`: the fused kernel's columns at a time (None: its default), to cover several chunks."""
    from kvserve.kernels import triton_quant
    from kvserve.models import fused_ops, triton_ops

    x = _rows(t, 2 * inter, device, dtype, 4)
    x[2, inter:] = 0.0  # up all zero: a zero output row
    want = fused_ops.silu_and_mul(x)
    if block is None:
        got = fused_ops.silu_and_mul_fp8(x)
        q, s = fused_ops.fp8_activation(got)
    else:
        got, q, s = triton_ops.silu_and_mul_fp8(x, block=block)
    _same(got, want, "silu_and_mul out")
    wq, ws = triton_quant.act_quant_fp8(want)
    _same(s, ws, "silu_and_mul scale")
    _same(q, wq, "silu_and_mul fp8")


def check_ops(device: str, dtype: torch.dtype) -> None:
    """CudaTritonOps writes the FP8 form only above `fp8_act_rows` rows, only when set."""
    from kvserve.models import fused_ops
    from kvserve.platform.cuda_ops import CudaTritonOps

    ops = CudaTritonOps()
    w = torch.ones(64, device=device, dtype=dtype)
    x = _rows(5, 64, device, dtype, 5)
    assert fused_ops.fp8_activation(ops.rms_norm(x, w, 1e-6)) is None
    assert fused_ops.fp8_activation(ops.silu_and_mul(torch.cat([x, x], 1))) is None
    ops.fp8_act_rows = 4
    assert fused_ops.fp8_activation(ops.rms_norm(x, w, 1e-6)) is not None
    assert fused_ops.fp8_activation(ops.add_rms_norm(x, x, w, 1e-6)[0]) is not None
    assert fused_ops.fp8_activation(ops.silu_and_mul(torch.cat([x, x], 1))) is not None
    assert fused_ops.fp8_activation(ops.rms_norm(x[:4], w, 1e-6)) is None  # 4 rows: the FP8 GEMM reads 16 bits
    assert fused_ops.fp8_activation(ops.rms_norm(x.float(), w.float(), 1e-6)) is None  # fp32: no _scaled_mm
    assert fused_ops.fp8_activation(ops.rms_norm(x.view(5, 4, 16), w[:16], 1e-6)) is None  # q/k norm shapes


def run_interpret() -> None:
    """Tiny CPU shapes (run with TRITON_INTERPRET=1): rows wider than one block of the unfused
    quantizer are not needed for equality (its max is exact in any order)."""
    for dtype in (torch.float16, torch.bfloat16):
        check_norms(6, 96, "cpu", dtype)  # 96: a masked tail in the 128-wide block
        check_silu(5, 96, "cpu", dtype)
        check_silu(5, 96, "cpu", dtype, block=32)  # three chunks a row
        check_silu(5, 96, "cpu", dtype, block=64)  # two, the second half masked
        check_ops("cpu", dtype)
    print("interpret checks passed")


if __name__ == "__main__":
    run_interpret()
