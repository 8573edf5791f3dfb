"""Checks of the half-math GEMVs (`kvserve/kernels/triton_qgemv_half.py`, KVSERVE_INT4_GEMV=half /
KVSERVE_INT8_GEMV=half) against the fp64 product of the dequantized weight: the plain GEMV (bias
or not) and the SiLU·mul epilogue, every 4-bit layout (HF int4 in groups of 128 and 32, GGUF
Q4_0 / Q4_1 / Q4_K, codes without offsets) and int8 layout (per channel, Q8_0, groups of 128),
the qkv + RoPE + K/V store variant, bf16 / fp16 activations (with large and tiny blocks: the per-block scaling),
its tile configs; the activation pairs bit for bit; the env switch. Shared by the GPU tests
(`tests/gpu/test_quant_gpu.py`) and the CPU test that runs them under TRITON_INTERPRET=1 on tiny
shapes (`tests/platform/test_int4_gemv_half.py`)."""

from __future__ import annotations

import torch

from tests.gpu.quant_checks import assert_rope_result, env, rel_err, rope_case, rope_reference
from tests.gpu.quant_w4_checks import int4_formats
from tests.gpu.quant_w8_checks import int8_formats


def half_formats(n: int, k: int, device: str) -> dict:
    """Every layout the half-math GEMV takes: the 4-bit ones, then the int8 ones."""
    return {**int4_formats(n, k, device), **int8_formats(n, k, device)}


