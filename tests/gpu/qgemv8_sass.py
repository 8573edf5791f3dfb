"""Compile the one-row int8 GEMV (`kvserve/kernels/triton_quant._qgemv_kernel`) for sm_90 without a
GPU and report its K loop: instructions per weight for the code-at-a-time decode (`_dot_rows`) and
the int32-word decode (`_dot_rows_w8`, KVSERVE_INT8_GEMV=words), per channel (KIND 2: HF int8) and in
groups of 32 (KIND 1: GGUF Q8_0). The word decode must load the codes with 16-byte vectors, convert
them without I2F (HADD2.F32 from the fp16 pairs), keep shared memory and barriers out of the loop and
not spill, at the configs `benchmarks/gpu_quant_bench.py` sweeps.

    python -m tests.gpu.qgemv8_sass            # prints the summary; exit status 1 if a check fails
    python -m tests.gpu.qgemv8_sass --dump DIR # also writes the PTX and SASS

Needs Triton's bundled ptxas/nvdisasm (pip `triton` ships them); no CUDA device.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kvserve.kernels import triton_quant as tq
from tests.gpu.mxfp4_sass import compile_sm90
from tests.gpu.qgemv_sass import ACT, per_thread, report, rope


def qgemv(words: bool, act: str, rows: int, block_k: int, warps: int, kind: int = 2, group: int = 32,
          silu: bool = False, prefetch: bool = False):
    """`_qgemv_kernel` as `qgemv` launches it for an int8 weight (kind 2: per channel, 1: groups)."""
    fn = tq._qgemv_kernel
    x = ("i64" if act != "fp32" else "fp32") if words else act
    sig = {"x_ptr": f"*{x}", "q_ptr": "*i32" if words else "*i8", "s_ptr": "*fp32" if kind == 2 else "*fp16",
           "o_ptr": "*fp32" if kind == 2 else "*fp16", "b_ptr": f"*{act}", "out_ptr": f"*{act}", "N": "i32",
           "K": "i32", "stride_q": "i32", "stride_s": "i32", "one": "i32"}
    cons = dict(KIND=kind, HAS_OFF=False, GROUP=group if kind == 1 else (16 if words else 32), HAS_BIAS=False,
                SILU=silu, ROWS=rows, BLOCK_N=rows // 2 if silu else rows, BLOCK_K=block_k, PDL=True)
    if words:
        cons.update(W8=True, XKIND=ACT[act], PREFETCH=prefetch)
    aligned = ["x_ptr", "q_ptr", "s_ptr", "o_ptr", "b_ptr", "out_ptr", "K", "stride_q", "stride_s"]
    return compile_sm90(fn, sig, cons, aligned, num_warps=warps)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dump", type=Path, default=None)
    ap.add_argument("--quick", action="store_true", help="only the default configs")
    args = ap.parse_args()
    failures = []
    bn, cap, warps = tq.GEMV_CONFIG["int8"]
    per_old = {}
    for kind in (2, 1):
        per_old[kind], _ = report(f"codes8_bf16_kind{kind}_r{bn}_k{cap}_w{warps}",
                                  qgemv(False, "bf16", bn, cap, warps, kind), per_thread(bn, cap, warps), args.dump,
                                  strict=False)
    cfgs = [tq.INT8_WORDS_CONFIG, tq.INT8_WORDS_CONFIG_NARROW]
    cfgs += [] if args.quick else [c for c in tq.INT8_WORDS_SWEEP if c not in cfgs]
    per_new = {}
    for i, (r, bk, w, pf) in enumerate(cfgs):
        # the defaults in every activation dtype and both kinds; the sweep in bf16, per channel
        forms = [(act, kind) for kind in (2, 1) for act in ("bf16", "fp16", "fp32")] if i < 2 else [("bf16", 2)]
        for act, kind in forms:
            name = f"words8_{act}_kind{kind}_r{r}_k{bk}_w{w}{'_pf' if pf else ''}"
            per, f = report(name, qgemv(True, act, r, bk, w, kind, prefetch=pf), per_thread(r, bk, w), args.dump,
                            strict=True)
            failures += f
            if i == 0 and act == "bf16":
                per_new[kind] = per
    r, bk, w, pf = tq.INT8_WORDS_CONFIG
    failures += report(f"words8_bf16_silu_r{r}_k{bk}_w{w}", qgemv(True, "bf16", r, bk, w, silu=True, prefetch=pf),
                       per_thread(r, bk, w), args.dump, strict=True)[1]
    pairs, bk, w, pf = tq.INT8_WORDS_ROPE_CONFIG
    failures += report(f"words8_bf16_rope_p{pairs}_k{bk}_w{w}", rope(pairs, bk, w, pf, bits=8), per_thread(2 * pairs, bk, w),
                       args.dump, strict=True)[1]
    for kind in (2, 1):
        print(f"int8 GEMV K loop, SASS instructions a weight (bf16, kind {kind}, default tiles): code at a time "
              f"{per_old[kind]:.2f}, int32 words {per_new[kind]:.2f}")
    for msg in failures:
        print("FAIL", msg)
    if failures:
        return 1
    print("qgemv8 sass checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
