"""Compile the int8 dequantizing GEMM (`kvserve/kernels/triton_quant._qmm_kernel`, its default
int32-word tile `_deq_tile_w`) for sm_90 without a GPU: its inline PTX (`_f16_pair`, which the
interpreter does not run) must assemble, the codes must become floats without integer-to-float
conversions (no I2F; HADD2.F32 instead) and the bf16 builds must not spill.

The same for the 4-bit word GEMM (`triton_qmm4._qmm4_kernel`, KVSERVE_INT4_QMM=words|raw|auto) at its default
tiles for 16 rows (a wide weight; a narrow one with split K), next to the code-at-a-time 4-bit
tile of `_qmm_kernel`: SASS instructions per weight in the K loop, old and new, are printed.

    python -m tests.gpu.quant_sass    # prints a summary; exit status 1 if a check fails

Needs Triton's bundled ptxas/nvdisasm (pip `triton` ships them); no CUDA device.
"""

from __future__ import annotations

import sys


from kvserve.kernels import triton_qmm4 as tq4
from kvserve.kernels import triton_quant as tq
from tests.gpu.mxfp4_sass import compile_sm90, loops, sass_of

_SIG4 = {"q_ptr": "*u8", "s_ptr": "*fp16", "o_ptr": "*fp16", "M": "i32", "N": "i32", "K": "i32",
         "stride_xm": "i32", "stride_q": "i32", "stride_s": "i32", "stride_om": "i32"}
_ALIGNED = ["x_ptr", "q_ptr", "s_ptr", "o_ptr", "b_ptr", "out_ptr", "K", "stride_xm", "stride_q", "stride_om"]


def qmm_int4_old(act: str, m: int, n: int):
    """`_qmm_kernel` as `qmm` launches it for an HF int4 weight (group 128) a code at a time."""
    bm, bn, bk, warps, stages = tq.qmm_config(m, n)
    sig = {**_SIG4, "x_ptr": f"*{act}", "b_ptr": f"*{act}", "out_ptr": f"*{act}"}
    cons = dict(KIND=0, HAS_OFF=True, GROUP=128, HAS_BIAS=False, IEEE=act == "fp32", BLOCK_M=bm, BLOCK_N=bn,
                BLOCK_K=min(bk, 128), PDL=True, WORDS=False)
    return compile_sm90(tq._qmm_kernel, sig, cons, _ALIGNED, num_warps=warps, num_stages=stages), bn * min(bk, 128) // (warps * 32)


def qmm_int4_words(act: str, raw: bool, m: int, n: int, group: int = 128, smem: bool | None = None):
    """`triton_qmm4._qmm4_kernel` at `qmm4_config(m, n, group)` (`smem`: that config's tile through shared memory or not)."""
    bm, bn, bk, warps, stages, split, smem_default = tq4.qmm4_config(m, n, group)
    smem = bool(smem_default) if smem is None else smem
    bk = min(bk, group) if raw else bk
    sig = {**_SIG4, "x_ptr": f"*{act}", "b_ptr": f"*{act}", "out_ptr": f"*{act}"}
    cons = dict(ACT={"fp32": 0, "fp16": 1, "bf16": 2}[act], RAW=raw, HAS_OFF=True, GROUP=group, HAS_BIAS=False,
                BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, PDL=True, SPLIT_K=split, PURE=not smem)
    return compile_sm90(tq4._qmm4_kernel, sig, cons, _ALIGNED, num_warps=warps, num_stages=stages), bn * bk // (warps * 32)


def k_loop(sass: str) -> tuple[int, int]:
    """(instructions in the K loop: the loop body with tensor-core instructions and the most
    bit operations (LOP3: the codes), those in the other loops with tensor-core instructions:
    the raw mode's activation group sums after the K loop)."""
    bodies = [b for b in loops(sass) if b.get("HMMA")]
    if not bodies:
        return 0, 0
    main = max(bodies, key=lambda b: (b.get("LOP3", 0), sum(b.values())))
    return sum(main.values()), sum(sum(b.values()) for b in bodies if b is not main)


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
    # 4-bit: the code-at-a-time tile, then the word GEMM's two modes (16 rows; Llama-3.1-8B
    # gate_up (28672 rows) and o (4096 rows, split K)).
    for n in (28672, 4096):
        k, per = qmm_int4_old("bf16", 16, n)
        sass, usage = sass_of(k.asm["cubin"])
        loop, _ = k_loop(sass)
        print(f"qmm int4 old bf16 16x{n}: {usage}, K loop {loop} instructions for {per} weights a thread = "
              f"{loop / per:.2f} a weight")
        for act, raw, smem in (("bf16", False, None), ("bf16", True, None), ("fp16", False, None), ("fp16", True, None),
                               ("bf16", False, True), ("bf16", True, True)):
            k, per = qmm_int4_words(act, raw, 16, n, smem=smem)
            sass, usage = sass_of(k.asm["cubin"])
            loop, other = k_loop(sass)
            name = f"qmm4 {'raw' if raw else 'words'} {act} 16x{n}{' (tile through shared memory)' if smem else ''}"
            print(f"{name}: {usage}, K loop {loop} instructions for {per} weights a thread = {loop / per:.2f} a weight"
                  + (f" (+ group-sum loops after it: {other} instructions)" if other else "") + f", I2F {sass.count('I2F')}")
            if act != "fp32" and sass.count("I2F"):
                failures.append(f"{name}: codes converted with I2F")
            if usage.get("LOCAL", 0):
                failures.append(f"{name}: spills ({usage})")
    for f in failures:
        print("FAIL", f)
    if failures:
        return 1
    print("quant sass checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
