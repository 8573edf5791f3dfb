"""Checks of the int32-word 4-bit GEMV (`triton_quant._dot_rows_w4`, KVSERVE_INT4_GEMV=words; with
`bits=8` the same checks of the int8 one, `quant_w8_checks`)
against the fp64 product of the dequantized weight: the plain GEMV (bias or not), the SiLU·mul and
RoPE + K/V store epilogues, every 4-bit layout (HF int4 in groups of 128 and 32, GGUF Q4_0 / Q4_1 /
Q4_K, and codes without offsets), bf16 / fp16 / fp32 activations, and its tile configs. Shared by the GPU tests
(`tests/gpu/test_quant_gpu.py`) and the CPU test that runs them under TRITON_INTERPRET=1 on tiny
shapes (`tests/platform/test_int4_gemv_words.py`)."""

from __future__ import annotations

import torch

from tests.gpu.quant_checks import assert_rope_result, formats, rel_err, rope_case, rope_reference

INT4 = ("int4-g128", "int4-g32", "Q4_0", "Q4_1", "Q4_K")


def int4_formats(n: int, k: int, device: str, seed: int = 0) -> dict:
    """The 4-bit layouts of `quant_checks.formats` (the same weights), without the others."""
    from kvserve.platform.cuda_quant import QWeight, quantize

    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05
    out = {"int4-g128": quantize(w, "int4", 128) if k % 128 == 0 else quantize(w, "int4", 32),
           "int4-g32": quantize(w, "int4", 32)}
    g32 = out["int4-g32"]  # and without offsets (w = s q; no format stores that, the kernels take it)
    out["int4-no-offset"] = QWeight("int4", g32.q, g32.scale, None, 32, k)
    out = {name: qw.to(torch.device(device)) for name, qw in out.items()}
    for name in INT4[2:]:
        out.update(formats(n, k, device, seed, only=name))
    return out


def word_formats(bits: int, n: int, k: int, device: str) -> dict:
    """The layouts the `bits`-bit word GEMV takes: `int4_formats`, or `quant_w8_checks.int8_formats`."""
    if bits == 4:
        return int4_formats(n, k, device)
    from tests.gpu.quant_w8_checks import int8_formats

    return int8_formats(n, k, device)


def _operands(bits: int):
    from kvserve.kernels import triton_quant

    return triton_quant._w4_operands if bits == 4 else triton_quant._w8_operands


def check_gemv(n: int, k: int, device: str, dtype: torch.dtype, tol: float, configs=(None,),
               bits: int = 4) -> dict[str, float]:
    """qgemv(words=True) (and with each of `configs`) against x times the dequantized weight."""
    from kvserve.kernels import triton_quant

    errs = {}
    g = torch.Generator().manual_seed(11)
    bias = (torch.randn(n, generator=g) * 0.1).to(device=device, dtype=dtype)
    for name, qw in word_formats(bits, n, k, device).items():
        assert _operands(bits)(torch.zeros(1, k, device=device, dtype=dtype), qw, True) is not None, name
        wref = qw.dequantize(torch.float64)
        x = torch.randn(1, k, generator=g).to(device=device, dtype=dtype)
        for b in (None, bias):
            ref = x.double() @ wref.T + (0 if b is None else b.double())
            for cfg in configs:
                got = triton_quant.qgemv(x, qw, b, config=cfg, words=True)
                assert got.dtype == dtype and got.shape == (1, n)
                e = rel_err(got, ref)
                errs[f"{name}{' bias' if b is not None else ''} {cfg}"] = e
                assert e < tol, (name, cfg, e)
    return errs


def check_silu(n: int, k: int, device: str, dtype: torch.dtype, tol: float, configs=(None,), bits: int = 4) -> None:
    from kvserve.kernels import triton_quant

    g = torch.Generator().manual_seed(12)
    for name, qw in word_formats(bits, 2 * n, k, device).items():
        x = torch.randn(1, k, generator=g).to(device=device, dtype=dtype)
        y = x.double() @ qw.dequantize(torch.float64).T
        ref = torch.nn.functional.silu(y[:, :n]) * y[:, n:]
        for cfg in configs:
            got = triton_quant.qgemv(x, qw, None, silu=True, config=cfg, words=True)
            assert got.shape == (1, n)
            assert rel_err(got, ref) < tol, (name, cfg, rel_err(got, ref))


