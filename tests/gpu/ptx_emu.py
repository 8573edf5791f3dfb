"""A tiny emulator of the PTX that `kvserve/kernels/triton_qmm4._nibbles` and
`triton_qgemv_half._block_dot` inline (mov, and, or, xor, shr, prmt, sub / mul / fma on f16x2 and
bf16x2, the f16 -> f32 widening and f32 adds), so their bit tricks are checked bit-exactly on the
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


def _f32(bits: int) -> float:
    return float(np.array([bits], dtype=np.uint32).view(np.float32)[0])


def _f32_bits(x: float) -> int:
    return int(np.array([x], dtype=np.float32).view(np.uint32)[0])


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
        if op == "mov.b32" and rest.startswith("{"):  # mov.b32 {lo, hi}, src: split into halves
            halves, src = rest[1:].split("}")
            lo, hi = [h.strip() for h in halves.split(",")]
            regs[lo], regs[hi] = _halves(val(src.strip(" ,")))
            continue
        args = [a.strip() for a in rest.split(",")]
        d = args[0]
        if op == "cvt.f32.f16":
            regs[d] = _f32_bits(h2f(val(args[1]), "f16"))
        elif op == "add.f32":
            regs[d] = _f32_bits(float(np.float32(_f32(val(args[1]))) + np.float32(_f32(val(args[2])))))
        elif op == "mov.b32":
            regs[d] = val(args[1])
        elif op == "and.b32":
            regs[d] = val(args[1]) & val(args[2])
        elif op == "xor.b32":
            regs[d] = val(args[1]) ^ val(args[2])
        elif op == "or.b32":
            regs[d] = val(args[1]) | val(args[2])
        elif op == "shr.u32":
            regs[d] = val(args[1]) >> val(args[2])
        elif op == "prmt.b32":  # default mode: byte i of d = byte (selector nibble i) of {b, a}
            a, b, c = val(args[1]), val(args[2]), val(args[3])
            src = [(a >> (8 * i)) & 255 for i in range(4)] + [(b >> (8 * i)) & 255 for i in range(4)]
            regs[d] = sum(src[(c >> (4 * i)) & 7] << (8 * i) for i in range(4))
        elif op in ("sub.f16x2", "mul.rn.f16x2", "fma.rn.f16x2", "fma.rn.bf16x2"):
            kind = "bf16" if "bf16" in op else "f16"
            xs = [_halves(val(a)) for a in args[1:]]
            res = []
            for lane in range(2):
                v = [h2f(x[lane], kind) for x in xs]
                exact = v[0] - v[1] if op.startswith("sub") else v[0] * v[1] if op.startswith("mul") else \
                    v[0] * v[1] + v[2]
                res.append(f2h(exact, kind))  # exact in fp64, then rounded once
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


def _unit_codes(word: int, bits: int) -> list[list[int]]:
    """The codes a half-math GEMV's PTX pairs with slot i's activation pair, for one code word:
    4-bit (`_block_dot`): slots 0 / 1 the low nibbles of bytes 0-1 / 2-3, slots 2 / 3 their high
    nibbles; int8 (`_block_dot8`): slot i bytes 2i, 2i + 1, signed."""
    byts = [(word >> (8 * b)) & 255 for b in range(4)]
    if bits == 4:
        return [[(byts[2 * (i % 2) + e] >> (4 * (i // 2))) & 15 for e in range(2)] for i in range(4)]
    return [[byts[2 * i + e] - (256 if byts[2 * i + e] & 128 else 0) for e in range(2)] for i in range(2)]


def _block_dot_case(bits: int, rng, xv: np.ndarray) -> tuple[list[int], float, float]:
    """Random code words against activations xv [slots, 4 words, 2] (rounded to fp16): the PTX's
    fp32 result ($1..$3 checked to be -0.0), the exact sum of q x 2^-10 and the sum of |q x| 2^-10."""
    from kvserve.kernels import triton_qgemv_half as hm

    asm = hm._block_dot_asm() if bits == 4 else hm._block_dot8_asm()
    slots = xv.shape[0]
    words = [int(w) for w in rng.integers(0, 1 << 32, 4, dtype=np.uint64)]
    xh = [[[f2h(float(v), "f16") for v in xv[i, w]] for w in range(4)] for i in range(slots)]
    out = run(asm, words + [xh[i][w][0] | xh[i][w][1] << 16 for i in range(slots) for w in range(4)])
    assert out[1:] == [0x80000000] * 3
    exact, mag = 0.0, 0.0
    for w in range(4):
        codes = _unit_codes(words[w], bits)
        for i in range(slots):
            for e in range(2):
                v = codes[i][e] * h2f(xh[i][w][e], "f16") / 1024.0
                exact += v
                mag += abs(v)
    return _f32(out[0]), exact, mag


def check_block_dot(bits: int = 4, trials: int = 300, seed: int = 0) -> None:
    """`triton_qgemv_half._block_dot`'s PTX (`bits` 8: `_block_dot8`) on random code words and
    activation pairs of small integers (every partial sum exact in fp16, so the result must be
    exact): $0 is the unit's sum of q x 2^-10 over the slots `_pair_order` pairs with each code
    (`_unit_codes`), $1..$3 are -0.0."""
    rng = np.random.default_rng(seed)
    for _ in range(trials):
        got, exact, _ = _block_dot_case(bits, rng, rng.integers(-2, 3, (4 if bits == 4 else 2, 4, 2)))
        assert got == exact, (bits, got, exact)


def block_dot_error(bits: int = 4, trials: int = 200, seed: int = 2) -> float:
    """The largest error of `_block_dot` (`bits` 8: `_block_dot8`) on random codes and activation
    pairs scaled as `act_pairs` scales them (a block's largest magnitude in [2^10, 2^11)), relative
    to the block's sum of |q x| (exact in fp64): the fp16 rounding of the products and partial
    sums that the GPU's result carries."""
    rng = np.random.default_rng(seed)
    worst = 0.0
    for _ in range(trials):
        xv = rng.standard_normal((4 if bits == 4 else 2, 4, 2))
        got, exact, mag = _block_dot_case(bits, rng, xv / np.abs(xv).max() * 2047.0)
        worst = max(worst, abs(got - exact) / max(mag, 1e-30))
    return worst
