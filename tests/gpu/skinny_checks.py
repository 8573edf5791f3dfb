"""Checks of the skinny (2..8-row) Triton products (`kvserve/kernels/triton_skinny.py`), shared
by the GPU tests (`tests/gpu/test_skinny.py`, real shapes) and a CPU run under TRITON_INTERPRET=1
on tiny fp32 / fp16 shapes (`tests/kernels/test_triton_skinny.py`; `python -m tests.gpu.skinny_checks`).
The interpreter mis-handles some bf16 operations, so bf16 is checked on the GPU only."""

from __future__ import annotations

import torch
import triton

from kvserve.kernels import triton_skinny
from kvserve.models import triton_ops


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    assert torch.isfinite(a).all()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def inputs(m: int, n: int, k: int, device: str, dtype: torch.dtype, bias: bool, seed: int = 0):
    """(x [m, k] viewed with a row stride wider than k, weight [n, k], bias [n] or None)."""
    g = torch.Generator().manual_seed(seed + 1000 * m + n + k)
    x = torch.randn(m, k + 8, generator=g).to(device=device, dtype=dtype)[:, :k]  # rows k + 8 apart
    w = (torch.randn(n, k, generator=g) / k**0.5).to(device=device, dtype=dtype)
    b = torch.randn(n, generator=g).to(device=device, dtype=dtype) if bias else None
    return x, w, b


def reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    y = x.double() @ w.double().t()
    return y + b.double() if b is not None else y


def check_products(shapes, rows, device: str, dtype: torch.dtype, tol: float, configs=(None,)) -> None:
    """skinny(x, w, b) against fp64, every row and column (M, N, K ragged as given)."""
    for n, k in shapes:
        for m in rows:
            for bias in (False, True):
                for cfg in configs:
                    x, w, b = inputs(m, n, k, device, dtype, bias)
                    out = triton_skinny.skinny(x, w, b, config=cfg)
                    assert out.shape == (m, n) and out.dtype == dtype
                    err = rel_err(out, reference(x, w, b))
                    assert err < tol, (n, k, m, bias, cfg, err)
                    # row by row too: a wrong row hides in a norm over many rows
                    for r in range(m):
                        e = rel_err(out[r], reference(x[r : r + 1], w, b)[0])
                        assert e < tol, (n, k, m, r, bias, cfg, e)


def check_gemv_bits(n: int, k: int, rows, device: str, dtype: torch.dtype) -> None:
    """With the one-row GEMV's block configuration each row has the bits of that GEMV (the
    ring of tiles in flight changes when tiles load, not the sums)."""
    cfg = triton_ops.gemv_config(n, k)
    for m in rows:
        for bias in (False, True):
            for ring in (False, True):
                x, w, b = inputs(m, n, k, device, dtype, bias, seed=7)
                out = triton_skinny.skinny(x, w, b, config=(*cfg, ring))
                for r in range(m):
                    one = triton_ops.gemv(x[r : r + 1].contiguous(), w, b, config=cfg)
                    assert torch.equal(out[r], one[0]), (n, k, m, r, bias, ring)


def check_preloaded(device: str, dtype: torch.dtype, tol: float) -> None:
    """The PRE (weight tiles requested before the PDL wait) path, with and without the ring of
    tiles in flight, launched directly: the interpreter has no PDL, so the wrappers never set
    PRE there."""
    n, k, block_k = 10, 150, 32  # 4 whole tiles (up to 4 preloaded) and a ragged one in the loop
    for m in (1, 8):
        for pre in (0, 2, 4):
            for ring in (False, True):
                x, w, b = inputs(m, n, k, device, dtype, True, seed=pre)
                out = torch.full((m, n), float("nan"), device=device, dtype=dtype)
                triton_skinny._skinny_kernel[(triton.cdiv(n, 2),)](
                    x, w, b, out, n, k, x.stride(0), w.stride(0), out.stride(0),
                    HAS_BIAS=True, M=m, BLOCK_N=2, BLOCK_K=block_k, EVEN_K=k % block_k == 0, PRE=pre, RING=ring,
                    PDL=False, num_warps=4,
                )
                assert rel_err(out, reference(x, w, b)) < tol, (m, pre, ring)


