"""Compile the verify GEMM (`kvserve/kernels/triton_verify_gemm.py`) for sm_90 without a GPU at
the default config (64 weight rows x 128 K per tile, 16 activation rows, 4 warps, 4 stages),
every epilogue, split-K on and off, with PDL, and report what the machine code does: tensor-core
MMAs (HGMMA = wgmma, HMMA = mma.sync), the weight stream pipelined through asynchronous copies
(LDGSTS = cp.async, UTMALDG = TMA; plain LDG in the K loop would mean no pipelining), registers,
shared memory and spills. Checks: MMAs present, the K loop's weight loads asynchronous, no
local memory.

    python -m tests.gpu.verify_gemm_sass            # exit status 1 if a check fails
    python -m tests.gpu.verify_gemm_sass --dump DIR # also writes the PTX and SASS

Needs Triton's bundled ptxas/nvdisasm (pip `triton` ships them); no CUDA device.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kvserve.kernels import triton_verify_gemm as vg
from tests.gpu.mxfp4_sass import compile_sm90, loops, sass_of

SIG = {"x_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "out_ptr": "*bf16", "part_ptr": "*fp32",
       "count_ptr": "*i32", "pos_ptr": "*i64", "cos_sin_ptr": "*fp32", "cache_ptr": "*bf16", "slot_ptr": "*i64",
       "M": "i32", "N": "i32", "N_OUT": "i32", "K": "i32", "K_SPLIT": "i32", "stride_x": "i32", "stride_w": "i32",
       "stride_o": "i32", "stride_cs": "i32", "num_q_heads": "i32", "num_heads": "i32", "stride_plane": "i64",
       "stride_slot": "i32", "stride_head": "i32"}
ALIGNED = ["x_ptr", "w_ptr", "out_ptr", "part_ptr", "count_ptr", "cos_sin_ptr", "cache_ptr", "N", "N_OUT", "K",
           "K_SPLIT", "stride_x", "stride_w", "stride_o", "stride_cs", "stride_slot", "stride_head"]

# (name, EPI, SPLIT): the Llama-3.1-8B projections at the default configs.
CASES = [("o/down (split 4)", vg.EPI_PLAIN, 4), ("lm_head (no split)", vg.EPI_PLAIN, 1),
         ("gate_up + SiLU·mul", vg.EPI_SILU_MUL, 1), ("qkv + RoPE + KV (split 2)", vg.EPI_ROPE, 2)]


def compile_case(epi: int, split: int, pdl: bool = True, config=(64, 128, 4, 4)):
    block_n, block_k, warps, stages = config
    return compile_sm90(
        vg._verify_gemm_kernel, SIG,
        {"EPI": epi, "HAS_BIAS": False, "BLOCK_N": block_n, "BLOCK_K": block_k, "BLOCK_M": vg.MAX_ROWS,
         "SPLIT": split, "HALF": 64, "TILES_PER_HEAD": 2, "WRITE_KV": epi == vg.EPI_ROPE, "EVEN_K": True,
         "PRE": 1 if pdl else 0, "STAGES": stages, "PDL": pdl},
        ALIGNED, warps, stages,
    )


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dump", default=None)
    args = ap.parse_args()
    failures = []
    for name, epi, split in CASES:
        k = compile_case(epi, split)
        sass, usage = sass_of(k.asm["cubin"])
        gmma, hmma = sass.count("HGMMA"), sass.count("HMMA")
        async_loads = sass.count("LDGSTS") + sass.count("UTMALDG")
        body = max(loops(sass), key=lambda c: c.get("HGMMA", 0) + c.get("HMMA", 0), default={})
        in_loop = {op: body.get(op, 0) for op in ("HGMMA", "HMMA", "LDGSTS", "UTMALDG", "LDG", "LDS", "LDSM",
                                                  "BAR", "WARPGROUP", "DEPBAR", "SYNCS")}
        print(f"{name}: {usage}, dynamic shared {k.metadata.shared} B, HGMMA {gmma}, HMMA {hmma}, "
              f"async copies {async_loads} "
              f"(LDGSTS {sass.count('LDGSTS')}, UTMALDG {sass.count('UTMALDG')}), plain LDG {sass.count('LDG.')}; "
              f"K loop: {in_loop} of {sum(body.values())} instructions")
        if usage.get("LOCAL", 0):
            failures.append(f"{name}: {usage['LOCAL']} bytes of local memory (spills)")
        if not gmma + hmma:
            failures.append(f"{name}: no tensor-core MMA")
        if not async_loads or not (body.get("LDGSTS", 0) + body.get("UTMALDG", 0)):
            failures.append(f"{name}: the K loop's weight loads are not asynchronous copies")
        if args.dump:
            d = Path(args.dump)
            d.mkdir(parents=True, exist_ok=True)
            stem = name.split()[0].replace("/", "_")
            (d / f"{stem}.ptx").write_text(k.asm["ptx"])
            (d / f"{stem}.sass").write_text(sass)
    for f in failures:
        print("FAIL", f)
    if failures:
        return 1
    print("verify gemm sass checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
