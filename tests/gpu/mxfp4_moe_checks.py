"""The Triton MXFP4 MoE kernels (`kvserve/kernels/triton_mxfp4_moe.py`) against gpt-oss's
expert loop on the dequantized weights: several token counts (one pair per expert up to many),
an inner width that is not a multiple of the K-chunk, unselected experts; the default kernels
on the aligned layout (`pack`: bit-exact both ways, every code and scale byte), their GEMV and
grouped paths, the packed-half-math GEMVs (DECODE 2 / 3); the legacy kernel on the 17-byte blocks. Shared by the GPU test
(`tests/gpu/test_gpt_oss_gpu.py`) and the CPU test that runs it under TRITON_INTERPRET=1
(`tests/models/test_gpt_oss.py`; `python -m tests.gpu.mxfp4_moe_checks`)."""

from __future__ import annotations

import torch

from kvserve.kernels import mxfp4
from kvserve.kernels import triton_mxfp4_moe as tm
from kvserve.kernels.triton_mxfp4_moe import moe_mxfp4

ALPHA = 1.702


def reference(x, ids, weights, wgu, bgu, wdn, bdn, act):
    """The expert loop in float64 on the CPU, each selected expert dequantized once."""
    k_in, inter = x.shape[1], wdn.shape[2] // 17 * 32
    dense: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    out = torch.zeros(x.shape[0], wdn.shape[1], dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if e not in dense:
                dense[e] = (mxfp4.dequantize(wgu[e].cpu(), k_in).double(), mxfp4.dequantize(wdn[e].cpu(), inter).double())
            gu = x[t].double() @ dense[e][0].t() + bgu[e].double().cpu()
            h = act(gu[None])[0]
            y = h @ dense[e][1].t() + bdn[e].double().cpu()
            out[t] += float(weights[t, j]) * y
    return out


def check(t: int, device: str, dtype=torch.float32, hidden=96, inter=64, experts=6, k=2, seed=0) -> float:
    g = torch.Generator().manual_seed(seed)
    wgu = torch.stack([mxfp4.quantize(torch.randn(2 * inter, hidden, generator=g) * 0.1) for _ in range(experts)])
    wdn = torch.stack([mxfp4.quantize(torch.randn(hidden, inter, generator=g) * 0.1) for _ in range(experts)])
    bgu, bdn = torch.randn(experts, 2 * inter, generator=g) * 0.1, torch.randn(experts, hidden, generator=g) * 0.1
    x = torch.randn(t, hidden, generator=g)
    ids = torch.stack([torch.randperm(experts - 1, generator=g)[:k] for _ in range(t)])  # expert 5 never chosen
    weights = torch.softmax(torch.randn(t, k, generator=g), dim=-1)

    def act(gu):
        gate, up = gu[:, :inter].clamp(max=0.6), gu[:, inter:].clamp(-0.6, 0.6)
        return (up + 1) * gate * torch.sigmoid(gate * 1.702)

    ref = reference(x, ids, weights, wgu, bgu, wdn, bdn, act)
    dev = lambda a: a.to(device)  # noqa: E731
    got = moe_mxfp4(dev(x).to(dtype), dev(ids), dev(weights), dev(wgu), dev(bgu).to(dtype), dev(wdn),
                    dev(bdn).to(dtype), act)
    rel = ((got.double().cpu() - ref).norm() / ref.norm()).item()
    assert rel < (1e-5 if dtype == torch.float32 else 2e-2), f"T={t} {dtype}: relative error {rel:.3e}"
    return rel


def reference_dense(x, ids, weights, wgu, bgu, wdn, bdn, act):
    """The expert loop in float32 on x's device (for large shapes)."""
    k_in, inter = x.shape[1], wdn.shape[2] // 17 * 32
    out = torch.zeros(x.shape[0], wdn.shape[1], dtype=torch.float32, device=x.device)
    for e in torch.unique(ids).tolist():
        rows, slot = (ids == e).nonzero(as_tuple=True)
        gu = x[rows].float() @ mxfp4.dequantize(wgu[e], k_in).t() + bgu[e].float()
        y = act(gu) @ mxfp4.dequantize(wdn[e], inter).t() + bdn[e].float()
        out.index_add_(0, rows, y * weights[rows, slot, None].float())
    return out


def gpt_oss_act(inter: int, limit: float):
    def act(gu):
        gate, up = gu[:, :inter].clamp(max=limit), gu[:, inter:].clamp(-limit, limit)
        return (up + 1) * gate * torch.sigmoid(gate * ALPHA)

    return act


def check_pack(device: str, rows: int = 5, cols: int = 96, seed: int = 0) -> None:
    """Random bytes (every code, scale bytes 0..254) survive pack -> unpack, and the packed
    dequantization equals the GGML one."""
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 256, (3, rows, cols // 32 * 17), generator=g, dtype=torch.uint8)
    data.view(3, rows, cols // 32, 17)[..., 0] = torch.randint(0, 255, (3, rows, cols // 32), generator=g, dtype=torch.uint8)
    codes, scales = tm.pack(data.to(device), cols)
    assert codes.dtype == torch.int32 and tuple(codes.shape) == (3, rows, cols // 8)
    assert scales.dtype == torch.uint8 and tuple(scales.shape) == (3, rows, cols // 32)
    assert codes.numel() * 4 + scales.numel() == data.numel()  # 4.25 bits a weight, as before
    assert torch.equal(tm.unpack(codes, scales).cpu(), data)
    want = torch.stack([mxfp4.dequantize(d, cols) for d in data])
    got = tm.dequantize_packed(codes, scales).cpu()
    assert torch.equal(torch.nan_to_num(got), torch.nan_to_num(want))


def _packed_case(t: int, device: str, dtype, hidden, inter, experts, k, seed, raw_codes, limit):
    """Random packed experts and routing, with the float64 (or, at large widths, fp32) reference."""
    g = torch.Generator().manual_seed(seed)

    def weights(rows, cols):
        if not raw_codes:
            return mxfp4.quantize(torch.randn(rows, cols, generator=g) * 0.1)
        d = torch.randint(0, 256, (rows, cols // 32 * 17), generator=g, dtype=torch.uint8)
        d.view(rows, cols // 32, 17)[..., 0] = torch.randint(118, 125, (rows, cols // 32), generator=g, dtype=torch.uint8)
        return d

    wgu = torch.stack([weights(2 * inter, hidden) for _ in range(experts)])
    wdn = torch.stack([weights(hidden, inter) for _ in range(experts)])
    bgu, bdn = torch.randn(experts, 2 * inter, generator=g) * 0.1, torch.randn(experts, hidden, generator=g) * 0.1
    x = torch.randn(t, hidden, generator=g)
    ids = torch.stack([torch.randperm(experts - 1, generator=g)[:k] for _ in range(t)])  # the last never chosen
    wts = torch.softmax(torch.randn(t, k, generator=g), dim=-1)
    act = gpt_oss_act(inter, limit)
    dev = lambda a: a.to(device)  # noqa: E731
    if hidden * inter <= 1 << 16:
        ref = reference(x, ids, wts, wgu, bgu, wdn, bdn, act)
    else:  # gpt-oss-20b widths: fp32 on the device, each selected expert dequantized once
        ref = reference_dense(dev(x), dev(ids), dev(wts), dev(wgu), dev(bgu), dev(wdn), dev(bdn), act).double().cpu()
    packed = tm.pack_experts(dev(wgu), dev(bgu).to(dtype), dev(wdn), dev(bdn).to(dtype), hidden, inter)
    return dev(x).to(dtype), dev(ids), dev(wts).to(dtype), packed, ref


# fp32 tolerance of the packed-half-math GEMVs (DECODE 2 / 3): the activations rounded to fp16 under
# a block scale (2^-12 relative), the products exact, fp16 sums of 8 products
F16_TOL = 4e-3


def check_packed(t: int, device: str, dtype=torch.float32, path: str = "auto", hidden=96, inter=64, experts=6, k=2,
                 seed=0, raw_codes=False, limit=0.6, gemv_cfg=None, tol=None) -> float:
    """`fused_moe_mxfp4` on packed experts against the float64 expert loop. `raw_codes`: random
    bytes (all 16 codes, ±0 and the subnormal ±0.5 among them) under random scales 2^-9..2^-3."""
    x, ids, wts, packed, ref = _packed_case(t, device, dtype, hidden, inter, experts, k, seed, raw_codes, limit)
    got = tm.fused_moe_mxfp4(x, ids, wts, packed, ALPHA, limit, path=path, gemv_cfg=gemv_cfg)
    assert got.dtype == dtype and tuple(got.shape) == (t, hidden)
    rel = ((got.double().cpu() - ref).norm() / ref.norm()).item()
    tol = tol or (1e-5 if dtype == torch.float32 else 2e-2)
    assert rel < tol, f"packed {path} {gemv_cfg} T={t} {dtype}: relative error {rel:.3e}"
    return rel


def check_f16(t: int, device: str, cfgs, dtype=torch.float32, hidden=320, inter=96, experts=8, k=2, seed=0,
              limit=7.0, swap=True) -> None:
    """The packed-half-math GEMVs (DECODE 2 / 3, `GEMV_F16_CANDIDATES`-like (gate/up, down) configs)
    against the float64 reference (raw codes: every code and the subnormal ±0.5) within `F16_TOL`
    in fp32, and (`swap`) a config with its DECODE 2 swapped for 3 (the prefetch) or back to the
    same bits; the activations' fp16 pairs (`act_f16`) against their definition."""
    x, ids, wts, packed, ref = _packed_case(t, device, dtype, hidden, inter, experts, k, seed, True, limit)
    tol = F16_TOL if dtype == torch.float32 else 2e-2
    xh, xs = tm.act_f16(x)
    pairs = xh.cpu().view(torch.int16).view(torch.float16).float().view(t, hidden // 32, 16, 2)
    back = torch.cat([pairs[..., 0], pairs[..., 1]], -1) * xs.cpu()[..., None]  # [T, G, 32] values 0..31
    m = x.float().cpu().view(t, hidden // 32, 32).abs().amax(-1)
    assert ((back - x.float().cpu().view(t, hidden // 32, 32)).abs() <= m[..., None] * 2.0 ** -11).all()
    assert ((pairs.abs().amax((-1, -2)) < 2.0 ** 15) & ((pairs.abs().amax((-1, -2)) >= 2.0 ** 14) | (m == 0))).all()
    for gu, dn in cfgs:
        got = tm.fused_moe_mxfp4(x, ids, wts, packed, ALPHA, limit, path="gemv", gemv_cfg=(gu, dn))
        assert got.dtype == dtype and tuple(got.shape) == (t, hidden)
        rel = ((got.double().cpu() - ref).norm() / ref.norm()).item()
        assert rel < tol, f"fp16 GEMV {(gu, dn)} T={t} {dtype}: relative error {rel:.3e}"
        if swap:
            flip = lambda c: tuple(c[:3]) + ({2: 3, 3: 2}.get(c[3], c[3]),) + tuple(c[4:])  # noqa: E731
            other = tm.fused_moe_mxfp4(x, ids, wts, packed, ALPHA, limit, path="gemv", gemv_cfg=(flip(gu), flip(dn)))
            assert torch.equal(other, got), f"fp16 GEMV {(gu, dn)}: the prefetch changed the bits"


def check_split_down(t: int, device: str, gu_cfg, dn_cfg, splits, dtype=torch.float32, hidden=96, inter=64,
                     experts=6, k=2, seed=0, raw_codes=True, limit=7.0) -> None:
    """The split down GEMV (SPLIT s >= 1: per (pair, K split) partials, then the fixed-order
    reduce) against the reference and against the sequential kernel (SPLIT 0) on the same tile:
    equal up to the fp32 summation order, bit-equal for s = 1 under the interpreter (the same
    operations in the same order), and on the GPU the same bits on a second run (no atomics)."""
    x, ids, wts, packed, ref = _packed_case(t, device, dtype, hidden, inter, experts, k, seed, raw_codes, limit)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    base = tm.fused_moe_mxfp4(x, ids, wts, packed, ALPHA, limit, path="gemv", gemv_cfg=(gu_cfg, tuple(dn_cfg) + (0,)))
    for s in splits:
        cfg = (gu_cfg, tuple(dn_cfg) + (s,))
        got = tm.fused_moe_mxfp4(x, ids, wts, packed, ALPHA, limit, path="gemv", gemv_cfg=cfg)
        assert got.dtype == dtype and tuple(got.shape) == (t, hidden)
        rel = ((got.double().cpu() - ref).norm() / ref.norm()).item()
        assert rel < tol, f"split down {cfg} T={t} {dtype}: relative error {rel:.3e}"
        diff = ((got.double() - base.double()).norm() / base.double().norm()).item()
        assert diff < (1e-6 if dtype == torch.float32 else 1e-2), f"split down {cfg}: {diff:.3e} from the sequential kernel"
        if s == 1 and device == "cpu":
            assert torch.equal(got, base), f"split down {cfg}: not the sequential kernel's bits"
        if device != "cpu":  # (the interpreter runs programs one after another anyway)
            assert torch.equal(tm.fused_moe_mxfp4(x, ids, wts, packed, ALPHA, limit, path="gemv", gemv_cfg=cfg), got)


def check_model_layer() -> None:
    """A tiny MXFP4 gpt-oss's MoE layer: the CUDA path's pieces (experts stacked as views, the
    kernel, the clamped SwiGLU) against the CPU expert loop of the same layer."""
    import tempfile
    from pathlib import Path

    from kvserve import LLM
    from tests.conftest import _save_tokenizer
    from tests.models.test_gpt_oss import _hf_model, _write_mxfp4_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        _write_mxfp4_checkpoint(_hf_model(inter=64), Path(tmp))
        _save_tokenizer(Path(tmp))
        model = LLM(tmp, dtype="float32", device="cpu", num_kv_blocks=16).engine.runner.model
    for layer in model.layers:
        moe = layer.mlp
        x = torch.randn(9, moe.router.in_features, generator=torch.Generator().manual_seed(3))
        want = moe(x)  # the loop (CPU)
        top, ids = torch.topk(moe.router(x), moe.top_k, dim=-1)
        assert moe.all_mxfp4() and model.supports_cuda_graphs
        got = moe_mxfp4(x, ids, torch.softmax(top, dim=-1), *moe._stack(), moe.experts[0].act)
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), (got - want).abs().max()
        assert torch.equal(moe(x), want)  # the per-expert layers read views of the stacked blocks
        ex = moe.experts
        packed = tm.pack_experts([e.gate_up_proj.parts[0].data for e in ex], torch.stack([e.gate_up_proj.bias for e in ex]),
                                 [e.down_proj.parts[0].data for e in ex], torch.stack([e.down_proj.bias for e in ex]),
                                 moe.router.in_features, ex[0].inter)
        for path in ("gemv", "grouped"):
            got = tm.fused_moe_mxfp4(x, ids, torch.softmax(top, dim=-1), packed, moe.alpha, moe.limit, path=path)
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), (path, (got - want).abs().max())


def run(device: str) -> None:
    check_pack(device)
    if device == "cpu":
        check_model_layer()
    # the default kernels: GEMV (1 token; 3 tokens x 2 of 12 experts) and grouped paths, one
    # K-step with masked blocks (96, 64) and several (320 = 10 blocks: 8 + 2 masked)
    for t, path in ((1, "auto"), (3, "gemv"), (3, "grouped"), (40, "auto")):
        check_packed(t, device, path=path, seed=t, experts=12 if t == 3 else 6)
    for decode in (0, 1):  # both nibble decodes of the GEMV kernels, two tile shapes
        cfg = ((32, 8, 4, decode), (16, 4, 2, decode)) if decode else ((16, 8, 4, decode), (8, 8, 2, decode))
        check_packed(2, device, path="gemv", hidden=320, inter=96, raw_codes=True, seed=5, limit=7.0, gemv_cfg=cfg)
    check_packed(9, device, path="grouped", hidden=320, inter=96, raw_codes=True, seed=6, limit=7.0)
    # the packed-half-math GEMVs (DECODE 2 / 3): gate/up alone, both (the gate/up kernel then writes
    # the activation as fp16 pairs), the split down; K ragged against the K-step (10 / 3 blocks)
    check_f16(2, device, (((32, 8, 4, 2), (16, 4, 2, 1)), ((32, 4, 2, 3), (16, 4, 2, 2))), seed=14)
    check_f16(1, device, (((64, 4, 4, 3), (32, 2, 2, 3, 2)),), experts=6, k=4, seed=15)
    # the split down GEMV: H ragged against BLOCK_N (96 = 64 + 32 masked, 320 = 3 x 128 - 64), K
    # ragged against the K-step and the splits (3 or 5 blocks: the last split's blocks partly or
    # wholly masked, 4 splits of 3 blocks leave one empty), both decodes, one token and several
    check_split_down(1, device, (16, 4, 2, 1), (64, 2, 2, 1), (1, 2, 4), inter=96, experts=8, k=4, seed=7)
    check_split_down(3, device, (16, 8, 4, 0), (128, 2, 4, 0), (3,), hidden=320, inter=160, experts=12, seed=8)
    check_split_down(2, device, (32, 8, 4, 1), (32, 1, 2, 1), (2, 4), hidden=96, inter=96, seed=9)
    check_packed(4, device, torch.float16, path="gemv", seed=2, gemv_cfg=((32, 8, 4, 1), (32, 4, 4, 1, 2)))
    for path in ("gemv", "grouped"):  # (bf16 only on the GPU: the interpreter mishandles its dot)
        check_packed(4, device, torch.float16, path=path, seed=2)
    # the legacy kernel (KVSERVE_MXFP4_MOE=legacy)
    for t in (1, 3, 40):
        check(t, device, seed=t)
    check(5, device, torch.float16, seed=2)
    if device == "cuda":
        for t in (1, 64):
            check(t, device, torch.bfloat16, hidden=2880, inter=2880, experts=8, k=4, seed=t)
        for t, path in ((1, "auto"), (4, "gemv"), (4, "grouped"), (16, "auto"), (256, "auto")):
            check_packed(t, device, torch.bfloat16, path=path, hidden=2880, inter=2880, experts=32, k=4, seed=t,
                         raw_codes=True, limit=7.0)
        for decode in (0, 1):
            check_packed(3, device, torch.float32, path="gemv", hidden=2880, inter=2880, experts=8, k=4, raw_codes=True,
                         limit=7.0, gemv_cfg=((32, 8, 4, decode), (16, 8, 4, decode)))
        # the packed-half-math GEMVs at gpt-oss-20b widths: every benchmark candidate, fp32 and bf16
        check_f16(1, device, tm.GEMV_F16_CANDIDATES, hidden=2880, inter=2880, experts=32, k=4, seed=16, swap=False)
        check_f16(4, device, tm.GEMV_F16_CANDIDATES[3:5], torch.bfloat16, hidden=2880, inter=2880, experts=32, k=4,
                  seed=17)
        # the split down GEMV at gpt-oss-20b widths (the benchmark sweep's configs among them)
        check_split_down(1, device, (32, 8, 4, 1), (32, 16, 4, 1), (1, 2, 3), hidden=2880, inter=2880, experts=32, k=4,
                         seed=11)
        check_split_down(3, device, (32, 8, 4, 1), (32, 8, 4, 1), (1, 4), hidden=2880, inter=2880, experts=32, k=4,
                         seed=12)
        check_split_down(1, device, (32, 8, 4, 1), (16, 16, 4, 1), (1, 2), torch.bfloat16, hidden=2880, inter=2880,
                         experts=32, k=4, seed=13)


if __name__ == "__main__":
    run("cuda" if torch.cuda.is_available() else "cpu")
    print("mxfp4 moe checks passed")
