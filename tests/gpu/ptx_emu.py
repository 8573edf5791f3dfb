"""A tiny emulator of the PTX that `kvserve/kernels/triton_qmm4._nibbles` inlines (mov, and, or,
shr, prmt, sub.f16x2, fma.rn.f16x2 / bf16x2), so its bit tricks are checked bit-exactly on the
CPU: the interpreter (TRITON_INTERPRET=1) runs none of the PTX, and the sm_90 build check
(`tests/gpu/quant_sass.py`) only proves that it assembles."""

from __future__ import annotations

import re

import numpy as np
import torch


def h2f(bits: int, kind: str) -> float:
    """A 16-bit pattern as fp16 ("f16") or bf16 ("bf16") -> float."""
    dt = torch.float16 if kind == "f16" else torch.bfloat16
    return float(torch.tensor([bits - 65536 if bits >= 32768 else bits], dtype=torch.int16).view(dt).float()[0])


def f2h(x: float, kind: str) -> int:
    """float -> the 16-bit pattern of fp16 / bf16, rounded to nearest even once (from fp64)."""
    if kind == "f16":
        return int(np.array([x], dtype=np.float64).astype(np.float16).view(np.uint16)[0])
    return int(torch.tensor([x], dtype=torch.float64).to(torch.bfloat16).view(torch.int16)[0]) & 0xFFFF


def _halves(v: int) -> tuple[int, int]:
    return v & 0xFFFF, (v >> 16) & 0xFFFF


def run(asm: str, inputs: list[int], n_out: int = 4) -> list[int]:
    """Run an inline-asm body whose outputs are $0..$(n_out - 1) and inputs the next operands."""
    regs = {f"${n_out + i}": v & 0xFFFFFFFF for i, v in enumerate(inputs)}

    def val(t: str) -> int:
        t = t.strip()
        return regs[t] if t in regs else int(t, 16) if t.startswith("0x") else int(t)

    for ins in asm.strip()[1:-1].split(";"):
        ins = ins.strip()
        if not ins or ins.startswith(".reg"):
            continue
        op, rest = ins.split(None, 1)
        args = [a.strip() for a in rest.split(",")]
        d = args[0]
        if op == "mov.b32":
            regs[d] = val(args[1])
        elif op == "and.b32":
            regs[d] = val(args[1]) & val(args[2])
        elif op == "or.b32":
            regs[d] = val(args[1]) | val(args[2])
        elif op == "shr.u32":
            regs[d] = val(args[1]) >> val(args[2])
        elif op == "prmt.b32":  # default mode: byte i of d = byte (selector nibble i) of {b, a}
            a, b, c = val(args[1]), val(args[2]), val(args[3])
            src = [(a >> (8 * i)) & 255 for i in range(4)] + [(b >> (8 * i)) & 255 for i in range(4)]
            regs[d] = sum(src[(c >> (4 * i)) & 7] << (8 * i) for i in range(4))
        elif op in ("sub.f16x2", "fma.rn.f16x2", "fma.rn.bf16x2"):
            kind = "bf16" if "bf16" in op else "f16"
            xs = [_halves(val(a)) for a in args[1:]]
            res = []
            for lane in range(2):
                v = [h2f(x[lane], kind) for x in xs]
                res.append(f2h(v[0] - v[1] if op.startswith("sub") else v[0] * v[1] + v[2], kind))  # exact in fp64
            regs[d] = res[0] | (res[1] << 16)
        else:
            raise ValueError(f"unemulated PTX op {op}")
    return [regs[f"${i}"] for i in range(n_out)]


def nibble_asms(path: str) -> list[str]:
    """The inline-asm bodies of `_nibbles` in the kernel source, in order."""
    src = open(path).read()
    fn = src[src.index("def _nibbles("):src.index("def _qmm4_kernel(")]
    return ["".join(re.findall(r'"([^"]*)"', b)) for b in re.findall(r'tl\.inline_asm_elementwise\(\s*((?:"[^"]*"\s*)+),', fn)]


def check_nibbles(path: str, trials: int = 500, seed: int = 0) -> None:
    """Each `_nibbles` asm (fp16 128 + q, fp16 s q + m, bf16 128 + q, bf16 s q + m) on random code
    words, scales and offsets: every value equals the exact one (128 + q, or s q + m rounded once)."""
    asms = nibble_asms(path)
    kinds = [("f16", True), ("f16", False), ("bf16", True), ("bf16", False)]
    assert len(asms) == len(kinds), len(asms)
    rng = np.random.default_rng(seed)
    for asm, (kind, raw) in zip(asms, kinds):
        for _ in range(trials):
            byts = [int(b) for b in rng.integers(0, 256, 4)]
            s = [f2h(float(rng.uniform(-0.05, 0.05)), kind) for _ in range(4)]
            m = [f2h(float(rng.uniform(-0.5, 0.5)), kind) for _ in range(4)]
            w = byts[0] | byts[1] << 8 | byts[2] << 16 | byts[3] << 24
            out = run(asm, [w, s[0] | s[1] << 16, s[2] | s[3] << 16, m[0] | m[1] << 16, m[2] | m[3] << 16])
            lo = [h2f(h, kind) for o in out[:2] for h in _halves(o)]
            hi = [h2f(h, kind) for o in out[2:] for h in _halves(o)]
            for e in range(4):
                ql, qh = byts[e] & 15, byts[e] >> 4
                if raw:
                    want = (128.0 + ql, 128.0 + qh)
                else:
                    sv, mv = h2f(s[e], kind), h2f(m[e], kind)
                    want = (h2f(f2h(sv * ql + mv, kind), kind), h2f(f2h(sv * qh + mv, kind), kind))
                assert (lo[e], hi[e]) == want, (kind, raw, hex(byts[e]), (lo[e], hi[e]), want)
