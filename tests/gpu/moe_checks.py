"""Checks of the fused MoE kernels (`kvserve/kernels/triton_moe.py`) against the fp32 oracle,
shared by the GPU tests (`tests/gpu/test_fused_moe.py`) and a CPU run under TRITON_INTERPRET=1
on tiny shapes (`tests/kernels/test_triton_moe.py`)."""

from __future__ import annotations

import torch

from kvserve.kernels import triton_moe


def route(t: int, e: int, k: int, device: str, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    logits = torch.randn(t, e, generator=g)
    probs = torch.softmax(logits, -1)
    w, ids = torch.topk(probs, k, dim=-1)
    w = w / w.sum(-1, keepdim=True)
    return w.to(device, dtype), ids.to(device)


def weights(e: int, hidden: int, inter: int, device: str, dtype: torch.dtype, seed: int = 1):
    g = torch.Generator(device="cpu").manual_seed(seed)
    w13 = (torch.randn(e, 2 * inter, hidden, generator=g) / hidden**0.5).to(device, dtype)
    w2 = (torch.randn(e, hidden, inter, generator=g) / inter**0.5).to(device, dtype)
    return w13, w2


def check_align(t: int, e: int, k: int, block_m: int, device: str, use_kernel: bool) -> None:
    _, ids = route(t, e, k, device, torch.float32, seed=t)
    sorted_ids, block_expert, num_post = triton_moe.align_by_expert(ids, e, block_m, use_kernel)
    n = t * k
    flat = ids.reshape(-1).cpu()
    s, be, total = sorted_ids.cpu(), block_expert.cpu(), int(num_post)
    assert s.numel() == triton_moe.padded_size(n, e, block_m) and total % block_m == 0 and total <= s.numel()
    real = s[s < n]
    assert sorted(real.tolist()) == list(range(n)), "every pair exactly once"
    assert (s[total:] == n).all()
    assert (be[total // block_m :] == e - 1).all() or total == s.numel()
    for b in range(total // block_m):
        blk = s[b * block_m : (b + 1) * block_m]
        blk = blk[blk < n]
        assert blk.numel() > 0, f"block {b} is all padding"
        assert (flat[blk] == be[b]).all(), f"block {b} mixes experts"
        assert blk.tolist() == sorted(blk.tolist()), "stable order within an expert"


def check_fused(t: int, e: int, k: int, hidden: int, inter: int, device: str, dtype: torch.dtype, path: str,
                tol: float, config: dict | None = None) -> float:
    x = (torch.randn(t, hidden, generator=torch.Generator().manual_seed(t + 7))).to(device, dtype)
    w13, w2 = weights(e, hidden, inter, device, dtype)
    w, ids = route(t, e, k, device, dtype, seed=t + 3)
    out = triton_moe.fused_moe(x, w13, w2, w, ids, path=path, config=config)
    ref = triton_moe.reference_moe(x, w13, w2, w, ids)
    assert out.shape == (t, hidden) and out.dtype == dtype
    assert not torch.isnan(out).any()
    rel = ((out.float() - ref).norm() / ref.norm()).item()
    assert rel < tol, f"{path} t={t} e={e} k={k} {hidden}x{inter} {dtype}: rel err {rel:.2e} >= {tol}"
    return rel


def check_route(t: int, e: int, k: int, renorm: bool, device: str, dtype: torch.dtype, seed: int = 0) -> None:
    """The one-launch router (`triton_moe_decode.route`) against the torch chain it replaces
    (`Ops.route_experts`): the same experts in the same order (distinct logits), weights equal
    up to the model dtype's rounding."""
    from kvserve.kernels import triton_moe_decode
    from kvserve.models.ops import Ops

    g = torch.Generator(device="cpu").manual_seed(seed)
    # Distinct logits (a permutation, scaled): no ties, so the order of the experts is defined.
    logits = (torch.randperm(e, generator=g).float()[None, :].repeat(t, 1) + torch.arange(t)[:, None] * 3) % e
    logits = (logits / e * 6 - 3 + torch.rand(t, e, generator=g) * 1e-3).to(device, dtype)
    w, ids = triton_moe_decode.route(logits, k, renorm, dtype)
    w_ref, ids_ref = Ops().route_experts(logits, k, renorm, dtype)
    assert w.shape == (t, k) and w.dtype == dtype and ids.dtype == torch.long
    assert torch.equal(ids.cpu(), ids_ref.cpu()), f"route t={t} e={e} k={k}: {ids} vs {ids_ref}"
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # (tl.exp is ex2.approx on the GPU)
    torch.testing.assert_close(w.float(), w_ref.float(), rtol=tol, atol=tol)


def check_decode(t: int, e: int, k: int, hidden: int, inter: int, device: str, dtype: torch.dtype, tol: float,
                 configs=None) -> float:
    """The decode path's expert kernels (`path="decode"`) against the fp32 oracle and against the
    pairs path (the same math)."""
    rel = check_fused(t, e, k, hidden, inter, device, dtype, "decode", tol)
    if configs is not None:
        from kvserve.kernels import triton_moe_decode

        x = (torch.randn(t, hidden, generator=torch.Generator().manual_seed(t + 7))).to(device, dtype)
        w13, w2 = weights(e, hidden, inter, device, dtype)
        w, ids = route(t, e, k, device, dtype, seed=t + 3)
        out = triton_moe_decode.fused_moe_decode(x, w13, w2, w, ids, configs=configs)
        ref = triton_moe.reference_moe(x, w13, w2, w, ids)
        r = ((out.float() - ref).norm() / ref.norm()).item()
        assert r < tol, f"decode configs {configs}: rel err {r:.2e}"
    return rel


def check_norm_route(t: int, e: int, k: int, hidden: int, renorm: bool, device: str, dtype: torch.dtype,
                     seed: int = 0) -> None:
    """`triton_moe_decode.norm_route` (add-and-RMSNorm, router projection and routing in one launch)
    against the torch chain: the same experts in the same order, the same norm and residual, the
    weights up to rounding; the arrival counters are left at zero (a second call agrees)."""
    from kvserve.kernels import triton_moe_decode
    from kvserve.models.ops import Ops

    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(t, hidden, generator=g).to(device, dtype)
    res = torch.randn(t, hidden, generator=g).to(device, dtype)
    nw = (1 + 0.1 * torch.randn(hidden, generator=g)).to(device, dtype)
    router = (torch.randn(e, hidden, generator=g) / hidden**0.5).to(device, dtype)
    counts = torch.zeros(triton_moe_decode.NORM_ROUTE_MAX_ROWS, dtype=torch.int32, device=device)
    s = (x.float() + res.float()).to(dtype)
    sf = s.float()
    h_ref = (nw.float() * (sf * torch.rsqrt(sf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype).float()).to(dtype)
    w_ref, ids_ref = Ops().route_experts((h_ref.float() @ router.float().t()).to(dtype), k, renorm, dtype)
    for _ in range(2):
        h, s_out, w, ids = triton_moe_decode.norm_route(x, res, nw, 1e-6, router, k, renorm, counts)
        assert torch.equal(s_out, s), "residual sum"
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(h.float(), h_ref.float(), rtol=tol, atol=tol)
        assert torch.equal(ids.cpu(), ids_ref.cpu()), f"norm_route t={t} e={e} k={k}: {ids} vs {ids_ref}"
        torch.testing.assert_close(w.float(), w_ref.float(), rtol=tol, atol=tol)
        assert int(counts.abs().sum()) == 0, "arrival counters not reset"


def check_decode_next_norm(t: int, e: int, k: int, hidden: int, inter: int, device: str, dtype: torch.dtype,
                           tol: float, configs=None) -> None:
    """`fused_moe_decode(next_norm=...)` (the next add-and-RMSNorm in the down kernel's epilogue)
    against the same experts without it followed by the norm: the residual bit for bit, the norm
    within `tol`; the arrival counters are left at zero (a second call agrees)."""
    from kvserve.kernels import triton_moe_decode

    g = torch.Generator().manual_seed(t + 11)
    x = torch.randn(t, hidden, generator=g).to(device, dtype)
    res = torch.randn(t, hidden, generator=g).to(device, dtype)
    nw = (1 + 0.1 * torch.randn(hidden, generator=g)).to(device, dtype)
    w13, w2 = weights(e, hidden, inter, device, dtype)
    w, ids = route(t, e, k, device, dtype, seed=t + 3)
    out = triton_moe_decode.fused_moe_decode(x, w13, w2, w, ids, configs=configs)
    s_ref = (out.float() + res.float()).to(dtype)
    sf = s_ref.float()
    h_ref = (nw.float() * (sf * torch.rsqrt(sf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype).float()).to(dtype)
    counts = torch.zeros(triton_moe_decode.NORM_ROUTE_MAX_ROWS, dtype=torch.int32, device=device)
    for _ in range(2):
        h, s = triton_moe_decode.fused_moe_decode(x, w13, w2, w, ids, configs=configs,
                                                  next_norm=(res, nw, 1e-5, counts))
        assert torch.equal(s, s_ref), "residual sum"
        torch.testing.assert_close(h.float(), h_ref.float(), rtol=tol, atol=tol)
        assert int(counts.abs().sum()) == 0, "arrival counters not reset"


def run_interpret() -> None:
    """Tiny fp32 shapes on the CPU (TRITON_INTERPRET=1): both paths, ragged sizes."""
    for t, e, k, bm in ((5, 8, 2, 16), (3, 4, 3, 16), (40, 6, 2, 16), (70, 5, 3, 16)):
        for use_kernel in (False, True):
            check_align(t, e, k, bm, "cpu", use_kernel)
    cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=1)
    check_fused(3, 8, 2, 64, 48, "cpu", torch.float32, "pairs", 1e-5)
    check_fused(1, 4, 4, 40, 24, "cpu", torch.float32, "pairs", 1e-5)  # K not a block multiple
    check_fused(9, 8, 2, 64, 48, "cpu", torch.float32, "sorted", 1e-5, cfg)
    check_fused(20, 4, 2, 40, 24, "cpu", torch.float32, "sorted", 1e-5, cfg)
    # the default decode path (KVSERVE_MOE_DECODE=fused): router, then experts
    for t, e, k, renorm in ((1, 8, 2, True), (3, 5, 3, False), (2, 128, 8, True), (4, 6, 6, False)):
        check_route(t, e, k, renorm, "cpu", torch.float32, seed=t)
    for t, e, k, hidden, renorm in ((1, 128, 8, 64, True), (3, 6, 2, 40, False), (2, 5, 5, 32, True)):
        check_norm_route(t, e, k, hidden, renorm, "cpu", torch.float32, seed=t)
    check_decode(1, 8, 2, 64, 48, "cpu", torch.float32, 1e-5)
    check_decode(3, 6, 3, 40, 24, "cpu", torch.float32, 1e-5)  # ragged K, k not a power of 2
    check_decode(2, 8, 4, 60, 36, "cpu", torch.float32, 1e-5, configs=((8, 16, 4), (8, 16, 4, 2)))  # ragged N, K
    check_decode(1, 4, 1, 64, 32, "cpu", torch.float32, 1e-5, configs=((4, 64, 4), (2, 32, 4, 0)))  # no preload
    check_decode(2, 8, 4, 60, 36, "cpu", torch.float32, 1e-5, configs=(None, (4, 16, 8, 4)))  # one default side
    check_decode_next_norm(1, 8, 2, 64, 48, "cpu", torch.float32, 1e-5)
    check_decode_next_norm(3, 6, 3, 40, 24, "cpu", torch.float32, 1e-5, configs=((8, 16, 4), (8, 16, 4, 2)))
    print("interpret checks passed")


if __name__ == "__main__":
    run_interpret()
