"""Checks of the verify GEMM (`kvserve/kernels/triton_verify_gemm.py`) against `F.linear` and the
unfused epilogues (torch SiLU·mul, the torch RoPE + K/V store of `rope_reference`), shared by the
GPU tests (`tests/gpu/test_verify_gemm.py`, bf16 at Llama shapes) and a CPU run under
TRITON_INTERPRET=1 (`tests/kernels/test_triton_verify_gemm.py`, fp32 / fp16 at small shapes:
bf16 `tl.dot` is wrong in the interpreter).

    TRITON_INTERPRET=1 python -m tests.gpu.verify_gemm_checks
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from kvserve.kernels import triton_verify_gemm as vg


def _data(m: int, n: int, k: int, device: str, dtype: torch.dtype, seed: int, bias: bool):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(device, dtype)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(device, dtype)
    b = torch.randn(n, generator=g).to(device, dtype) if bias else None
    return x, w, b


def _tol(dtype: torch.dtype) -> dict:
    return {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=2e-3, rtol=2e-3)}.get(
        dtype, dict(atol=2e-2, rtol=2e-2))


def silu_mul_reference(y: torch.Tensor) -> torch.Tensor:
    g, u = y.chunk(2, dim=-1)
    return F.silu(g) * u


def rope_reference(qkv, positions, cos_sin, hq, hkv, d, cache, slots):
    """Rotate q and k of `qkv` (neox halves) in place and store k, v at `slots` of the paged cache."""
    t = qkv.shape[0]
    half = d // 2
    view = qkv.view(t, hq + 2 * hkv, d)
    cs = cos_sin[positions.long()]  # [T, D] fp32
    c, s = cs[:, None, :half], cs[:, None, half:]
    x = view[:, : hq + hkv].float()
    x1, x2 = x[..., :half], x[..., half:]
    view[:, : hq + hkv] = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), -1).to(qkv.dtype)
    if cache is not None:
        flat = cache.view(2, -1, hkv, d)
        for i in range(t):
            if int(slots[i]) >= 0:
                flat[0, int(slots[i])] = view[i, hq : hq + hkv].to(cache.dtype)
                flat[1, int(slots[i])] = view[i, hq + hkv :].to(cache.dtype)


def check_plain(m, n, k, device, dtype, config=None, bias=False, seed=0) -> None:
    x, w, b = _data(m, n, k, device, dtype, seed, bias)
    got = vg.verify_gemm(x, w, b, config)
    ref = F.linear(x.float(), w.float(), None if b is None else b.float()).to(dtype)
    torch.testing.assert_close(got, ref, **_tol(dtype))


def check_silu_mul(m, i, k, device, dtype, config=None, bias=False, seed=1) -> None:
    x, w, b = _data(m, 2 * i, k, device, dtype, seed, bias)
    got = vg.verify_gemm_silu_mul(x, w, b, config)
    ref = silu_mul_reference(F.linear(x.float(), w.float(), None if b is None else b.float()).to(dtype).float())
    torch.testing.assert_close(got, ref.to(dtype), **_tol(dtype))


def check_rope(m, hq, hkv, d, k, device, dtype, config=None, bias=False, write=True, seed=2) -> None:
    n = (hq + 2 * hkv) * d
    x, w, b = _data(m, n, k, device, dtype, seed, bias)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device=device).float() / d))
    pos_all = torch.arange(64, device=device, dtype=torch.float32)
    freqs = pos_all[:, None] * inv[None, :]
    cos_sin = torch.cat((freqs.cos(), freqs.sin()), -1).contiguous()
    positions = torch.arange(7, 7 + m, device=device)
    block_size, blocks = 4, 8
    slots = torch.randperm(blocks * block_size, generator=torch.Generator().manual_seed(seed))[:m].to(device)
    if m > 1:
        slots[-1] = -1  # a padding row: no cache write
    cache = torch.zeros(2, blocks, block_size, hkv, d, device=device, dtype=dtype) if write else None
    ref_cache = cache.clone() if write else None
    got = vg.verify_gemm_rope_(x, w, b, positions, cos_sin, hq, hkv, d, cache, slots if write else None, config)
    ref = F.linear(x.float(), w.float(), None if b is None else b.float()).to(dtype)
    rope_reference(ref, positions, cos_sin, hq, hkv, d, ref_cache, slots)
    torch.testing.assert_close(got, ref, **_tol(dtype))
    if write:
        torch.testing.assert_close(cache, ref_cache, **_tol(dtype))


def interpret_checks() -> None:
    """Small shapes for the CPU interpreter: split-K (with an uneven last split) and not, every
    epilogue, bias, 2..16 rows."""
    small = (32, 32, 2, 4, 2)  # BLOCK_N, BLOCK_K, SPLIT, warps, STAGES
    for dtype in (torch.float32, torch.float16):
        for m in (2, 5, 16):
            check_plain(m, 64, 96, "cpu", dtype, small, bias=m == 5)
            check_plain(m, 48, 128, "cpu", dtype, (32, 32, 1, 4, 2))
            check_plain(m, 64, 160, "cpu", dtype, (32, 32, 3, 4, 2))  # k_split 64: the last split is short
            check_silu_mul(m, 48, 64, "cpu", dtype, small, bias=m == 2)
            check_rope(m, 2, 1, 32, 64, "cpu", dtype, (32, 32, 2, 4, 2), bias=m == 16)
            check_rope(m, 2, 1, 64, 64, "cpu", dtype, (32, 32, 1, 4, 2), write=m != 2)
        # The ticket counters are back at 0: a second launch is right too.
        check_plain(5, 64, 96, "cpu", dtype, small, seed=5)
    with preload(1):  # the first tile loaded before the (here absent) PDL wait, as on sm_90
        for dtype in (torch.float32, torch.float16):
            check_plain(5, 64, 160, "cpu", dtype, (32, 32, 3, 4, 2))  # last split: one tile only
            check_plain(3, 64, 96, "cpu", dtype, (32, 32, 1, 4, 2), bias=True)
            check_silu_mul(5, 48, 64, "cpu", dtype, small)
            check_rope(5, 2, 1, 64, 64, "cpu", dtype, (32, 32, 2, 4, 2))


@contextlib.contextmanager
def preload(pre: int):
    """Every launch of the block uses PRE=pre (GPU runs with PDL use 1; without PDL 0)."""
    orig = vg._launch
    vg._launch = lambda *a, **kw: orig(*a, **{**kw, "pre": pre})
    try:
        yield
    finally:
        vg._launch = orig


if __name__ == "__main__":
    interpret_checks()
    print("interpret checks passed")
