"""Compile the default MXFP4 MoE kernels (`kvserve/kernels/triton_mxfp4_moe.py`) for sm_90 without
a GPU and report what their machine code does with the weights: 16-byte vector loads of the codes
(`ld.global...v4.b32` / `LDG.E.128`), float32 multiplies and FMAs without flush-to-zero (the
E2M1 decode produces float32 subnormals for the codes ±0.5, which a `.ftz` instruction would turn
into 0), and the instruction mix of the GEMV inner loop.

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


def _compile(fn, signature: dict[str, str], constexprs: dict[str, object], aligned: list[str], num_warps: int):
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    sig = {**signature, **{k: "constexpr" for k in constexprs}}
    src = triton.compiler.ASTSource(fn, sig, constexprs, attrs)
    target = GPUTarget("cuda", 90, 32)
    backend = triton.compiler.make_backend(target)
    options = backend.parse_options({"num_warps": num_warps})
    return triton.compile(src, target=target, options=options.__dict__)


def gate_up(bn: int, bg: int, warps: int, decode: int):
    return _compile(
        tm._gemv_gate_up_kernel,
        {"x_ptr": "*bf16", "codes_ptr": "*i32", "scales_ptr": "*u8", "bias_ptr": "*bf16", "ids_ptr": "*i64",
         "out_ptr": "*bf16", "I": "i32", "stride_x": "i32", "alpha": "fp32", "limit": "fp32"},
        {"K": H, "TOP_K": 4, "BLOCK_N": bn, "BLOCK_G": bg, "DECODE": decode},
        ["x_ptr", "codes_ptr", "scales_ptr", "bias_ptr", "ids_ptr", "out_ptr", "I", "stride_x"], warps,
    )


def down(bn: int, bg: int, warps: int, decode: int):
    return _compile(
        tm._gemv_down_kernel,
        {"h_ptr": "*bf16", "codes_ptr": "*i32", "scales_ptr": "*u8", "bias_ptr": "*bf16", "ids_ptr": "*i64",
         "wts_ptr": "*bf16", "out_ptr": "*bf16", "N": "i32", "stride_o": "i32"},
        {"K": I, "TOP_K": 4, "BLOCK_N": bn, "BLOCK_G": bg, "DECODE": decode},
        ["h_ptr", "codes_ptr", "scales_ptr", "bias_ptr", "ids_ptr", "wts_ptr", "out_ptr", "N", "stride_o"], warps,
    )


def sass_of(cubin: bytes) -> str:
    nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(nvdisasm), "-c", f.name], capture_output=True, text=True, check=True).stdout


def summarize(name: str, k, dump: Path | None) -> list[str]:
    ptx, sass = k.asm["ptx"], sass_of(k.asm["cubin"])
    if dump:
        dump.mkdir(parents=True, exist_ok=True)
        (dump / f"{name}.ptx").write_text(ptx)
        (dump / f"{name}.sass").write_text(sass)
    failures = []
    v4 = len(re.findall(r"ld\.global[^\n]*\.v4\.b32", ptx))
    ldg128 = len(re.findall(r"LDG\.E\.128", sass))
    ldg = collections.Counter(re.findall(r"(LDG\.E(?:\.[A-Z0-9_]+)*)", sass))
    ftz = len(re.findall(r"(?:fma|mul|add)\.[a-z]*\.?ftz\.f32", ptx)) + len(re.findall(r"FFMA\.FTZ|FMUL\.FTZ", sass))
    ops = collections.Counter(m.split(".")[0] for m in re.findall(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\d\s+)?([A-Z0-9.]+)", sass, re.M))
    print(f"{name}: {k.n_regs} registers, {k.n_spills} spills; ld.global.v4.b32 in PTX: {v4}; LDG.E.128 in SASS: {ldg128}")
    print(f"  global loads: {dict(ldg)}")
    print(f"  flush-to-zero float ops: {ftz}")
    print("  SASS mix: " + ", ".join(f"{op} {n}" for op, n in ops.most_common(14)))
    shared = {op: n for op, n in ops.items() if op.startswith(("LDS", "STS", "BAR"))}
    print(f"  shared-memory / barrier instructions (layout conversions): {shared or 'none'}")
    print(f"  int-to-float / float-to-float conversions: "
          f"{ {op: n for op, n in ops.items() if op.startswith(('I2F', 'F2F', 'I2FP', 'F2FP'))} or 'none'}")
    if v4 == 0 and ldg128 == 0:
        failures.append(f"{name}: no 16-byte vector loads")
    if ftz:
        failures.append(f"{name}: flush-to-zero float ops would zero the decoded ±0.5 codes")
    if k.n_spills:
        failures.append(f"{name}: {k.n_spills} register spills")
    return failures


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dump", type=Path, default=None)
    args = ap.parse_args()
    (gbn, gbg, gw, _), (dbn, dbg, dw, _) = tm.gemv_configs()
    failures = []
    for decode in (0, 1):  # both nibble decodes
        failures += summarize(f"gemv_gate_up_bn{gbn}_bg{gbg}_w{gw}_dec{decode}", gate_up(gbn, gbg, gw, decode), args.dump)
        failures += summarize(f"gemv_down_bn{dbn}_bg{dbg}_w{dw}_dec{decode}", down(dbn, dbg, dw, decode), args.dump)
    for f in failures:
        print("FAIL:", f)
    print("mxfp4 sass checks " + ("failed" if failures else "passed"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
