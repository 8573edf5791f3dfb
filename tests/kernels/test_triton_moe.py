"""The fused MoE Triton kernels on the CPU under TRITON_INTERPRET=1 (tiny fp32 shapes, both the
decode pairs path and the expert-sorted grouped GEMM, ragged sizes; the default decode path's
router and expert kernels, `triton_moe_decode`) against the fp32 oracle and the torch routing, and
the expert sort's invariants. The GPU runs the same checks at real shapes
(`tests/gpu/test_fused_moe.py`). A few seconds."""

from __future__ import annotations

from tests.interpreted import run_interpreted, run_sass_check


def test_fused_moe_kernels_interpreted():
    run_interpreted("moe_checks", timeout=120, skip_unsupported=True)


def test_cpu_ops_have_no_fused_moe():
    """Off CUDA the model keeps its expert loop: the native ops return None."""
    import torch

    from kvserve.models.ops import Ops

    x = torch.zeros(2, 8)
    assert Ops().fused_moe(torch.nn.Module(), x, x[:, :2], torch.zeros(2, 2, dtype=torch.long)) is None


def test_moe_decode_mode_env(monkeypatch):
    """KVSERVE_MOE_DECODE: "fused" unless set; "torch" (or its old name "default") selects the
    torch routing and the pairs kernels; anything else is an error that names the variable."""
    import pytest

    from kvserve.platform.cuda_moe import moe_decode_mode

    monkeypatch.delenv("KVSERVE_MOE_DECODE", raising=False)
    assert moe_decode_mode() == "fused"
    for mode in ("fused", "fused-router"):
        monkeypatch.setenv("KVSERVE_MOE_DECODE", mode)
        assert moe_decode_mode() == mode
    for old in ("torch", "default"):
        monkeypatch.setenv("KVSERVE_MOE_DECODE", old)
        assert moe_decode_mode() == "torch"
    for bad in ("Fused", "", "pairs"):
        monkeypatch.setenv("KVSERVE_MOE_DECODE", bad)
        with pytest.raises(ValueError, match="KVSERVE_MOE_DECODE"):
            moe_decode_mode()


def test_cuda_ops_moe_decode_default_and_torch(monkeypatch):
    """The CUDA ops take the fused decode path unless KVSERVE_MOE_DECODE says torch; with torch
    they route with the base ops' torch chain."""
    import torch

    from kvserve.models.ops import Ops
    from kvserve.platform.cuda_ops import CudaTritonOps

    monkeypatch.delenv("KVSERVE_MOE_DECODE", raising=False)
    assert CudaTritonOps().moe_decode == "fused"
    monkeypatch.setenv("KVSERVE_MOE_DECODE", "default")
    ops = CudaTritonOps()
    assert ops.moe_decode == "torch"
    logits = torch.randn(3, 6, generator=torch.Generator().manual_seed(2))
    for a, b in zip(ops.route_experts(logits, 2, True, torch.float32), Ops().route_experts(logits, 2, True, torch.float32)):
        assert torch.equal(a, b)


def test_route_experts_is_hf_routing():
    """`Ops.route_experts` (what every platform's routing defaults to): softmax in fp32, top-k,
    renormalized only when asked, cast to the model dtype."""
    import torch

    from kvserve.models.ops import Ops

    logits = torch.randn(5, 7, generator=torch.Generator().manual_seed(0)).bfloat16()
    for renorm in (True, False):
        w, ids = Ops().route_experts(logits, 3, renorm, torch.bfloat16)
        p = torch.softmax(logits.float(), -1)
        top, idx = p.topk(3, -1)
        if renorm:
            top = top / top.sum(-1, keepdim=True)
        assert torch.equal(ids, idx) and torch.equal(w, top.bfloat16())


def test_fused_moe_rejects_unknown_path():
    import pytest
    import torch

    pytest.importorskip("triton")
    from kvserve.kernels import triton_moe

    x = torch.zeros(1, 8)
    with pytest.raises(ValueError, match="path"):
        triton_moe.fused_moe(x, torch.zeros(2, 8, 8), torch.zeros(2, 8, 4), x[:, :1], torch.zeros(1, 1, dtype=torch.long),
                             path="fast")


