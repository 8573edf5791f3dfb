"""Compile the default MXFP4 MoE kernels (`kvserve/kernels/triton_mxfp4_moe.py`) for sm_90 without
a GPU and report what their machine code does with the weights: 16-byte vector loads of the codes
(`ld.global...v4.b32` / `LDG.E.128`), float32 multiplies and FMAs without flush-to-zero (the
E2M1 decode produces float32 subnormals for the codes ±0.5, which a `.ftz` instruction would turn
into 0), and the instruction mix of the GEMV inner loop. Also the opt-in split down GEMV at the
configs the benchmark times (`DOWN_SPLIT_CANDIDATES`: the same checks) and its reduce kernel (no
spills, no flush-to-zero); the packed-half-math GEMVs (DECODE 2 / 3, `GEMV_F16_CANDIDATES`: the
same checks, and the instructions per weight of their K loop against the default's) and their
activation kernel `_act_f16_kernel`.

    python -m tests.gpu.mxfp4_sass            # prints the summary; exit status 1 if a check fails
    python -m tests.gpu.mxfp4_sass --dump DIR # also writes the PTX and SASS

Needs Triton's bundled ptxas/nvdisasm (pip `triton` ships them); no CUDA device.
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget

from kvserve.kernels import triton_mxfp4_moe as tm

H = I = 2880


def compile_sm90(fn, signature: dict[str, str], constexprs: dict[str, object], aligned: list[str], num_warps: int,
                 num_stages: int | None = None):
    """`fn` compiled for sm_90 (no GPU needed): `signature` the runtime arguments' types, every
    other argument a constexpr in `constexprs`; `aligned` arguments are declared divisible by 16
    (as a launch with such pointers / strides specializes them)."""
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    sig = {name: signature.get(name, "constexpr") for name in fn.arg_names}
    src = triton.compiler.ASTSource(fn, sig, constexprs, attrs)
    target = GPUTarget("cuda", 90, 32)
    opts = {"num_warps": num_warps} if num_stages is None else {"num_warps": num_warps, "num_stages": num_stages}
    options = triton.compiler.make_backend(target).parse_options(opts)
    return triton.compile(src, target=target, options=options.__dict__)


def gate_up(bn: int, bg: int, warps: int, decode: int, h_f16: bool = False, pdl: bool = False):
    """DECODE >= 2 reads `act_f16`'s int32 pairs and block scales; h_f16: the epilogue writes the
    activation for a DECODE >= 2 down GEMV."""
    return compile_sm90(
        tm._gemv_gate_up_kernel,
        {"x_ptr": "*i32" if decode >= 2 else "*bf16", "xs_ptr": "*fp32", "codes_ptr": "*i32", "scales_ptr": "*u8",
         "bias_ptr": "*bf16", "ids_ptr": "*i64", "out_ptr": "*i32" if h_f16 else "*bf16", "outs_ptr": "*fp32",
         "I": "i32", "stride_x": "i32", "alpha": "fp32", "limit": "fp32", "s_step": "i32"},
        {"K": H, "TOP_K": 4, "BLOCK_N": bn, "BLOCK_G": bg, "DECODE": decode, "H_F16": h_f16, "PDL": pdl},
        ["x_ptr", "xs_ptr", "codes_ptr", "scales_ptr", "bias_ptr", "ids_ptr", "out_ptr", "outs_ptr", "I", "stride_x"],
        warps,
    )


def down(bn: int, bg: int, warps: int, decode: int, pdl: bool = False):
    return compile_sm90(
        tm._gemv_down_kernel,
        {"h_ptr": "*i32" if decode >= 2 else "*bf16", "hs_ptr": "*fp32", "codes_ptr": "*i32", "scales_ptr": "*u8",
         "bias_ptr": "*bf16", "ids_ptr": "*i64", "wts_ptr": "*bf16", "out_ptr": "*bf16", "N": "i32", "stride_o": "i32",
         "s_step": "i32"},
        {"K": I, "TOP_K": 4, "BLOCK_N": bn, "BLOCK_G": bg, "DECODE": decode, "PDL": pdl},
        ["h_ptr", "hs_ptr", "codes_ptr", "scales_ptr", "bias_ptr", "ids_ptr", "wts_ptr", "out_ptr", "N", "stride_o"],
        warps,
    )


def down_split(bn: int, bg: int, warps: int, decode: int, split: int, pdl: bool = False):
    return compile_sm90(
        tm._gemv_down_split_kernel,
        {"h_ptr": "*i32" if decode >= 2 else "*bf16", "hs_ptr": "*fp32", "codes_ptr": "*i32", "scales_ptr": "*u8",
         "ids_ptr": "*i64", "part_ptr": "*fp32", "N": "i32", "s_step": "i32"},
        {"K": I, "SPLIT": split, "BLOCK_N": bn, "BLOCK_G": bg, "DECODE": decode, "PDL": pdl},
        ["h_ptr", "hs_ptr", "codes_ptr", "scales_ptr", "ids_ptr", "part_ptr", "N"], warps,
    )


def act_f16(pdl: bool = True):
    return compile_sm90(
        tm._act_f16_kernel, {"x_ptr": "*bf16", "xh_ptr": "*i32", "xs_ptr": "*fp32", "stride_x": "i32", "G": "i32"},
        {"BLOCK_G": 16, "PDL": pdl}, ["x_ptr", "xh_ptr", "xs_ptr", "stride_x"], 4,
    )


def down_reduce(split: int):
    return compile_sm90(
        tm._down_reduce_kernel,
        {"part_ptr": "*fp32", "bias_ptr": "*bf16", "ids_ptr": "*i64", "wts_ptr": "*bf16", "out_ptr": "*bf16",
         "N": "i32", "stride_o": "i32"},
        {"TOP_K": 4, "SPLIT": split, "BLOCK": tm.DOWN_REDUCE_BLOCK},
        ["part_ptr", "bias_ptr", "ids_ptr", "wts_ptr", "out_ptr", "N", "stride_o"], 4,
    )


def grouped(gate_up: bool, cfg: dict[str, int]):
    cfg = dict(cfg)
    warps = cfg.pop("num_warps")
    if gate_up:
        cfg["BLOCK_N"] = max(16, cfg["BLOCK_N"] // 2)
    return compile_sm90(
        tm._grouped_kernel,
        {"a_ptr": "*bf16", "codes_ptr": "*i32", "scales_ptr": "*u8", "bias_ptr": "*bf16", "out_ptr": "*bf16",
         "sorted_ptr": "*i64", "block_expert_ptr": "*i64", "num_post_ptr": "*i64", "wts_ptr": "*bf16",
         "N": "i32", "num_pairs": "i32", "num_blocks": "i32", "stride_a": "i32", "alpha": "fp32", "limit": "fp32"},
        {"K": H, "A_ROW_DIV": 4 if gate_up else 1, "GATE_UP": gate_up, "DOT_PREC": "tf32", **cfg},
        ["a_ptr", "codes_ptr", "scales_ptr", "bias_ptr", "out_ptr", "sorted_ptr", "block_expert_ptr", "num_post_ptr",
         "wts_ptr", "N", "stride_a"], warps,
    )


_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def sass_of(cubin: bytes) -> tuple[str, dict[str, int]]:
    """(the SASS, resource usage {REG, STACK, SHARED, LOCAL} from cuobjdump; LOCAL > 0: spills)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([str(_BIN / "nvdisasm"), "-c", f.name], capture_output=True, text=True, check=True).stdout
        res = subprocess.run([str(_BIN / "cuobjdump"), "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    usage = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", res)}
    return sass, usage


