"""Compile the grouped verify attention kernel (`kvserve/attention/triton/verify.py`) and the
decode reduce kernel it uses (GROUPED on and off) for sm_90 without a GPU, at Llama-3.1-8B
shapes (bf16, 4 query heads per KV head, head_dim 128, k + 1 = 5 rows: a 32-row query tile),
with and without PDL, split and direct: each must compile, use tensor-core MMAs for the scores
and values, and spill nothing.

    python -m tests.gpu.verify_attn_sass

Needs Triton's bundled ptxas/nvdisasm (pip `triton` ships them); no CUDA device.
"""

from __future__ import annotations

import sys

from kvserve.attention.triton import decode, verify
from tests.gpu.mxfp4_sass import compile_sm90, sass_of

SIG = {"q_ptr": "*bf16", "cache_ptr": "*bf16", "out_ptr": "*bf16", "part_acc_ptr": "*fp32", "part_m_ptr": "*fp32",
       "part_l_ptr": "*fp32", "block_tables_ptr": "*i32", "seq_lens_ptr": "*i32", "groups_ptr": "*i32",
       "qk_scale": "fp32", "num_splits": "i32", "num_heads": "i32", "stride_qt": "i32", "stride_qh": "i32",
       "stride_ot": "i32", "stride_oh": "i32", "stride_bt": "i32", "stride_plane": "i64", "stride_slot": "i32",
       "stride_head": "i32"}
ALIGNED = ["q_ptr", "cache_ptr", "out_ptr", "part_acc_ptr", "part_m_ptr", "part_l_ptr", "stride_qt", "stride_qh",
           "stride_ot", "stride_oh", "stride_slot", "stride_head"]
RSIG = {"out_ptr": "*bf16", "part_acc_ptr": "*fp32", "part_m_ptr": "*fp32", "part_l_ptr": "*fp32",
        "seq_lens_ptr": "*i32", "query_start_loc_ptr": "*i32", "sinks_ptr": "*bf16", "sliding_window": "i32",
        "num_splits": "i32", "num_heads": "i32", "stride_ot": "i32", "stride_oh": "i32", "groups_ptr": "*i32"}


def main() -> int:
    failures = []
    block_n, warps, stages = decode._decode_config(128, None)
    for pdl in (False, True):
        for direct in (False, True):
            k = compile_sm90(verify._verify_decode_kernel, SIG,
                             {"G": 4, "M_PAD": 32, "BLOCK_N": block_n, "HEAD_DIM": 128, "BLOCK_SIZE": 16,
                              "DIRECT": direct, "DOT_PREC": "tf32", "PDL": pdl}, ALIGNED, warps, stages)
            sass, usage = sass_of(k.asm["cubin"])
            mma = sass.count("HMMA") + sass.count("HGMMA")
            name = f"verify kernel PDL={pdl} DIRECT={direct}"
            print(f"{name}: {usage}, {mma} tensor-core MMAs")
            if usage.get("LOCAL", 0):
                failures.append(f"{name}: {usage['LOCAL']} bytes of local memory (spills)")
            if not mma:
                failures.append(f"{name}: no tensor-core MMA")
    for grouped in (False, True):
        k = compile_sm90(decode._decode_reduce_kernel, RSIG,
                         {"SPLITS_PAD": 64, "HEAD_DIM": 128, "BLOCK_N": block_n, "SLIDING": False, "MIXED": False,
                          "PDL": True, "HAS_SINKS": False, "GROUPED": grouped}, ["out_ptr", "part_acc_ptr"], 4)
        _, usage = sass_of(k.asm["cubin"])
        print(f"reduce kernel GROUPED={grouped}: {usage}")
        if usage.get("LOCAL", 0):
            failures.append(f"reduce GROUPED={grouped}: spills")
    for f in failures:
        print("FAIL", f)
    if failures:
        return 1
    print("verify attention sass checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