def check_rope(device: str, dtype: torch.dtype, tol: float, hq: int = 4, hkv: int = 2, d: int = 64, k: int = 256,
               configs=(None,), bits: int = 4) -> None:
    """The qkv + RoPE + K/V store epilogue (several row pairs a program) against the plain product
    then a fp64 rotation."""
    from kvserve.kernels import triton_quant

    n = (hq + 2 * hkv) * d
    g = torch.Generator().manual_seed(13)
    ang, cos_sin, pos = rope_case(d, device)
    for name, qw in word_formats(bits, n, k, device).items():
        x = torch.randn(1, k, generator=g).to(device=device, dtype=dtype)
        rot = rope_reference(x, qw, ang, hq, hkv, d)
        for cfg in configs:
            cache = torch.zeros(2, 4, 16, hkv, d, device=device, dtype=dtype)
            slot = torch.tensor([21], device=device)
            got = triton_quant.qgemv_rope_(x, qw, None, pos, cos_sin, hq, hkv, d, cache, slot, words=True, config=cfg)
            assert_rope_result(got, cache, rot, hq, hkv, d, tol, (name, cfg))


def check_env_switch(device: str, bits: int = 4) -> None:
    """KVSERVE_INT{bits}_GEMV picks the decode (default: a code at a time); other values are refused;
    fp8 weights never take the word GEMV; a misaligned 16-bit x falls back to the code-at-a-time
    kernel with the same result."""
    import os

    from kvserve.kernels import triton_quant

    var = f"KVSERVE_INT{bits}_GEMV"
    qw = word_formats(bits, 8, 64, device)["int4-g32" if bits == 4 else "int8"]
    operands = _operands(bits)
    x = torch.randn(1, 64).to(device=device, dtype=torch.float32)
    from kvserve.platform.cuda_quant import quantize

    assert operands(x, quantize(torch.randn(8, 64), "fp8").to(torch.device(device)), True) is None  # never fp8
    old = os.environ.get(var)
    try:
        os.environ.pop(var, None)
        assert operands(x, qw, None) is None
        os.environ[var] = "words"
        assert operands(x, qw, None) is not None
        os.environ[var] = "bytes"
        try:
            triton_quant.qgemv(x, qw)
        except ValueError as e:
            assert var in str(e)
        else:
            raise AssertionError(f"{var}=bytes accepted")
    finally:
        if old is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = old
    # an 8-byte-misaligned 16-bit x falls back to the code-at-a-time kernel, same result
    xb = torch.randn(1, 65).to(device=device, dtype=torch.bfloat16)[:, 1:]
    assert operands(xb, qw, True) is None
    assert torch.equal(triton_quant.qgemv(xb, qw, words=True), triton_quant.qgemv(xb, qw, words=False))


def run_interpret(bits: int = 4) -> None:
    """Tiny CPU shapes under TRITON_INTERPRET=1: small tiles so that several K steps, several
    programs and masked rows (N not a multiple of the tile) are covered (8-bit tiles: BLOCK_K
    twice as wide for the same number of words)."""
    w = 1 if bits == 4 else 2
    small = [(8, 64 * w, 1, False), (4, 128 * w, 1, True), (16, 32 * w, 2, False)]
    check_gemv(12, 256, "cpu", torch.float32, tol=1e-5, configs=small, bits=bits)
    check_gemv(12, 256, "cpu", torch.bfloat16, tol=1.5e-2, configs=small[:1], bits=bits)
    check_gemv(12, 256, "cpu", torch.float16, tol=2e-3, configs=small[:1], bits=bits)
    check_silu(6, 256, "cpu", torch.float32, tol=1e-5, configs=small[:2], bits=bits)
    check_silu(6, 256, "cpu", torch.float16, tol=2e-3, configs=small[:1], bits=bits)
    check_rope("cpu", torch.float32, tol=1e-5, hq=2, hkv=1, d=8, configs=[(2, 64 * w, 1, False), (4, 128 * w, 1, True)],
               bits=bits)
    check_env_switch("cpu", bits=bits)
    print(f"w{bits} interpret checks passed")


if __name__ == "__main__":
    run_interpret()
