"""Compile the skinny (2..8-row) Triton kernels for sm_90 without a GPU and report, per variant,
registers, local memory (spills), the 16-byte global loads (LDG ... .128) and shared-memory
traffic in the SASS, next to the one-row GEMV (`triton_ops._gemv_kernel`) for reference.
Uses the ptxas / nvdisasm / cuobjdump that ship with triton.

    python -m benchmarks.skinny_sass                    # default configs, M = 1..8
    python -m benchmarks.skinny_sass --sweep            # + the configurations spec_gpu_bench sweeps
    python -m benchmarks.skinny_sass --dump DIR         # also write each variant's SASS there
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kvserve.kernels import triton_skinny
from kvserve.models import triton_ops

TARGET = GPUTarget("cuda", 90, 32)
K = 4096


def _compile(fn, runtime: dict[str, str], constexprs: dict[str, object], aligned: set[str], warps: int):
    signature = {name: runtime.get(name, "constexpr") for name in fn.arg_names}
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    src = ASTSource(fn, signature, constexprs, attrs)
    return triton.compile(src, target=TARGET, options={"num_warps": warps})


def _stats(kernel) -> dict[str, object]:
    sass = kernel.asm["sass"]
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        res = subprocess.run([str(bin_dir / "cuobjdump"), "-res-usage", f.name], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", res)
    stack = re.search(r"STACK:(\d+)", res)
    local = re.search(r"LOCAL:(\d+)", res)
    return {
        "regs": int(regs.group(1)) if regs else None,
        "stack": int(stack.group(1)) if stack else None,
        "local": int(local.group(1)) if local else None,
        "ldg128": len(re.findall(r"LDG\.E[.\w]*\.128", sass)),
        "ldg_other": len(re.findall(r"LDG\.E(?![.\w]*\.128)", sass)),
        "ldgsts": len(re.findall(r"\bLDGSTS\b", sass)),
        "stl/ldl": len(re.findall(r"\b(?:STL|LDL)\b", sass)),
        "sts/lds": len(re.findall(r"\b(?:STS|LDS)\b", sass)),
        "ffma": len(re.findall(r"\bFFMA\b", sass)),
        "sass": sass,
    }


PTRS = {"x_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "out_ptr": "*bf16"}


def plain(m: int, cfg: tuple, pre: int = 4):
    bn, bk, warps, ring = cfg
    rt = {**PTRS, "N": "i32", "K": "i32", "stride_x": "i32", "stride_w": "i32", "stride_o": "i32"}
    ce = dict(HAS_BIAS=False, M=m, BLOCK_N=bn, BLOCK_K=bk, EVEN_K=True, PRE=pre, RING=ring, PDL=True)
    return _compile(triton_skinny._skinny_kernel, rt, ce, {*PTRS, "K", "stride_x", "stride_w", "stride_o"}, warps)


def silu(m: int, cfg: tuple, pre: int = 4):
    bn, bk, warps, ring = cfg
    rt = {**PTRS, "I": "i32", "K": "i32", "stride_x": "i32", "stride_w": "i32", "stride_o": "i32"}
    ce = dict(HAS_BIAS=False, M=m, BLOCK_N=max(1, bn // 2), BLOCK_K=bk, EVEN_K=True, PRE=pre, RING=ring, PDL=True)
    return _compile(triton_skinny._skinny_silu_mul_kernel, rt, ce, {*PTRS, "I", "K", "stride_x", "stride_w", "stride_o"},
                    warps)


def rope(m: int, cfg: tuple, pre: int = 4):
    _, bk, warps, ring = cfg
    rt = {**PTRS, "pos_ptr": "*i64", "cos_sin_ptr": "*fp32", "cache_ptr": "*bf16", "slot_ptr": "*i64", "K": "i32",
          "stride_x": "i32", "stride_w": "i32", "stride_o": "i32", "stride_cs": "i32", "num_q_heads": "i32",
          "num_heads": "i32", "stride_plane": "i64", "stride_slot": "i32", "stride_head": "i32"}
    ce = dict(HAS_BIAS=False, HALF=64, M=m, M_PAD=triton.next_power_of_2(m), BLOCK_K=bk, EVEN_K=True, WRITE_KV=True,
              PRE=pre, RING=ring, PDL=True)
    aligned = {*PTRS, "cos_sin_ptr", "cache_ptr", "K", "stride_x", "stride_w", "stride_o", "stride_cs", "stride_slot",
               "stride_head"}
    return _compile(triton_skinny._skinny_rope_kernel, rt, ce, aligned, warps)


def gemv_reference(cfg: tuple[int, int, int], pre: int = 4):
    bn, bk, warps = cfg
    rt = {"x_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "out_ptr": "*bf16", "N": "i32", "K": "i32",
          "stride_w": "i32", "push_ptrs": "*i64", "push_slot_ptr": "*i32", "push_rank": "i32", "push_stride": "i32"}
    ce = dict(HAS_BIAS=False, BLOCK_N=bn, BLOCK_K=bk, EVEN_K=True, PUSH=False, WORLD=1, PRE=pre, PDL=True)
    return _compile(triton_ops._gemv_kernel, rt, ce, {"x_ptr", "w_ptr", "b_ptr", "out_ptr", "K", "stride_w"}, warps)


SWEEP = [(2, 1024, 4, True), (2, 512, 4, True), (2, 256, 4, True), (4, 512, 4, True), (2, 1024, 8, True),
         (1, 1024, 4, True), (2, 1024, 4, False), (2, 512, 4, False), (4, 512, 4, False), (8, 256, 4, False)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--dump", default=None)
    ap.add_argument("--rows", default="1,2,3,4,5,6,7,8")
    args = ap.parse_args()
    dump = Path(args.dump) if args.dump else None
    if dump:
        dump.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp())
    rows = [int(r) for r in args.rows.split(",")]
    variants = [("gemv (1 row)", 1, triton_ops.gemv_config(4096, K), gemv_reference)]
    for m in rows:
        cfg = triton_skinny.skinny_config(m, 4096, K)
        variants += [("skinny", m, cfg, plain), ("skinny_silu_mul", m, cfg, silu), ("skinny_rope_", m, cfg, rope)]
        if args.sweep:
            variants += [("skinny", m, c, plain) for c in SWEEP if c != cfg]
    print("| kernel | M | BLOCK_N, BLOCK_K, warps, RING | regs | stack B | STL/LDL | LDG.128 | other LDG | LDGSTS | "
          "STS/LDS | FFMA |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, m, cfg, build in variants:
        try:
            st = _stats(build(m, cfg) if build is not gemv_reference else build(cfg))
        except Exception as e:  # noqa: BLE001 - report and go on
            print(f"| {name} | {m} | {cfg} | failed: {type(e).__name__}: {str(e)[:200]} |")
            continue
        print(f"| {name} | {m} | {cfg} | {st['regs']} | {st['stack']} | {st['stl/ldl']} | {st['ldg128']} | "
              f"{st['ldg_other']} | {st['ldgsts']} | {st['sts/lds']} | {st['ffma']} |", flush=True)
        if dump:
            (dump / f"{name}_M{m}_{'_'.join(map(str, cfg))}.sass").write_text(st["sass"])


if __name__ == "__main__":
    main()