def check_silu(i: int, k: int, rows, device: str, dtype: torch.dtype, tol: float, configs=(None,)) -> None:
    """The fused gate/up + SiLU·mul: the bits of skinny then the SiLU·mul kernel, and fp64."""
    for m in rows:
        for bias in (False, True):
            for cfg in configs:
                x, w, b = inputs(m, 2 * i, k, device, dtype, bias, seed=3)
                got = triton_skinny.skinny_silu_mul(x, w, b, config=cfg)
                assert got.shape == (m, i) and got.dtype == dtype
                unfused = triton_ops.silu_and_mul(triton_skinny.skinny(x, w, b, config=cfg))
                assert torch.equal(got, unfused), (i, k, m, bias, cfg)
                h = reference(x, w, b)
                ref = torch.nn.functional.silu(h[:, :i]) * h[:, i:]
                assert rel_err(got, ref) < tol, (i, k, m, bias, cfg)


def cos_sin_table(d: int, max_pos: int, device: str) -> torch.Tensor:
    half = d // 2
    inv = 1.0 / (10000 ** (torch.arange(half, dtype=torch.float64) / half))
    ang = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv[None, :]
    return torch.cat([ang.cos(), ang.sin()], dim=1).float().to(device)


def check_rope(rows, device: str, dtype: torch.dtype, tol: float, hq: int = 4, hkv: int = 2, d: int = 16,
               k: int = 96, configs=(None,)) -> None:
    """The qkv + RoPE + K/V store epilogue for M rows at their own positions and slots (some
    -1: padding rows of a CUDA-graph batch): the bits of skinny then `rope_qk_` with the same
    cache store, a fp64 rotation, and no cache entry written but the rows' own."""
    n = (hq + 2 * hkv) * d
    half = d // 2
    max_pos, block_size, blocks = 64, 4, 8
    cos_sin = cos_sin_table(d, max_pos, device)
    for m in rows:
        for bias in (False, True):
            for cfg in configs:
                x, w, b = inputs(m, n, k, device, dtype, bias, seed=5)
                pos = torch.tensor([37, 3, 38, 0, 63, 12, 39, 40][:m], device=device)
                slots = torch.tensor([21, -1, 22, 5, -1, 30, 23, 1][:m], device=device)
                g = torch.Generator().manual_seed(m)
                cache = torch.randn(2, blocks, block_size, hkv, d, generator=g).to(device=device, dtype=dtype)
                cache_ref = cache.clone()
                before = cache.clone()
                got = triton_skinny.skinny_rope_(x, w, b, pos, cos_sin, hq, hkv, d, cache, slots, config=cfg)
                assert got.shape == (m, n) and got.dtype == dtype
                ref = triton_skinny.skinny(x, w, b, config=cfg)
                triton_ops.rope_qk_(ref, pos, cos_sin, hq, hkv, d, kv_cache=cache_ref, slot_mapping=slots)
                assert torch.equal(got, ref), (m, bias, cfg)
                assert torch.equal(cache, cache_ref), (m, bias, cfg)
                # without a cache: the same projection, nothing else written
                plain = triton_skinny.skinny_rope_(x, w, b, pos, cos_sin, hq, hkv, d, config=cfg)
                assert torch.equal(plain, got)
                # fp64 rotation of the fp64 product, row by row at its own position
                y = reference(x, w, b).view(m, hq + 2 * hkv, d).cpu()
                ang = pos.cpu().double()[:, None] * (1.0 / (10000 ** (torch.arange(half, dtype=torch.float64) / half)))
                c, s = ang.cos()[:, None, :], ang.sin()[:, None, :]
                rot = y.clone()
                x1, x2 = y[:, : hq + hkv, :half], y[:, : hq + hkv, half:]
                rot[:, : hq + hkv, :half] = x1 * c - x2 * s
                rot[:, : hq + hkv, half:] = x2 * c + x1 * s
                assert rel_err(got.view(m, hq + 2 * hkv, d), rot) < tol, (m, bias, cfg)
                flat = cache.view(2, blocks * block_size, hkv, d).cpu()
                written = set()
                for r in range(m):
                    sl = int(slots[r])
                    if sl < 0:
                        continue
                    written.add(sl)
                    assert rel_err(flat[0, sl], rot[r, hq : hq + hkv]) < tol, (m, r)
                    assert rel_err(flat[1, sl], rot[r, hq + hkv :]) < tol, (m, r)
                untouched = [i for i in range(blocks * block_size) if i not in written]
                assert torch.equal(flat[:, untouched], before.view(2, -1, hkv, d).cpu()[:, untouched])


