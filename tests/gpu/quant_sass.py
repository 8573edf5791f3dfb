"""Compile the int8 dequantizing GEMM (`kvserve/kernels/triton_quant._qmm_kernel`, its default
int32-word tile `_deq_tile_w`) for sm_90 without a GPU: its inline PTX (`_f16_pair`, which the
interpreter does not run) must assemble, the codes must become floats without integer-to-float
conversions (no I2F; HADD2.F32 instead) and the bf16 builds must not spill.

    python -m tests.gpu.quant_sass    # prints a summary; exit status 1 if a check fails

Needs Triton's bundled ptxas/nvdisasm (pip `triton` ships them); no CUDA device.
"""

from __future__ import annotations

import sys


from kvserve.kernels import triton_quant as tq
from tests.gpu.mxfp4_sass import compile_sm90, sass_of


def qmm_int8(act: str, kind: int, group: int):
    """`_qmm_kernel` as `qmm` launches it for an int8 weight (words) at 16 rows, 64-row tiles."""
    fn = tq._qmm_kernel
    scale = "*fp32" if kind == 2 else "*fp16"
    sig = {"x_ptr": f"*{act}", "q_ptr": "*i32", "s_ptr": scale, "o_ptr": scale, "b_ptr": f"*{act}",
           "out_ptr": f"*{act}", "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_q": "i32",
           "stride_s": "i32", "stride_om": "i32"}
    cons = dict(KIND=kind, HAS_OFF=False, GROUP=group, HAS_BIAS=False, IEEE=act == "fp32", BLOCK_M=16, BLOCK_N=64,
                BLOCK_K=128, PDL=True, WORDS=True)
    aligned = ["x_ptr", "q_ptr", "s_ptr", "o_ptr", "b_ptr", "out_ptr", "K", "stride_xm", "stride_q", "stride_om"]
    return compile_sm90(fn, sig, cons, aligned, num_warps=4, num_stages=4)


def main() -> int:
    failures = []
    # bf16: the 1152 folded into the scale's offset; fp32 (IEEE): subtracted in fp16 (sub.f16x2).
    for act, kind, group in (("bf16", 2, 32), ("bf16", 1, 32), ("fp32", 2, 32), ("fp32", 1, 32)):
        k = qmm_int8(act, kind, group)
        sass, usage = sass_of(k.asm["cubin"])
        name = f"qmm int8 {act} KIND {kind}"
        print(f"{name}: {usage}, I2F {sass.count('I2F')}, HADD2.F32 {sass.count('HADD2.F32')}, "
              f"sub.f16x2 {k.asm['ptx'].count('sub.f16x2')}")
        if sass.count("I2F") or not sass.count("HADD2.F32"):
            failures.append(f"{name}: codes converted with I2F, not the fp16 word trick")
        if act == "fp32" and not k.asm["ptx"].count("sub.f16x2"):
            failures.append(f"{name}: no exact fp16 subtraction of 1152")
        if usage.get("LOCAL", 0) or (act == "bf16" and usage.get("STACK", 0)):
            failures.append(f"{name}: spills ({usage})")
    for f in failures:
        print("FAIL", f)
    if failures:
        return 1
    print("quant sass checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
