"""The skinny (2..8-row) Triton products at Llama shapes on the GPU (the checks of
`tests/gpu/skinny_checks.py`, which also run on the CPU under TRITON_INTERPRET=1), against
F.linear, and their routing in the CUDA linear method, CUDA-graph capture included."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from kvserve.kernels import triton_skinny  # noqa: E402
from kvserve.models import triton_ops  # noqa: E402
from tests.gpu import skinny_checks as checks  # noqa: E402

TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}
# Llama-3.1-8B qkv, o_proj, down; Llama-3.2-1B qkv; a small head with ragged N and K; a tiny one.
SHAPES = [(6144, 4096), (4096, 4096), (4096, 14336), (3072, 2048), (1000, 576), (3, 100)]
ROWS = [2, 3, 5, 8]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_skinny_matches_fp64(dtype):
    checks.check_products(SHAPES, ROWS, "cuda", dtype, TOL[dtype])


@pytest.mark.parametrize("config", [(2, 1024, 4), (2, 512, 4, True), (4, 512, 8, True), (2, 256, 2), (2, 1024, 4, True)])
def test_skinny_configs(config):
    checks.check_products([(4096, 4096), (1000, 576)], [2, 5, 8], "cuda", torch.bfloat16, TOL[torch.bfloat16],
                          configs=(config,))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", ROWS)
def test_skinny_close_to_cublas(dtype, m):
    """Against F.linear (cuBLAS) at the 8B gate/up and the LM head shapes, elementwise."""
    for n, k in [(28672, 4096), (128256, 4096)]:
        x, w, b = checks.inputs(m, n, k, "cuda", dtype, False)
        got = triton_skinny.skinny(x, w, b)
        ref = F.linear(x, w, b)
        assert checks.rel_err(got, ref) < TOL[dtype]
        assert torch.allclose(got.float(), ref.float(), rtol=2e-2, atol=2e-2)


def test_skinny_rows_have_the_gemv_bits():
    """With the one-row GEMV's configuration every row equals that GEMV's output bit for bit
    (same tiles, same fp32 updates, same reduction)."""
    for n, k in [(4096, 4096), (6144, 4096), (1000, 576)]:
        checks.check_gemv_bits(n, k, [2, 4, 8], "cuda", torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_skinny_silu_mul(dtype):
    checks.check_silu(14336, 4096, ROWS, "cuda", dtype, TOL[dtype])
    checks.check_silu(1536, 576, [2, 7], "cuda", dtype, TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hq,hkv,d,k", [(32, 8, 128, 4096), (9, 3, 64, 576), (4, 1, 128, 1000)])
def test_skinny_rope(dtype, hq, hkv, d, k):
    checks.check_rope([1, 2, 5, 8], "cuda", dtype, 2 * TOL[dtype], hq=hq, hkv=hkv, d=d, k=k)


def test_skinny_errors():
    checks.check_errors("cuda")


def _method_linear(in_f, out_sizes, bias):
    from tests.gpu.test_fused_ops import _triton_linear

    return _triton_linear(in_f, out_sizes, bias)


def test_method_routes_rows(monkeypatch):
    """1 row: the GEMV; 2..SKINNY_MAX_ROWS rows: the skinny kernels (their bits); more: cuBLAS
    (and no fused qkv + RoPE). SKINNY_MAX_ROWS = 1 turns the skinny path off."""
    from kvserve.models import fused_ops
    from kvserve.platform import cuda_linear

    monkeypatch.setattr(cuda_linear, "SKINNY_MAX_ROWS", 8)
    proj = _method_linear(256, 768, True)
    gate_up = _method_linear(256, [384, 384], False)
    qkv = _method_linear(256, [4 * 32, 2 * 32, 2 * 32], False)
    cos_sin = fused_ops.build_cos_sin(1.0 / (10000 ** (torch.arange(0, 32, 2, device="cuda").float() / 32)), 64)
    for m in (1, 2, 5, 8, 9):
        x = torch.randn(m, 256, device="cuda", dtype=torch.bfloat16)
        pos = torch.arange(3, 3 + m, device="cuda")
        args = (pos, cos_sin, 4, 2, 32, None, None)
        if m == 1:
            assert torch.equal(proj(x), triton_ops.gemv(x, proj.weight, proj.bias))
        elif m <= 8:
            assert torch.equal(proj(x), triton_skinny.skinny(x, proj.weight, proj.bias))
            assert torch.equal(gate_up.silu_and_mul(x), triton_skinny.skinny_silu_mul(x, gate_up.weight))
            assert torch.equal(qkv.method.apply_qkv_rope(qkv, x, *args),
                               triton_skinny.skinny_rope_(x, qkv.weight, None, *args))
        else:
            assert torch.equal(proj(x), F.linear(x, proj.weight, proj.bias))
            assert qkv.method.apply_qkv_rope(qkv, x, *args) is None
    monkeypatch.setattr(cuda_linear, "SKINNY_MAX_ROWS", 1)
    x = torch.randn(5, 256, device="cuda", dtype=torch.bfloat16)
    assert torch.equal(proj(x), F.linear(x, proj.weight, proj.bias))
    assert qkv.method.apply_qkv_rope(qkv, x, (torch.arange(5, device="cuda")), cos_sin, 4, 2, 32, None, None) is None


def test_skinny_in_cuda_graph():
    """Captured once, replayed on new inputs (positions, slots, activations copied in place):
    the replay equals an eager call; nothing syncs with the host during capture."""
    hq, hkv, d, k, m = 8, 2, 64, 512, 5
    n = (hq + 2 * hkv) * d
    x, w, b = checks.inputs(m, n, k, "cuda", torch.bfloat16, True)
    x = x.contiguous()
    cos_sin = checks.cos_sin_table(d, 128, "cuda")
    pos = torch.arange(10, 10 + m, device="cuda")
    slots = torch.tensor([4, 5, 6, -1, 7], device="cuda")
    cache = torch.zeros(2, 4, 16, hkv, d, device="cuda", dtype=torch.bfloat16)
    gu = (torch.randn(2 * 512, k, device="cuda") / k**0.5).to(torch.bfloat16)
    outs = {}

    def step():
        outs["qkv"] = triton_skinny.skinny_rope_(x, w, b, pos, cos_sin, hq, hkv, d, cache, slots)
        outs["mlp"] = triton_skinny.skinny_silu_mul(x, gu)
        outs["o"] = triton_skinny.skinny(x, w[:k], None)

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    x.copy_(torch.randn_like(x))
    pos.copy_(torch.arange(50, 50 + m, device="cuda"))
    slots.copy_(torch.tensor([-1, 40, 41, 42, 43], device="cuda"))
    cache.zero_()
    graph.replay()
    torch.cuda.synchronize()
    got = {key: v.clone() for key, v in outs.items()}
    got_cache = cache.clone()
    cache.zero_()
    step()
    for key in got:
        assert torch.equal(got[key], outs[key]), key
    assert torch.equal(got_cache, cache)
    assert cache.view(2, -1, hkv, d)[0, 40].abs().sum() > 0


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="PDL needs compute capability 9.0")
def test_pdl_chain_of_skinny_kernels_equals_ordinary_launches(monkeypatch):
    """Each kernel reads the previous one's output (the PDL wait must come before it); a CUDA
    graph of PDL launches equals ordinary launches, bit for bit, K/V cache included."""
    from kvserve.models import pdl

    assert pdl.enabled(torch.device("cuda"))
    m, hidden, inter, hq, hkv, d = 5, 4096, 2816, 8, 2, 64
    g = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape, scale=1.0):
        return (scale * torch.randn(shape, generator=g, device="cuda")).to(torch.bfloat16)

    qkv_w, o_w = rand((hq + 2 * hkv) * d, hidden, scale=0.02), rand(hidden, hq * d, scale=0.05)
    gu_w, down_w = rand(2 * inter, hidden, scale=0.02), rand(hidden, inter, scale=0.02)
    cos_sin = checks.cos_sin_table(d, 64, "cuda")
    cache = rand(2, 4, 16, hkv, d)
    x = rand(m, hidden)
    pos = torch.arange(10, 10 + m, device="cuda")
    slots = torch.tensor([10, 11, -1, 13, 14], device="cuda")

    def run():
        qkv = triton_skinny.skinny_rope_(x, qkv_w, None, pos, cos_sin, hq, hkv, d, cache, slots)
        h = triton_skinny.skinny(qkv[:, : hq * d], o_w)
        act = triton_skinny.skinny_silu_mul(h, gu_w)
        return triton_skinny.skinny(act, down_w)

    run()
    torch.cuda.synchronize()
    start = cache.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    cache.copy_(start)
    graph.replay()
    torch.cuda.synchronize()
    got, got_cache = out.clone(), cache.clone()
    monkeypatch.setattr(pdl, "_requested", lambda: False)
    assert not pdl.enabled(torch.device("cuda"))
    cache.copy_(start)
    assert torch.equal(run(), got)
    assert torch.equal(cache, got_cache)