def check_errors(device: str) -> None:
    x, w, _ = inputs(9, 8, 16, device, torch.float32, False)
    for fn in (triton_skinny.skinny, triton_skinny.skinny_silu_mul):
        try:
            fn(x, w)
        except ValueError as e:
            assert "1 to 8 rows" in str(e)
        else:
            raise AssertionError("9 rows accepted")
    try:
        triton_skinny.skinny(x[:2], w[:, :8])
    except ValueError as e:
        assert "contiguous last dimension" in str(e)
    else:
        raise AssertionError("mismatched K accepted")


def check_routing(device: str, dtype: torch.dtype) -> None:
    """TritonGemvLinearMethod: 1 row -> the GEMV, 2..SKINNY_MAX_ROWS -> the skinny kernels (their
    bits; the fused qkv hook too), more rows -> F.linear and no fused qkv; SKINNY_MAX_ROWS = 1
    turns the skinny path off."""
    from kvserve.models.linear import Linear
    from kvserve.platform import cuda_linear

    saved = cuda_linear.SKINNY_MAX_ROWS
    try:
        cuda_linear.SKINNY_MAX_ROWS = 8
        with torch.device(device):
            proj = Linear(32, [2 * 8, 8, 8], False, cuda_linear.TritonGemvLinearMethod(), dtype=dtype)
        proj.weight.data.copy_(torch.randn(32, 32, generator=torch.Generator().manual_seed(1)).to(dtype) * 0.2)
        cos_sin = cos_sin_table(8, 16, device)
        for m in (1, 3, 9):
            x = torch.randn(m, 32, generator=torch.Generator().manual_seed(m)).to(device=device, dtype=dtype)
            args = (torch.arange(m, device=device), cos_sin, 2, 1, 8, None, None)
            fused = proj.method.apply_qkv_rope(proj, x, *args)
            if m == 1:
                assert torch.equal(proj(x), triton_ops.gemv(x, proj.weight))
                assert torch.equal(fused, triton_ops.gemv_rope_(x, proj.weight, None, *args))
            elif m <= 8:
                assert torch.equal(proj(x), triton_skinny.skinny(x, proj.weight))
                assert torch.equal(fused, triton_skinny.skinny_rope_(x, proj.weight, None, *args))
            else:
                assert torch.equal(proj(x), torch.nn.functional.linear(x, proj.weight))
                assert fused is None
        cuda_linear.SKINNY_MAX_ROWS = 1
        x = torch.randn(3, 32).to(device=device, dtype=dtype)
        assert torch.equal(proj(x), torch.nn.functional.linear(x, proj.weight))
        assert proj.method.apply_qkv_rope(proj, x, torch.arange(3, device=device), cos_sin, 2, 1, 8, None, None) is None
    finally:
        cuda_linear.SKINNY_MAX_ROWS = saved


def run_interpret() -> None:
    """Everything above on tiny CPU shapes (run with TRITON_INTERPRET=1; ~1 minute)."""
    small = [(10, 96), (7, 40)]  # N odd; K below and not a multiple of the tile
    check_products(small[:1], [1, 3, 8], "cpu", torch.float32, 1e-5, configs=(None, (2, 16, 4, True), (4, 32, 4, False)))
    check_products(small[1:], [2, 5], "cpu", torch.float32, 1e-5, configs=((2, 16, 4, True), (2, 32, 4)))
    check_products(small[1:], [5], "cpu", torch.float16, 2e-3)
    check_gemv_bits(10, 96, [3], "cpu", torch.float32)
    check_preloaded("cpu", torch.float32, 1e-5)
    check_silu(5, 48, [2, 8], "cpu", torch.float32, 1e-5, configs=(None, (4, 16, 4, True)))
    check_silu(5, 48, [3], "cpu", torch.float16, 2e-3)
    check_rope([1, 5], "cpu", torch.float32, 1e-5, configs=(None, (2, 16, 4, True)))
    check_rope([3], "cpu", torch.float16, 3e-3)
    check_errors("cpu")
    check_routing("cpu", torch.float16)
    print("interpret checks passed")


if __name__ == "__main__":
    run_interpret()
