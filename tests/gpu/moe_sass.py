"""Compile the fused MoE decode kernels for sm_90 without a GPU and report what their machine code
does: registers and spills, the global loads (16-byte `LDG.E...128` vs narrower), whether the K
loop is unrolled (no backward branch), instructions per kernel, and the same for the current
pairs path (`triton_moe._pairs_*`) at the same shapes for comparison.

    python -m tests.gpu.moe_sass                # Qwen3-30B-A3B and gpt-oss-20b expert shapes
    python -m tests.gpu.moe_sass --dump DIR     # also writes the PTX and SASS

Checks (exit status 1 if one fails) on the default decode configs: no local memory (spills), the
weight loads are 16-byte vectors (at least one LDG.128 per 8 bf16 weights a thread streams), no
loop left in the expert kernels. Needs Triton's bundled ptxas/nvdisasm; no CUDA device. Register
counts differ between Triton versions (the lent GPUs run 3.6): run it with that version too
(`pip install triton==3.6.0` into a venv) before changing the tiles.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
from pathlib import Path

import triton

from kvserve.kernels import triton_moe as tmo
from kvserve.kernels import triton_moe_decode as tmd
from tests.gpu.mxfp4_sass import compile_sm90, loops, sass_of

SHAPES = {"Qwen3-30B-A3B": (128, 8, 2048, 768), "gpt-oss-20b": (32, 4, 2880, 2880)}  # E, k, hidden, inter


_STRIDES = ["stride_x", "stride_h", "stride_we", "stride_wn", "stride_o"]


def decode_gate_up(e: int, k: int, hidden: int, inter: int, cfg=None):
    bn, bk, warps = cfg or tmd.gate_up_config(inter, hidden)
    rt = {"x_ptr": "*bf16", "w_ptr": "*bf16", "ids_ptr": "*i64", "out_ptr": "*bf16", **{s: "i32" for s in _STRIDES}}
    ce = dict(N=inter, K=hidden, TOP_K=k, BLOCK_N=bn, BLOCK_K=bk, PDL=True)
    aligned = ["x_ptr", "w_ptr", "ids_ptr", "out_ptr", "stride_x", "stride_we", "stride_wn", "stride_o"]
    return compile_sm90(tmd._gate_up_kernel, rt, ce, aligned, warps), 2 * bn * hidden / (warps * 32)


def decode_down(e: int, k: int, hidden: int, inter: int, cfg=None, next_norm: bool = False):
    bn, bk, warps, pre = cfg or tmd.down_config(hidden, inter, k)
    rt = {"h_ptr": "*bf16", "w_ptr": "*bf16", "ids_ptr": "*i64", "wts_ptr": "*bf16", "out_ptr": "*bf16",
          "res_ptr": "*bf16", "nw_ptr": "*bf16", "hn_ptr": "*bf16", "res_out_ptr": "*bf16", "count_ptr": "*i32",
          "stride_r": "i32", "stride_hn": "i32", "stride_ro": "i32", "eps": "fp32", **{s: "i32" for s in _STRIDES}}
    ce = dict(N=hidden, K=inter, TOP_K=k, K_PAD=triton.next_power_of_2(k), BLOCK_N=bn, BLOCK_K=bk, PRE=pre, PDL=True,
              NEXT_NORM=next_norm, N_PAD=triton.next_power_of_2(hidden))
    aligned = ["h_ptr", "w_ptr", "ids_ptr", "wts_ptr", "out_ptr", "stride_h", "stride_we", "stride_wn", "stride_o",
               "res_ptr", "nw_ptr", "hn_ptr", "res_out_ptr", "count_ptr", "stride_r", "stride_hn", "stride_ro"]
    return compile_sm90(tmd._down_kernel, rt, ce, aligned, warps), k * bn * inter / (warps * 32)


def decode_down_next_norm(e: int, k: int, hidden: int, inter: int):
    return decode_down(e, k, hidden, inter, next_norm=True)


def route_kernel(e: int, k: int, hidden: int, inter: int):
    rt = {"logits_ptr": "*bf16", "wts_ptr": "*bf16", "ids_ptr": "*i64", "E": "i32", "stride_l": "i32"}
    ce = dict(TOP_K=k, K_PAD=triton.next_power_of_2(k), E_PAD=triton.next_power_of_2(e), RENORM=True, PDL=True)
    return compile_sm90(tmd._route_kernel, rt, ce, ["logits_ptr", "wts_ptr", "ids_ptr", "stride_l"], 1), 0


def norm_route_kernel(e: int, k: int, hidden: int, inter: int):
    block_e, warps = tmd.norm_route_config(e, hidden)
    rt = {"x_ptr": "*bf16", "res_ptr": "*bf16", "nw_ptr": "*bf16", "h_ptr": "*bf16", "res_out_ptr": "*bf16",
          "rw_ptr": "*bf16", "logits_ptr": "*bf16", "count_ptr": "*i32", "wts_ptr": "*bf16", "ids_ptr": "*i64",
          "E": "i32", "stride_x": "i32", "stride_r": "i32", "stride_h": "i32", "stride_ro": "i32", "stride_rw": "i32",
          "eps": "fp32", "w13_ptr": "*bf16", "stride_we": "i32", "up_offset": "i32"}
    ce = dict(H=hidden, H_PAD=triton.next_power_of_2(hidden), BLOCK_E=block_e, TOP_K=k,
              K_PAD=triton.next_power_of_2(k), E_PAD=triton.next_power_of_2(e), RENORM=True, PDL=True,
              PREFETCH=tmd.PREFETCH_ROWS * hidden * 2)
    aligned = ["x_ptr", "res_ptr", "nw_ptr", "h_ptr", "res_out_ptr", "rw_ptr", "logits_ptr", "count_ptr", "wts_ptr",
               "ids_ptr", "stride_x", "stride_r", "stride_h", "stride_ro", "stride_rw", "w13_ptr", "stride_we",
               "up_offset"]
    return compile_sm90(tmd._norm_route_kernel, rt, ce, aligned, warps), 0


def pairs_gate_up(e: int, k: int, hidden: int, inter: int):
    bn, bk, warps = tmo.pairs_config(inter, hidden)
    rt = {"x_ptr": "*bf16", "w_ptr": "*bf16", "ids_ptr": "*i64", "out_ptr": "*bf16", "N": "i32", "K": "i32",
          **{s: "i32" for s in _STRIDES}}
    ce = dict(TOP_K=k, BLOCK_N=bn, BLOCK_K=bk, EVEN_K=hidden % bk == 0)
    aligned = ["x_ptr", "w_ptr", "ids_ptr", "out_ptr", "N", "K", "stride_x", "stride_we", "stride_wn", "stride_o"]
    return compile_sm90(tmo._pairs_gate_up_kernel, rt, ce, aligned, warps), 2 * bn * hidden / (warps * 32)


def pairs_down(e: int, k: int, hidden: int, inter: int):
    bn, bk, warps = tmo.pairs_config(hidden, inter)
    rt = {"h_ptr": "*bf16", "w_ptr": "*bf16", "ids_ptr": "*i64", "wts_ptr": "*bf16", "out_ptr": "*bf16", "N": "i32",
          "K": "i32", **{s: "i32" for s in _STRIDES}}
    ce = dict(TOP_K=k, BLOCK_N=bn, BLOCK_K=bk, EVEN_K=inter % bk == 0)
    aligned = ["h_ptr", "w_ptr", "ids_ptr", "wts_ptr", "out_ptr", "N", "K", "stride_h", "stride_we", "stride_wn",
               "stride_o"]
    return compile_sm90(tmo._pairs_down_kernel, rt, ce, aligned, warps), k * bn * inter / (warps * 32)


def report(name: str, kernel, weights_per_thread: float, dump: Path | None, strict: bool) -> tuple[list[str], dict]:
    sass, usage = sass_of(kernel.asm["cubin"])
    if dump:
        dump.mkdir(parents=True, exist_ok=True)
        (dump / f"{name}.ptx").write_text(kernel.asm["ptx"])
        (dump / f"{name}.sass").write_text(sass)
    ops = collections.Counter(m.split(".")[0] for m in re.findall(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9.]+)",
                                                                   sass, re.M))
    ldg = collections.Counter(re.findall(r"(LDG\.E(?:\.[A-Z0-9_]+)*)", sass))
    ldg128 = sum(n for op, n in ldg.items() if op.endswith(".128"))
    body = loops(sass)
    total = sum(ops.values())
    row = {"regs": usage.get("REG"), "local": usage.get("LOCAL", 0), "instructions": total, "ldg128": ldg128,
           "ldg": dict(ldg), "loops": [sum(b.values()) for b in body], "ffma": ops.get("FFMA", 0),
           "shfl": ops.get("SHFL", 0), "bar/sts/lds": sum(n for op, n in ops.items() if op in ("BAR", "STS", "LDS"))}
    per = f"; {weights_per_thread:.0f} weights per thread -> {weights_per_thread / 8:.0f} 16-byte loads needed" \
        if weights_per_thread else ""
    print(f"{name}: {row}{per}", flush=True)
    failures = []
    if strict:
        if row["local"]:
            failures.append(f"{name}: {row['local']} bytes of local memory (spills)")
        if weights_per_thread and ldg128 < weights_per_thread / 8:
            failures.append(f"{name}: {ldg128} LDG.128 for {weights_per_thread:.0f} weights per thread")
        if body:
            failures.append(f"{name}: a loop is left ({row['loops']} instructions)")
    return failures, row


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dump", type=Path, default=None)
    args = ap.parse_args()
    failures: list[str] = []
    for shape_name, shape in SHAPES.items():
        for label, build, strict in (("route", route_kernel, False), ("norm_route", norm_route_kernel, False),
                                     ("decode_gate_up", decode_gate_up, True),
                                     ("decode_down", decode_down, True),
                                     ("decode_down_next_norm", decode_down_next_norm, True),
                                     ("pairs_gate_up", pairs_gate_up, False),
                                     ("pairs_down", pairs_down, False)):
            kernel, per_thread = build(*shape)
            f, _ = report(f"{shape_name}_{label}", kernel, per_thread, args.dump, strict)
            failures += f
    for f in failures:
        print("FAIL:", f)
    print("moe sass checks " + ("failed" if failures else "passed"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
