"""Compile the qkv GEMV with the q/k norm epilogue (`models/triton_qk_norm.py`) for sm_90 without a
GPU, beside the kernels it replaces (`triton_ops._gemv_kernel` + `_rope_qk_kernel`) and the
no-norm `_gemv_rope_kernel` it extends, at Qwen3-30B-A3B's qkv shape (32 q / 4 kv heads of 128,
hidden 2048): registers, spills, 16-byte weight loads, instructions, and the arrival counter's
atomic with its fences.

    python -m tests.gpu.qk_norm_sass [--dump DIR]

Checks (exit status 1 if one fails): no local memory; the weight loads are 16-byte vectors, as
many as the plain GEMV's; one GPU-scope atomic, preceded by a CTA barrier. Needs Triton's
bundled ptxas/nvdisasm; no CUDA device.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
from pathlib import Path

from kvserve.models import triton_ops as to
from kvserve.models import triton_qk_norm as tq
from tests.gpu.mxfp4_sass import compile_sm90, sass_of

HQ, HKV, D, HIDDEN = 32, 4, 128, 2048


def fused():
    _, bk, warps = to.gemv_config((HQ + 2 * HKV) * D, HIDDEN)
    rt = {"x_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16", "pos_ptr": "*i64", "cos_sin_ptr": "*fp32",
          "qw_ptr": "*bf16", "kw_ptr": "*bf16", "count_ptr": "*i32", "cache_ptr": "*bf16", "slot_ptr": "*i64",
          "K": "i32", "stride_w": "i32", "stride_cs": "i32", "num_q_heads": "i32", "num_heads": "i32",
          "stride_plane": "i64", "stride_slot": "i64", "stride_head": "i32", "eps": "fp32"}
    ce = dict(HALF=D // 2, BLOCK_K=bk, EVEN_K=True, WRITE_KV=True, PRE=min(4, HIDDEN // bk), PDL=True)
    aligned = ["x_ptr", "w_ptr", "out_ptr", "cos_sin_ptr", "qw_ptr", "kw_ptr", "count_ptr", "cache_ptr", "K",
               "stride_w", "stride_cs", "stride_head"]
    return compile_sm90(tq._gemv_qk_norm_rope_kernel, rt, ce, aligned, warps)


def rope_gemv():
    _, bk, warps = to.gemv_config((HQ + 2 * HKV) * D, HIDDEN)
    rt = {"x_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "out_ptr": "*bf16", "pos_ptr": "*i64",
          "cos_sin_ptr": "*fp32", "cache_ptr": "*bf16", "slot_ptr": "*i64", "K": "i32", "stride_w": "i32",
          "stride_cs": "i32", "num_q_heads": "i32", "num_heads": "i32", "stride_plane": "i64", "stride_slot": "i64",
          "stride_head": "i32"}
    ce = dict(HAS_BIAS=False, HALF=D // 2, BLOCK_K=bk, EVEN_K=True, WRITE_KV=True, PRE=min(4, HIDDEN // bk), PDL=True)
    aligned = ["x_ptr", "w_ptr", "out_ptr", "cos_sin_ptr", "cache_ptr", "K", "stride_w", "stride_cs", "stride_head"]
    return compile_sm90(to._gemv_rope_kernel, rt, ce, aligned, warps)


def plain_gemv():
    bn, bk, warps = to.gemv_config((HQ + 2 * HKV) * D, HIDDEN)
    rt = {"x_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "out_ptr": "*bf16", "N": "i32", "K": "i32",
          "stride_w": "i32", "push_ptrs": "*i64", "push_slot_ptr": "*i32", "push_rank": "i32", "push_stride": "i32"}
    ce = dict(HAS_BIAS=False, BLOCK_N=bn, BLOCK_K=bk, EVEN_K=True, PUSH=False, WORLD=1, PRE=min(4, HIDDEN // bk),
              PDL=True)
    aligned = ["x_ptr", "w_ptr", "out_ptr", "N", "K", "stride_w"]
    return compile_sm90(to._gemv_kernel, rt, ce, aligned, warps)


def rope_qk():
    h_pad = 64
    rt = {"qkv_ptr": "*bf16", "pos_ptr": "*i64", "cos_sin_ptr": "*fp32", "qw_ptr": "*bf16", "kw_ptr": "*bf16",
          "cache_ptr": "*bf16", "slot_ptr": "*i64", "stride_t": "i32", "stride_cs": "i32", "num_q_heads": "i32",
          "num_heads": "i32", "num_kv_heads": "i32", "stride_plane": "i64", "stride_slot": "i64", "stride_head": "i32",
          "eps": "fp32"}
    ce = dict(HALF=D // 2, H_PAD=h_pad, KV_PAD=HKV, NORM=True, WRITE_KV=True, PDL=True)
    aligned = ["qkv_ptr", "cos_sin_ptr", "qw_ptr", "kw_ptr", "cache_ptr", "stride_t", "stride_cs", "stride_head"]
    return compile_sm90(to._rope_qk_kernel, rt, ce, aligned, min(max(h_pad * D // 1024, 1), 8))


def summary(name: str, kernel, dump: Path | None) -> dict:
    sass, usage = sass_of(kernel.asm["cubin"])
    if dump:
        dump.mkdir(parents=True, exist_ok=True)
        (dump / f"{name}.sass").write_text(sass)
    ops = collections.Counter(m.split(".")[0] for m in re.findall(
        r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9.]+)", sass, re.M))
    ldg = collections.Counter(re.findall(r"(LDG\.E(?:\.[A-Z0-9_]+)*)", sass))
    row = {"regs": usage.get("REG"), "local": usage.get("LOCAL", 0), "instructions": sum(ops.values()),
           "ldg128": sum(n for op, n in ldg.items() if op.endswith(".128")), "atomics": ops.get("ATOMG", 0)
           + ops.get("RED", 0), "bar": ops.get("BAR", 0), "membar": ops.get("MEMBAR", 0)}
    print(f"{name}: {row}", flush=True)
    return {**row, "sass": sass}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dump", type=Path, default=None)
    args = ap.parse_args()
    rows = {name: summary(name, build(), args.dump) for name, build in (
        ("qkv_gemv", plain_gemv), ("rope_qk_norm", rope_qk), ("gemv_rope_no_norm", rope_gemv),
        ("gemv_qk_norm_rope", fused))}
    f = rows["gemv_qk_norm_rope"]
    failures = []
    if f["local"]:
        failures.append(f"{f['local']} bytes of local memory")
    if f["ldg128"] < rows["gemv_rope_no_norm"]["ldg128"]:
        failures.append(f"{f['ldg128']} LDG.128 against the no-norm kernel's {rows['gemv_rope_no_norm']['ldg128']}")
    sass = f["sass"]
    atom = sass.find("ATOMG")
    if f["atomics"] != 1 or atom < 0 or sass.rfind("BAR.SYNC", 0, atom) < 0 or "GPU" not in sass[atom:atom + 40]:
        failures.append("expected one GPU-scope atomic after a CTA barrier")
    for msg in failures:
        print("FAIL:", msg)
    print("qk norm sass checks " + ("failed" if failures else "passed"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
