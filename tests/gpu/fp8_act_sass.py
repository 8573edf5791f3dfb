"""Compile the norm and SiLU·mul kernels that also write FP8 activations
(`models/triton_ops.py`: `_rmsnorm_kernel` with FP8, `_silu_mul_fp8_kernel`) for sm_90 without a
GPU, at Llama-3.1-8B's and Qwen3-0.6B's widths, in bf16.

    python -m tests.gpu.fp8_act_sass

Checks (exit status 1 if one fails): no local memory (spills), and the FP8 stores convert with
the hardware's e4m3 instruction (F2FP ... E4M3). Needs Triton's bundled ptxas/nvdisasm."""

from __future__ import annotations

import sys

from kvserve.models import triton_ops as to
from tests.gpu.mxfp4_sass import compile_sm90, sass_of


def norm(hidden: int, res: bool):
    block = 1 << (hidden - 1).bit_length()
    rt = {"x_ptr": "*bf16", "res_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16", "res_out_ptr": "*bf16",
          "q_ptr": "*fp8e4nv", "scale_ptr": "*fp32", "sum_ptr": "*fp32", "stride_x": "i32", "stride_r": "i32",
          "stride_o": "i32", "stride_ro": "i32", "n_cols": "i32", "eps": "fp32"}
    ce = dict(HAS_RES=res, FP8=True, BLOCK=block, PDL=True)
    aligned = ["x_ptr", "res_ptr", "w_ptr", "out_ptr", "res_out_ptr", "q_ptr", "stride_x", "stride_r", "stride_o",
               "stride_ro", "n_cols"]
    return compile_sm90(to._rmsnorm_kernel, rt, ce, aligned, min(max(block // 256, 1), 16))


def silu(inter: int):
    block = to.silu_fp8_block(inter)
    rt = {"x_ptr": "*bf16", "out_ptr": "*bf16", "q_ptr": "*fp8e4nv", "scale_ptr": "*fp32", "stride_x": "i32",
          "stride_o": "i32", "n_cols": "i32"}
    aligned = ["x_ptr", "out_ptr", "q_ptr", "stride_x", "stride_o", "n_cols"]
    return compile_sm90(to._silu_mul_fp8_kernel, rt, dict(BLOCK=block, PDL=True), aligned, 4 if block >= 1024 else 2)


def main() -> int:
    failed = 0
    cases = {f"norm H={h} res={r}": (lambda h=h, r=r: norm(h, r)) for h in (4096, 1024) for r in (False, True)}
    cases.update({f"silu_fp8 I={i}": (lambda i=i: silu(i)) for i in (14336, 3072)})
    for name, build in cases.items():
        sass, usage = sass_of(build().asm["cubin"])
        e4m3 = sum("E4M3" in line and "F2FP" in line for line in sass.splitlines())
        ok = usage.get("LOCAL", 0) == 0 and e4m3 > 0
        print(f"{name}: REG {usage.get('REG')} LOCAL {usage.get('LOCAL', 0)} F2FP.E4M3 {e4m3} {'ok' if ok else 'FAIL'}")
        failed += not ok
    if failed:
        return 1
    print("fp8 act sass checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