def _x(k: int, dtype: torch.dtype, device: str, seed: int) -> torch.Tensor:
    """Activations whose 32-value blocks span magnitudes (x 1e-3 .. x 300; fp16: .. x 10, so that
    the products stay in fp16's range): the per-block scale."""
    g = torch.Generator().manual_seed(seed)
    mags = torch.logspace(-3, 1.0 if dtype == torch.float16 else 2.5, k // 32)[torch.randperm(k // 32, generator=g)]
    x = torch.randn(1, k, generator=g) * mags.repeat_interleave(32)
    return x.to(device=device, dtype=dtype)


def check_pairs(device: str) -> None:
    """`act_pairs`: each slot holds the pair `_pair_order` names, scaled by a power of two into
    [2^10, 2^11) for the block's largest magnitude, exact for these bf16 values; the block sums."""
    from kvserve.kernels import triton_qgemv_half as hm

    k = 256
    x = _x(k, torch.bfloat16, device, 3)
    xh, xs, xsum = hm.act_pairs(x)
    xf = x.float().cpu().view(k // 32, 32)
    pairs = xh.cpu().view(k // 32, 16)
    lo = (pairs & 0xFFFF).to(torch.int16).view(torch.float16).float()
    hi = ((pairs >> 16) & 0xFFFF).to(torch.int16).view(torch.float16).float()
    scale = xs.cpu().view(-1, 1) / 1024.0  # 2^-c
    for s, p in enumerate(hm._PAIR):
        assert torch.equal(lo[:, s] * scale[:, 0], xf[:, 2 * p]), s
        assert torch.equal(hi[:, s] * scale[:, 0], xf[:, 2 * p + 1]), s
    big = torch.maximum(lo.abs().amax(1), hi.abs().amax(1))
    assert bool(((big >= 1024) & (big < 2048)).all()), big
    assert torch.allclose(xsum.cpu().view(-1), xf.double().sum(1).float(), rtol=1e-6, atol=1e-6)


def check_norm_pairs(device: str) -> None:
    """The RMSNorm kernel's activation pairs (`fused_ops.rmsnorm_pairs` / `add_rmsnorm_pairs`)
    equal `act_pairs` of its output bit for bit (widths a power of two or not: 2880 = 90 blocks
    in a 4,096-wide program), bf16 and fp16; a GEMV given them equals one that makes its own."""
    from kvserve.kernels import triton_qgemv_half as hm
    from kvserve.models import fused_ops

    for k, dtype in ((256, torch.bfloat16), (2880, torch.bfloat16), (288, torch.float16)):
        x = _x(k, dtype, device, 10)
        w = (1.0 + 0.1 * torch.randn(k, generator=torch.Generator().manual_seed(1))).to(device=device, dtype=dtype)
        res = _x(k, dtype, device, 11)
        for out in (fused_ops.rmsnorm_pairs(x, w, 1e-6), fused_ops.add_rmsnorm_pairs(x, res, w, 1e-6)[0]):
            got = fused_ops.half_pairs(out)
            assert got is not None
            want = hm.act_pairs(out.clone())
            for a, b in zip(got, want):
                assert torch.equal(a, b), (k, dtype)
        qw = int4_formats(8, k, device)["int4-g32"]
        assert torch.equal(hm.qgemv_half(out, qw, pairs=got), hm.qgemv_half(out.clone(), qw))


def check_gemv(n: int, k: int, device: str, dtype: torch.dtype, tol: float, configs=(None,)) -> dict[str, float]:
    """qgemv_half (and with each of `configs`) against x times the dequantized weight."""
    from kvserve.kernels import triton_qgemv_half as hm

    errs = {}
    g = torch.Generator().manual_seed(21)
    bias = (torch.randn(n, generator=g) * 0.1).to(device=device, dtype=dtype)
    for name, qw in half_formats(n, k, device).items():
        wref = qw.dequantize(torch.float64)
        for seed, b in ((5, None), (6, bias)):
            x = _x(k, dtype, device, seed)
            assert hm.applies(x, qw), name
            ref = x.double() @ wref.T + (0 if b is None else b.double())
            for cfg in configs:
                got = hm.qgemv_half(x, qw, b, config=cfg)
                assert got.dtype == dtype and got.shape == (1, n)
                e = rel_err(got, ref)
                errs[f"{name}{' bias' if b is not None else ''} {cfg}"] = e
                assert e < tol, (name, cfg, e)
    return errs


def check_silu(n: int, k: int, device: str, dtype: torch.dtype, tol: float, configs=(None,)) -> None:
    from kvserve.kernels import triton_qgemv_half as hm

    for name, qw in half_formats(2 * n, k, device).items():
        x = _x(k, dtype, device, 7)
        y = x.double() @ qw.dequantize(torch.float64).T
        ref = torch.nn.functional.silu(y[:, :n]) * y[:, n:]
        for cfg in configs:
            got = hm.qgemv_half(x, qw, None, silu=True, config=cfg)
            assert got.shape == (1, n)
            assert rel_err(got, ref) < tol, (name, cfg, rel_err(got, ref))


def check_rope(device: str, dtype: torch.dtype, tol: float, hq: int = 4, hkv: int = 2, d: int = 64, k: int = 256,
               configs=(None,)) -> None:
    """The qkv + RoPE + K/V store variant (`triton_quant.qgemv_rope_` with the kind's switch at
    "half") against the fp64 product then a fp64 rotation, every 4-bit and int8 layout."""
    from kvserve.kernels import triton_quant

    n = (hq + 2 * hkv) * d
    ang, cos_sin, pos = rope_case(d, device)
    with env(KVSERVE_INT4_GEMV="half", KVSERVE_INT8_GEMV="half"):
        for name, qw in half_formats(n, k, device).items():
            x = _x(k, dtype, device, 9)
            rot = rope_reference(x, qw, ang, hq, hkv, d)
            for cfg in configs:
                cache = torch.zeros(2, 4, 16, hkv, d, device=device, dtype=dtype)
                slot = torch.tensor([21], device=device)
                got = triton_quant.qgemv_rope_(x, qw, None, pos, cos_sin, hq, hkv, d, cache, slot, config=cfg)
                assert_rope_result(got, cache, rot, hq, hkv, d, tol, (name, cfg))


def check_env_switch(device: str) -> None:
    """KVSERVE_INT4_GEMV=half (KVSERVE_INT8_GEMV=half) routes `triton_quant.qgemv` to the half-math
    GEMV for 4-bit (int8) weights and 16-bit activations only (fp32 keeps the code-at-a-time
    kernel, bit for bit; the other kind's switch does not move it); a bad config is refused by
    name."""
    from kvserve.kernels import triton_qgemv_half as hm
    from kvserve.kernels import triton_quant

    xb = _x(128, torch.bfloat16, device, 8)
    xf = xb.float()
    for var, other, qw in (("KVSERVE_INT4_GEMV", "KVSERVE_INT8_GEMV", int4_formats(64, 128, device)["int4-g32"]),
                           ("KVSERVE_INT8_GEMV", "KVSERVE_INT4_GEMV", int8_formats(64, 128, device)["Q8_0"])):
        with env(**{other: "half", var: None}):
            assert torch.equal(triton_quant.qgemv(xb, qw), triton_quant.qgemv(xb, qw, words=False))
        with env(**{other: "half", var: "half"}):
            assert torch.equal(triton_quant.qgemv(xb, qw), hm.qgemv_half(xb, qw))
            assert torch.equal(triton_quant.qgemv(xf, qw), triton_quant.qgemv(xf, qw, words=False))
    from kvserve.platform.cuda_quant import quantize

    g16 = quantize(torch.randn(8, 128), "int4", 16).to(torch.device(device))  # a scale per half block: not taken
    assert not hm.applies(xb, g16)
    with env(KVSERVE_INT4_GEMV="half"):
        assert torch.equal(triton_quant.qgemv(xb, g16), triton_quant.qgemv(xb, g16, words=False))
    qw = int4_formats(64, 128, device)["int4-g32"]
    for bad in ((16, 32, 4), (16, 2, 4, False), (12, 32, 4, False)):
        try:
            hm.qgemv_half(xb, qw, config=bad)
        except ValueError as e:
            assert "config" in str(e)
        else:
            raise AssertionError(f"config {bad} accepted")


def run_interpret() -> None:
    """Tiny CPU shapes under TRITON_INTERPRET=1: small tiles so that several K steps (a last
    partial one: K / 32 = 9 blocks with BLOCK_G 4), several programs and masked rows are covered."""
    small = [(4, 8, 1, False), (8, 4, 1, True), (16, 4, 2, False)]
    check_pairs("cpu")
    check_norm_pairs("cpu")
    check_gemv(12, 288, "cpu", torch.bfloat16, tol=1e-2, configs=small)
    check_gemv(12, 256, "cpu", torch.float16, tol=2e-3, configs=small[:1])
    check_silu(6, 288, "cpu", torch.bfloat16, tol=1.5e-2, configs=small[:2])  # (the epilogue's bf16 roundings)
    check_silu(6, 256, "cpu", torch.float16, tol=2e-3, configs=small[:1])
    check_rope("cpu", torch.bfloat16, tol=1.5e-2, hq=2, hkv=1, d=8, k=288, configs=[(2, 8, 1, False), (4, 4, 1, True)])
    check_env_switch("cpu")
    print("half interpret checks passed")


if __name__ == "__main__":
    run_interpret()