def loops(sass: str) -> list[collections.Counter]:
    """The opcode counts of each loop body (a backward branch to a label) of the SASS."""
    ins, labels, pending = [], {}, None
    for line in sass.splitlines():
        m = re.match(r"^\s*\.(L_x_\d+):", line)
        if m:
            pending = m.group(1)
            continue
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if m:
            addr = int(m.group(1), 16)
            if pending:
                labels[pending], pending = addr, None
            text = re.sub(r"^@!?U?P[T0-9]+\s+", "", m.group(2))
            ins.append((addr, text.split()[0].split(".")[0], text))
    out = []
    for addr, op, text in ins:
        m = re.search(r"BRA\s+`?\(?\.(L_x_\d+)", text)
        if op == "BRA" and m and labels.get(m.group(1), addr + 1) < addr:
            out.append(collections.Counter(o for a, o, _ in ins if labels[m.group(1)] <= a <= addr))
    return out


def summarize(name: str, k, dump: Path | None, strict: bool = True, weights_per_iter: int = 0,
              codes: bool = True) -> list[str]:
    ptx = k.asm["ptx"]
    sass, usage = sass_of(k.asm["cubin"])
    if dump:
        dump.mkdir(parents=True, exist_ok=True)
        (dump / f"{name}.ptx").write_text(ptx)
        (dump / f"{name}.sass").write_text(sass)
    failures = []
    v4 = len(re.findall(r"ld\.global[^\n]*\.v4\.b32", ptx))
    ldg128 = len(re.findall(r"LDG\.E(?:\.[A-Z]+)*\.128", sass))
    ldg = collections.Counter(re.findall(r"(LDG\.E(?:\.[A-Z0-9_]+)*)", sass))
    ftz = len(re.findall(r"(?:fma|mul|add)\.[a-z]*\.?ftz\.f32", ptx)) + len(re.findall(r"FFMA\.FTZ|FMUL\.FTZ", sass))
    ops = collections.Counter(m.split(".")[0] for m in re.findall(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\d\s+)?([A-Z0-9.]+)", sass, re.M))
    print(f"{name}: {usage}; ld.global.v4.b32 in PTX: {v4}; 128-bit LDG in SASS: {ldg128}")
    print(f"  global loads: {dict(ldg)}")
    print(f"  flush-to-zero float ops: {ftz}")
    print("  SASS mix: " + ", ".join(f"{op} {n}" for op, n in ops.most_common(14)))
    shared = {op: n for op, n in ops.items() if op.startswith(("LDS", "STS", "BAR"))}
    print(f"  shared-memory / barrier instructions (layout conversions): {shared or 'none'}")
    for body in loops(sass):
        n = sum(body.values())
        per = f", {n / weights_per_iter:.2f} per weight" if weights_per_iter else ""
        bar = {op: c for op, c in body.items() if op in ("BAR", "STS", "LDS")}
        print(f"  loop: {n} instructions{per}; {dict(body.most_common(8))}; in-loop shared/barriers: {bar or 'none'}")
        if strict and bar:
            failures.append(f"{name}: a layout conversion through shared memory inside the K loop ({bar})")
    print(f"  int-to-float / float-to-float conversions: "
          f"{ {op: n for op, n in ops.items() if op.startswith(('I2F', 'F2F', 'I2FP', 'F2FP'))} or 'none'}")
    if strict and codes and v4 == 0 and ldg128 == 0:
        failures.append(f"{name}: no 16-byte vector loads")
    if ftz:
        failures.append(f"{name}: flush-to-zero float ops would zero the decoded ±0.5 codes")
    if strict and usage.get("LOCAL", 0):
        failures.append(f"{name}: {usage['LOCAL']} bytes of local memory (register spills)")
    return failures


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dump", type=Path, default=None)
    ap.add_argument("--scan", default="", help="extra GEMV configs to report, e.g. '16,8,4,1;32,8,8,1'")
    args = ap.parse_args()
    gu_cfg, dn_cfg = tm.gemv_configs()
    dn_cfg = dn_cfg[:4]  # the sequential down kernel's tile (SPLIT aside; the split kernels below)
    failures = []
    cfgs = [("gate_up", gu_cfg), ("down", dn_cfg), ("gate_up", gu_cfg[:3] + (1 - gu_cfg[3],)),
            ("down", dn_cfg[:3] + (1 - dn_cfg[3],))]
    cfgs += [(kind, tuple(int(v) for v in c.split(","))) for c in args.scan.split(";") if c for kind in ("gate_up", "down")]
    for i, (kind, (bn, bg, w, dec)) in enumerate(cfgs):
        per_iter = bn * bg * 32 * (2 if kind == "gate_up" else 1)  # weights a K-step of one program (one expert)
        k = (gate_up if kind == "gate_up" else down)(bn, bg, w, dec)
        # the defaults must pass; the other decode and the scan are reported
        failures += summarize(f"gemv_{kind}_bn{bn}_bg{bg}_w{w}_dec{dec}", k, args.dump, strict=i < 2,
                              weights_per_iter=per_iter // (w * 32))
    # the split down GEMV (opt-in: the down config's SPLIT) at the benchmark's configs, and its reduce
    # (no codes: only spills and flush-to-zero count there)
    for bn, bg, w, dec, split in tm.DOWN_SPLIT_CANDIDATES:
        failures += summarize(f"gemv_down_split{split}_bn{bn}_bg{bg}_w{w}_dec{dec}", down_split(bn, bg, w, dec, split),
                              args.dump, weights_per_iter=bn * bg * 32 // (w * 32))
    for split in sorted({c[4] for c in tm.DOWN_SPLIT_CANDIDATES}):
        failures += summarize(f"down_reduce_split{split}", down_reduce(split), args.dump, codes=False)
    # the packed-half-math GEMVs (DECODE 2 / 3) at the benchmark's candidates (strict: 16-byte loads,
    # no spills, no shared memory in the K loop, no flush-to-zero), with PDL where `fused_moe_mxfp4`
    # launches them so (both DECODE >= 2), and their activation kernel
    seen = set()
    for gu, dn in tm.GEMV_F16_CANDIDATES:
        bn, bg, w, dec = gu
        pdl = gu[3] >= 2 and dn[3] >= 2
        if ("gu", gu, dn[3] >= 2) not in seen:
            seen.add(("gu", gu, dn[3] >= 2))
            failures += summarize(f"gemv_gate_up_bn{bn}_bg{bg}_w{w}_dec{dec}{'_hf16' if dn[3] >= 2 else ''}",
                                  gate_up(bn, bg, w, dec, h_f16=dn[3] >= 2, pdl=pdl), args.dump,
                                  weights_per_iter=bn * bg * 32 * 2 // (w * 32))
        bn, bg, w, dec, split = dn
        if dec >= 2 and ("dn", dn) not in seen:
            seen.add(("dn", dn))
            k = down(bn, bg, w, dec, pdl) if split == 0 else down_split(bn, bg, w, dec, split, pdl)
            failures += summarize(f"gemv_down{f'_split{split}' if split else ''}_bn{bn}_bg{bg}_w{w}_dec{dec}", k,
                                  args.dump, weights_per_iter=bn * bg * 32 // (w * 32))
    failures += summarize("act_f16", act_f16(), args.dump, codes=False)
    for tokens in (16, 256):  # the grouped path's tiles at 16 and 256 tokens (reported; only FTZ fails)
        cfg = tm.grouped_config(tokens * 4, 32)
        for gu in (True, False):
            name = f"grouped_{'gate_up' if gu else 'down'}_m{cfg['BLOCK_M']}_n{cfg['BLOCK_N']}_g{cfg['BLOCK_G']}"
            failures += summarize(name, grouped(gu, cfg), args.dump, strict=False)
    for f in failures:
        print("FAIL:", f)
    print("mxfp4 sass checks " + ("failed" if failures else "passed"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