def test_moe_decode_kernels_compile_for_sm90():
    """The default decode path's kernels compiled for sm_90 without a GPU (`tests/gpu/moe_sass.py`)
    at Qwen3-30B-A3B and gpt-oss-20b shapes: 16-byte weight loads (as many as the weights a thread
    streams need), no spills, the K loops unrolled."""
    run_sass_check("moe_sass", "moe sass checks passed")


def test_cuda_ops_route_off_cuda_is_the_torch_chain(monkeypatch):
    """The CUDA ops with KVSERVE_MOE_DECODE=fused still route CPU tensors with torch ops (the
    Triton router only takes CUDA logits), and without stacked experts there is no fused MoE."""
    import torch

    from kvserve.models.ops import Ops
    from kvserve.platform.cuda_ops import CudaTritonOps

    monkeypatch.setenv("KVSERVE_MOE_DECODE", "fused")
    ops = CudaTritonOps()
    assert ops.moe_decode == "fused"
    logits = torch.randn(3, 6, generator=torch.Generator().manual_seed(1))
    for a, b in zip(ops.route_experts(logits, 2, True, torch.float32), Ops().route_experts(logits, 2, True, torch.float32)):
        assert torch.equal(a, b)
    w, ids = ops.route_experts(logits, 2, False, torch.float32)
    assert ops.fused_moe(torch.nn.Module(), torch.zeros(3, 8), w, ids) is None


def test_moe_norm_route_off_by_default_and_off_cuda(monkeypatch):
    """`Ops.moe_norm_route` is None on the CPU ops, on the CUDA ops unless
    KVSERVE_MOE_DECODE=fused-router, and for CPU tensors in that mode: the layer then runs the
    norm and the routing as before."""
    import torch

    from kvserve.models.layers import RMSNorm
    from kvserve.models.ops import Ops
    from kvserve.platform.cuda_ops import CudaTritonOps

    moe = torch.nn.Module()
    moe.gate = torch.nn.Linear(8, 4, bias=False)
    moe.top_k, moe.renorm = 2, True
    x = torch.randn(1, 8)
    norm = RMSNorm(8, 1e-6)
    assert Ops().moe_norm_route(moe, x, x, norm) is None
    monkeypatch.delenv("KVSERVE_MOE_DECODE", raising=False)
    assert CudaTritonOps().moe_norm_route(moe, x, x, norm) is None
    monkeypatch.setenv("KVSERVE_MOE_DECODE", "fused-router")
    ops = CudaTritonOps()
    assert ops.moe_decode == "fused-router"
    assert ops.moe_norm_route(moe, x, x, norm) is None  # CPU tensors


def test_moe_layer_with_fused_norm_route_equals_unfused():
    """A Qwen3-MoE decoder layer whose ops do the post-attention norm, router and routing in one
    op (`SparseMoE.forward_with_norm`) gives the unfused layer's output and residual: here the op
    is the torch chain itself, so the layer's plumbing (which tensors go where) is what is tested."""
    import torch

    from kvserve.models import moe as moe_mod
    from kvserve.models.ops import Ops

    class NormRouteOps(Ops):
        calls = 0

        def moe_norm_route(self, moe, x, residual, norm):
            NormRouteOps.calls += 1
            h, res = norm.forward_with_residual(x, residual)
            w, ids = self.route_experts(moe.gate(h), moe.top_k, moe.renorm, h.dtype)
            return h, res, w, ids

    torch.manual_seed(0)
    hidden, inter, e, k = 16, 8, 6, 2

    class B:  # the few LayerBuilder members SparseMoE uses
        ops = NormRouteOps()

        def linear(self, i, o, bias=False):
            from kvserve.models.linear import DenseLinearMethod, Linear

            m = DenseLinearMethod()
            m.ops = self.ops
            out = Linear(i, o, bias, m)
            with torch.no_grad():
                out.weight.normal_(0, i ** -0.5)
            return out

        dense_linear = linear

    cfg = type("Cfg", (), {"hidden_act": "silu", "hidden_size": hidden})()
    layer_moe = moe_mod.SparseMoE(cfg, B(), e, k, inter, True)
    from kvserve.models.layers import RMSNorm

    norm = RMSNorm(hidden, 1e-6)
    with torch.no_grad():
        norm.weight.normal_(1, 0.1)
    x, residual = torch.randn(3, hidden), torch.randn(3, hidden)
    out, res, normed = layer_moe.forward_with_norm(x, residual, norm)
    assert NormRouteOps.calls == 1 and normed is None
    h_ref, res_ref = norm.forward_with_residual(x, residual)
    torch.testing.assert_close(res, res_ref)
    torch.testing.assert_close(out, layer_moe(h_ref))
    # With the next norm taken into the experts (here: the torch chain again).
    class ChainOps(NormRouteOps):
        def fused_moe_norm(self, moe, x, w, ids, residual, norm):
            return norm.forward_with_residual(moe.experts_forward(x, w, ids), residual)

    next_norm = RMSNorm(hidden, 1e-5)
    layer_moe.ops = ChainOps()
    out2, res2, normed2 = layer_moe.forward_with_norm(x, residual, norm, next_norm)
    assert out2 is None
    want_normed, want_res = next_norm.forward_with_residual(layer_moe(h_ref), res_ref)
    torch.testing.assert_close(res2, want_res)
    torch.testing.assert_close(normed2, want_normed)
    layer_moe.ops = Ops()
    assert layer_moe.forward_with_norm(x, residual, norm) is None


