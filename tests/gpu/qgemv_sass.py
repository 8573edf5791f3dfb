"""Compile the one-row 4-bit GEMV (`kvserve/kernels/triton_quant._qgemv_kernel`) for sm_90 without a
GPU and report its K loop: instructions per weight for the code-at-a-time decode (`_dot_rows`) and
the int32-word decode (`_dot_rows_w4`, KVSERVE_INT4_GEMV=words). The word decode must load the codes
with 16-byte vectors, convert them without I2F (HADD2.F32 from the fp16 pairs), keep shared memory and
barriers out of the loop and not spill, at the configs `benchmarks/gpu_quant_bench.py` sweeps.

    python -m tests.gpu.qgemv_sass            # prints the summary; exit status 1 if a check fails
    python -m tests.gpu.qgemv_sass --dump DIR # also writes the PTX and SASS

Needs Triton's bundled ptxas/nvdisasm (pip `triton` ships them); no CUDA device.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from kvserve.kernels import triton_quant as tq
from tests.gpu.mxfp4_sass import compile_sm90, loops, sass_of

ACT = {"bf16": 0, "fp16": 1, "fp32": 2}


def qgemv(words: bool, act: str, rows: int, block_k: int, warps: int, group: int = 128, has_off: bool = True,
          silu: bool = False, prefetch: bool = False):
    """`_qgemv_kernel` as `qgemv` launches it for a 4-bit weight."""
    fn = tq._qgemv_kernel
    x = ("i64" if act != "fp32" else "fp32") if words else act
    sig = {"x_ptr": f"*{x}", "q_ptr": "*i32" if words else "*u8", "s_ptr": "*fp16", "o_ptr": "*fp16",
           "b_ptr": f"*{act}", "out_ptr": f"*{act}", "N": "i32", "K": "i32", "stride_q": "i32", "stride_s": "i32",
           "one": "i32"}
    cons = dict(KIND=0, HAS_OFF=has_off, GROUP=group, HAS_BIAS=False, SILU=silu, ROWS=rows,
                BLOCK_N=rows // 2 if silu else rows, BLOCK_K=block_k, PDL=True)
    if words:
        cons.update(W4=True, XKIND=ACT[act], PREFETCH=prefetch)
    aligned = ["x_ptr", "q_ptr", "s_ptr", "o_ptr", "b_ptr", "out_ptr", "K", "stride_q", "stride_s"]
    return compile_sm90(fn, sig, cons, aligned, num_warps=warps)


def rope(pairs: int, block_k: int, warps: int, prefetch: bool, bits: int = 4):
    """`_qgemv_rope_kernel` as `qgemv_rope_` launches it for a bf16 weight with the word decode (head_dim
    128): 4-bit in groups of 128 with offsets, or (`bits` 8) int8 per channel."""
    fn = tq._qgemv_rope_kernel
    scale = "*fp16" if bits == 4 else "*fp32"
    sig = {"x_ptr": "*i64", "q_ptr": "*i32", "s_ptr": scale, "o_ptr": scale, "b_ptr": "*bf16",
           "out_ptr": "*bf16", "pos_ptr": "*i64", "cos_sin_ptr": "*fp32", "cache_ptr": "*bf16", "slot_ptr": "*i64"}
    sig.update({name: "i32" for name in ("K", "stride_q", "stride_s", "stride_cs", "num_q_heads", "num_heads",
                                         "stride_plane", "stride_slot", "stride_head", "one")})
    cons = dict(HAS_BIAS=False, HALF=64, BLOCK_K=block_k, WRITE_KV=True, PDL=True, XKIND=0, PREFETCH=prefetch,
                PAIRS=pairs)
    cons.update(dict(KIND=0, HAS_OFF=True, GROUP=128, W4=True) if bits == 4 else
                dict(KIND=2, HAS_OFF=False, GROUP=32, W8=True))
    aligned = ["x_ptr", "q_ptr", "s_ptr", "o_ptr", "b_ptr", "out_ptr", "cos_sin_ptr", "cache_ptr", "K", "stride_q",
               "stride_s", "stride_cs", "stride_plane", "stride_slot", "stride_head"]
    return compile_sm90(fn, sig, cons, aligned, num_warps=warps)


def per_thread(rows: int, block_k: int, warps: int) -> int:
    """Weights one thread decodes per K step (rows x BLOCK_K over the program's threads)."""
    return rows * block_k // (warps * 32)


def report(name: str, k, weights_per_iter: int, dump: Path | None, strict: bool) -> tuple[float, list[str]]:
    """(instructions per weight in the K loop, failures)."""
    sass, usage = sass_of(k.asm["cubin"])
    if dump:
        dump.mkdir(parents=True, exist_ok=True)
        (dump / f"{name}.ptx").write_text(k.asm["ptx"])
        (dump / f"{name}.sass").write_text(sass)
    bodies = loops(sass)
    body = max(bodies, key=lambda b: sum(b.values())) if bodies else {}
    n = sum(body.values())
    per = n / weights_per_iter
    ldg = {op: c for op, c in body.items() if op.startswith("LDG")}
    ldg128 = len(re.findall(r"LDG\.E(?:\.[A-Z]+)*\.128", sass))
    conv = {op: c for op, c in body.items() if op.startswith(("I2F", "F2F", "HADD2", "I2FP", "PRMT"))}
    shared = {op: c for op, c in body.items() if op in ("BAR", "STS", "LDS", "SHFL")}
    print(f"{name}: {usage}; K loop {n} instructions for {weights_per_iter} weights a thread = {per:.2f} a weight; "
          f"LDG.128 in SASS {ldg128}")
    print(f"  loop mix: {dict(body.most_common(10))}")
    print(f"  loop loads {ldg}; conversions {conv}; shared/barrier/shuffle {shared or 'none'}")
    failures = []
    if strict:
        if body.get("I2F", 0) or body.get("I2FP", 0):
            failures.append(f"{name}: int-to-float conversions in the K loop")
        if not ldg128:
            failures.append(f"{name}: no 16-byte code loads")
        if shared:
            failures.append(f"{name}: shared memory / barriers / shuffles in the K loop ({shared})")
        if usage.get("LOCAL", 0):
            failures.append(f"{name}: spills ({usage})")
        if not body.get("HADD2", 0):
            failures.append(f"{name}: codes not widened from fp16 pairs (no HADD2.F32)")
    return per, failures


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dump", type=Path, default=None)
    ap.add_argument("--quick", action="store_true", help="only the default configs")
    args = ap.parse_args()
    failures = []
    bn, cap, warps = tq.GEMV_CONFIG["int4"]
    per_old, _ = report(f"codes_bf16_g128_r{bn}_k{cap}_w{warps}", qgemv(False, "bf16", bn, cap, warps),
                        per_thread(bn, cap, warps), args.dump, strict=False)
    default = tq.INT4_WORDS_CONFIG
    cfgs = [default, tq.INT4_WORDS_CONFIG_NARROW]
    cfgs += [] if args.quick else [c for c in tq.INT4_WORDS_SWEEP if c not in cfgs]
    per_new = None
    for i, (r, bk, w, pf) in enumerate(cfgs):
        # the default in every activation dtype / group / offset form; the sweep in bf16, g128
        forms = (("bf16", 128, True), ("bf16", 32, True), ("fp16", 32, False), ("fp32", 32, True)) if i == 0 else \
            (("bf16", 128, True),)
        for act, group, off in forms:
            per, f = report(f"words_{act}_g{group}{'' if off else '_nooff'}_r{r}_k{bk}_w{w}{'_pf' if pf else ''}",
                            qgemv(True, act, r, bk, w, group, off, prefetch=pf), per_thread(r, bk, w), args.dump,
                            strict=True)
            failures += f
            if i == 0 and act == "bf16" and group == 128:
                per_new = per
    r, bk, w, pf = default
    failures += report(f"words_bf16_silu_r{r}_k{bk}_w{w}", qgemv(True, "bf16", r, bk, w, silu=True, prefetch=pf),
                       per_thread(r, bk, w), args.dump, strict=True)[1]
    pairs, bk, w, pf = tq.INT4_WORDS_ROPE_CONFIG
    failures += report(f"words_bf16_rope_p{pairs}_k{bk}_w{w}", rope(pairs, bk, w, pf), per_thread(2 * pairs, bk, w),
                       args.dump, strict=True)[1]
    print(f"int4 GEMV K loop, SASS instructions a weight (bf16, g128, default tiles): code at a time {per_old:.2f}, "
          f"int32 words {per_new:.2f}")
    for msg in failures:
        print("FAIL", msg)
    if failures:
        return 1
    print("qgemv sass checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
