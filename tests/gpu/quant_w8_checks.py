"""Checks of the int32-word int8 GEMV (`triton_quant._dot_rows_w8`, KVSERVE_INT8_GEMV=words) against
the fp64 product of the dequantized weight: the plain GEMV (bias or not), the SiLU·mul and RoPE + K/V
store epilogues, both int8 layouts (HF int8 per channel: KIND 2; GGUF Q8_0 in groups of 32 and an
int8 weight in groups of 128: KIND 1), bf16 / fp16 / fp32 activations, and its tile configs. Shared
by the GPU tests (`tests/gpu/test_quant_gpu.py`) and the CPU test that runs them under
TRITON_INTERPRET=1 on tiny shapes (`tests/platform/test_int8_gemv_words.py`)."""

from __future__ import annotations

import torch

from tests.gpu.quant_checks import formats, rel_err


def int8_formats(n: int, k: int, device: str, seed: int = 0) -> dict:
    """The int8 layouts of `quant_checks.formats` (the same weights) and one in groups of 128
    (no format stores that from HF, the kernels take it: w = s q per group)."""
    from kvserve.platform.cuda_quant import QWeight

    out = formats(n, k, device, seed, only="Q8_0")
    w = (torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05)
    from kvserve.platform.cuda_quant import quantize

    out["int8"] = quantize(w, "int8").to(torch.device(device))
    if k % 128 == 0:
        wg = w.view(n, k // 128, 128)
        s = (wg.abs().amax(dim=2) / 127.0).to(torch.float16)
        q = (wg / s.float()[:, :, None]).round().clamp(-127, 127).to(torch.int8).view(n, k)
        out["int8-g128"] = QWeight("int8", q, s, None, 128, k).to(torch.device(device))
    return out


def check_gemv(n: int, k: int, device: str, dtype: torch.dtype, tol: float, configs=(None,)) -> dict[str, float]:
    """qgemv(words=True) (and with each of `configs`) against x times the dequantized weight."""
    from kvserve.kernels import triton_quant

    errs = {}
    g = torch.Generator().manual_seed(11)
    bias = (torch.randn(n, generator=g) * 0.1).to(device=device, dtype=dtype)
    for name, qw in int8_formats(n, k, device).items():
        assert triton_quant._w8_operands(torch.zeros(1, k, device=device, dtype=dtype), qw, True) is not None, name
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


def check_silu(n: int, k: int, device: str, dtype: torch.dtype, tol: float, configs=(None,)) -> None:
    from kvserve.kernels import triton_quant

    g = torch.Generator().manual_seed(12)
    for name, qw in int8_formats(2 * n, k, device).items():
        x = torch.randn(1, k, generator=g).to(device=device, dtype=dtype)
        y = x.double() @ qw.dequantize(torch.float64).T
        ref = torch.nn.functional.silu(y[:, :n]) * y[:, n:]
        for cfg in configs:
            got = triton_quant.qgemv(x, qw, None, silu=True, config=cfg, words=True)
            assert got.shape == (1, n)
            assert rel_err(got, ref) < tol, (name, cfg, rel_err(got, ref))


def check_rope(device: str, dtype: torch.dtype, tol: float, hq: int = 4, hkv: int = 2, d: int = 64, k: int = 256,
               configs=(None,)) -> None:
    """The qkv + RoPE + K/V store epilogue (several row pairs a program) against the plain product
    then a fp64 rotation."""
    from kvserve.kernels import triton_quant

    n = (hq + 2 * hkv) * d
    g = torch.Generator().manual_seed(13)
    half = d // 2
    inv = 1.0 / (10000 ** (torch.arange(half, dtype=torch.float64) / half))
    ang = torch.arange(64, dtype=torch.float64)[:, None] * inv[None, :]
    cos_sin = torch.cat([ang.cos(), ang.sin()], dim=1).float().to(device)
    for name, qw in int8_formats(n, k, device).items():
        x = torch.randn(1, k, generator=g).to(device=device, dtype=dtype)
        pos = torch.tensor([37], device=device)
        y = (x.double() @ qw.dequantize(torch.float64).T).view(hq + 2 * hkv, d).cpu()
        c, s = ang[37].cos(), ang[37].sin()
        rot = y.clone()
        x1, x2 = y[: hq + hkv, :half], y[: hq + hkv, half:]
        rot[: hq + hkv, :half] = x1 * c - x2 * s
        rot[: hq + hkv, half:] = x2 * c + x1 * s
        for cfg in configs:
            cache = torch.zeros(2, 4, 16, hkv, d, device=device, dtype=dtype)
            slot = torch.tensor([21], device=device)
            got = triton_quant.qgemv_rope_(x, qw, None, pos, cos_sin, hq, hkv, d, cache, slot, words=True, config=cfg)
            assert rel_err(got.view(hq + 2 * hkv, d), rot) < tol, (name, cfg)
            kv = cache.view(2, 64, hkv, d)[:, 21].cpu()
            assert rel_err(kv[0], rot[hq: hq + hkv]) < tol and rel_err(kv[1], rot[hq + hkv:]) < tol, (name, cfg)
            assert cache.view(2, 64, hkv, d)[:, :21].abs().sum() == 0


def check_env_switch(device: str) -> None:
    """KVSERVE_INT8_GEMV picks the decode (default: a code at a time); other values are refused;
    fp8 weights never take it."""
    import os

    from kvserve.kernels import triton_quant
    from kvserve.platform.cuda_quant import quantize

    qw = int8_formats(8, 64, device)["int8"]
    x = torch.randn(1, 64).to(device=device, dtype=torch.float32)
    assert triton_quant._w8_operands(x, quantize(torch.randn(8, 64), "fp8").to(torch.device(device)), True) is None
    old = os.environ.get("KVSERVE_INT8_GEMV")
    try:
        os.environ.pop("KVSERVE_INT8_GEMV", None)
        assert triton_quant._w8_operands(x, qw, None) is None
        os.environ["KVSERVE_INT8_GEMV"] = "words"
        assert triton_quant._w8_operands(x, qw, None) is not None
        os.environ["KVSERVE_INT8_GEMV"] = "bytes"
        try:
            triton_quant.qgemv(x, qw)
        except ValueError as e:
            assert "KVSERVE_INT8_GEMV" in str(e)
        else:
            raise AssertionError("KVSERVE_INT8_GEMV=bytes accepted")
    finally:
        if old is None:
            os.environ.pop("KVSERVE_INT8_GEMV", None)
        else:
            os.environ["KVSERVE_INT8_GEMV"] = old
    # an 8-byte-misaligned 16-bit x falls back to the code-at-a-time kernel, same result
    xb = torch.randn(1, 65).to(device=device, dtype=torch.bfloat16)[:, 1:]
    assert triton_quant._w8_operands(xb, qw, True) is None
    assert torch.equal(triton_quant.qgemv(xb, qw, words=True), triton_quant.qgemv(xb, qw, words=False))


def run_interpret() -> None:
    """Tiny CPU shapes under TRITON_INTERPRET=1: small tiles so that several K steps, several
    programs and masked rows (N not a multiple of the tile) are covered."""
    small = [(8, 128, 1, False), (4, 256, 1, True), (16, 64, 2, False)]
    check_gemv(12, 256, "cpu", torch.float32, tol=1e-5, configs=small)
    check_gemv(12, 256, "cpu", torch.bfloat16, tol=1.5e-2, configs=small[:1])
    check_gemv(12, 256, "cpu", torch.float16, tol=2e-3, configs=small[:1])
    check_silu(6, 256, "cpu", torch.float32, tol=1e-5, configs=small[:2])
    check_silu(6, 256, "cpu", torch.float16, tol=2e-3, configs=small[:1])
    check_rope("cpu", torch.float32, tol=1e-5, hq=2, hkv=1, d=8, configs=[(2, 128, 1, False), (4, 256, 1, True)])
    check_env_switch("cpu")
    print("w8 interpret checks passed")


if __name__ == "__main__":
    run_interpret()