def test_moe_decode_tiles_env(monkeypatch):
    """KVSERVE_MOE_DECODE_TILES: both defaults unless set; either side may be left empty; a
    malformed value is an error that names the variable."""
    import pytest

    from kvserve.platform.cuda_moe import moe_decode_tiles

    monkeypatch.delenv("KVSERVE_MOE_DECODE_TILES", raising=False)
    assert moe_decode_tiles() == (None, None)
    monkeypatch.setenv("KVSERVE_MOE_DECODE_TILES", "4,1024,8/4,256,8,3")
    assert moe_decode_tiles() == ((4, 1024, 8), (4, 256, 8, 3))
    monkeypatch.setenv("KVSERVE_MOE_DECODE_TILES", "/2,128,4,0")
    assert moe_decode_tiles() == (None, (2, 128, 4, 0))
    for bad in ("4,1024,8", "4,1000,8/", "4,512/2,256,4,3", "/2,256,4,5", "a,b,c/", "4,512,32/"):
        monkeypatch.setenv("KVSERVE_MOE_DECODE_TILES", bad)
        with pytest.raises(ValueError, match="KVSERVE_MOE_DECODE_TILES"):
            moe_decode_tiles()


def test_moe_model_with_chained_norms_equals_plain(tmp_path, monkeypatch):
    """A tiny Qwen3-MoE (one dense layer among sparse ones) whose ops take the post-attention
    norm into the routing and the next norm into the experts (both as torch chains here): the
    same hidden states as the model with the plain ops. Covers `MoEForCausalLM.forward`'s chain
    (a layer handed its input already normalized, the last layer's final norm, a dense layer
    in between)."""
    import torch

    from kvserve import LLM, SamplingParams
    from kvserve.models.ops import Ops
    from tests.models.test_moe import _save_model

    _save_model("qwen3_moe", tmp_path)
    llm = LLM(str(tmp_path), dtype="float32", device="cpu", num_kv_blocks=64)
    model = llm.engine.runner.model

    class ChainOps(Ops):
        calls = {"route": 0, "experts": 0}

        def moe_norm_route(self, moe, x, residual, norm):
            ChainOps.calls["route"] += 1
            h, res = norm.forward_with_residual(x, residual)
            return (h, res, *self.route_experts(moe.gate(h), moe.top_k, moe.renorm, h.dtype))

        def fused_moe_norm(self, moe, x, w, ids, residual, norm):
            ChainOps.calls["experts"] += 1
            return norm.forward_with_residual(moe.experts_forward(x, w, ids), residual)

    sp = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    prompts = [{"prompt_token_ids": [5, 9, 23, 41, 7]}, {"prompt_token_ids": [3, 1, 4, 1, 5, 9, 2, 6]}]
    want = [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]
    sparse = [layer.mlp for layer in model.layers if hasattr(layer.mlp, "forward_with_norm")]
    assert sparse and len(sparse) < len(model.layers)
    for moe in sparse:
        moe.ops = ChainOps()
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]
    assert got == want
    assert ChainOps.calls["route"] > 0 and ChainOps.calls["experts"] == ChainOps.calls["route"]
