"""The fused MoE kernels (`kvserve/kernels/triton_moe.py`) on the GPU: both paths against the
fp32 oracle at Qwen3-30B-A3B and gpt-oss-20b expert shapes, the expert sort, CUDA-graph
capture and replay with new routing, and end to end: greedy tokens of the tiny MoE models in
fp32 through the CUDA engine (fused experts, CUDA graphs) equal the CPU engine's expert loop,
with `KVSERVE_MOE_DECODE=torch` (routing as torch ops, the pairs kernels).
The default decode path (`KVSERVE_MOE_DECODE=fused`, `kernels/triton_moe_decode.py`): the
one-launch router against the torch chain, the decode expert kernels against the oracle and the
pairs path, in a CUDA graph with new routing, and the engine's greedy tokens with it."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from kvserve import LLM, SamplingParams  # noqa: E402
from kvserve.kernels import triton_moe  # noqa: E402
from tests.gpu import moe_checks  # noqa: E402

QWEN3 = (128, 8, 2048, 768)  # experts, top-k, hidden, expert width
GPT_OSS = (32, 4, 2880, 2880)


@pytest.mark.parametrize("use_kernel", [True, False], ids=["triton", "torch"])
@pytest.mark.parametrize("t,e,k,bm", [(1, 128, 8, 16), (16, 128, 8, 16), (300, 128, 8, 64), (7, 32, 4, 16),
                                      (1000, 32, 4, 64), (2, 6, 2, 32)])
def test_align(t, e, k, bm, use_kernel):
    moe_checks.check_align(t, e, k, bm, "cuda", use_kernel)


@pytest.mark.parametrize("shape", [QWEN3, GPT_OSS], ids=["qwen3-30b-a3b", "gpt-oss-20b"])
@pytest.mark.parametrize("t", [1, 4, 16, 77, 512])
@pytest.mark.parametrize("path", ["pairs", "sorted"])
def test_fused_matches_reference_bf16(shape, t, path):
    e, k, hidden, inter = shape
    if path == "pairs" and t > 16:
        pytest.skip("the pairs path is for decode batches")
    if t == 512:  # the oracle loops in Python: a smaller expert count keeps it quick
        e = min(e, 32)
    moe_checks.check_fused(t, e, k, hidden, inter, "cuda", torch.bfloat16, path, tol=2e-2)


@pytest.mark.parametrize("path", ["pairs", "sorted"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 5e-3)])
def test_fused_other_dtypes(path, dtype, tol):
    moe_checks.check_fused(9, 16, 2, 256, 96, "cuda", dtype, path, tol=tol)


@pytest.mark.parametrize("t", [1, 64])  # pairs path, sorted path
def test_cuda_graph_replay_follows_new_routing(t):
    e, k, hidden, inter = 64, 4, 512, 256
    w13, w2 = moe_checks.weights(e, hidden, inter, "cuda", torch.bfloat16)
    x = torch.randn(t, hidden, device="cuda", dtype=torch.bfloat16)
    w, ids = moe_checks.route(t, e, k, "cuda", torch.bfloat16, seed=1)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        triton_moe.fused_moe(x, w13, w2, w, ids)  # compile outside the capture
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = triton_moe.fused_moe(x, w13, w2, w, ids)
    for seed in (2, 3):
        w2_, ids2 = moe_checks.route(t, e, k, "cuda", torch.bfloat16, seed=seed)
        x.copy_(torch.randn_like(x))
        w.copy_(w2_)
        ids.copy_(ids2)
        g.replay()
        torch.testing.assert_close(out, triton_moe.fused_moe(x, w13, w2, w, ids), rtol=0, atol=0)


def test_empty_batch():
    w13, w2 = moe_checks.weights(8, 64, 32, "cuda", torch.bfloat16)
    x = torch.empty(0, 64, device="cuda", dtype=torch.bfloat16)
    ids = torch.empty(0, 2, device="cuda", dtype=torch.long)
    assert triton_moe.fused_moe(x, w13, w2, ids.to(x.dtype), ids).shape == (0, 64)


@pytest.mark.parametrize("kind", ["qwen3_moe", "qwen3_moe_raw", "mixtral"])
def test_engine_greedy_matches_cpu_expert_loop(kind, tmp_path, monkeypatch):
    """The pairs / sorted kernels with the torch routing (`KVSERVE_MOE_DECODE=torch`; the default
    decode path has its own test below)."""
    from tests.models.test_moe import _save_model
    from tests.gpu.test_engine_gpu import _prompts

    _save_model(kind, tmp_path)
    prompts = _prompts(12, seed=3)
    sp = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    common = dict(dtype="float32", max_model_len=256, max_num_seqs=16)

    def run(llm: LLM) -> list[list[int]]:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
        return [o.outputs[0].token_ids for o in outs]

    want = run(LLM(str(tmp_path), device="cpu", num_kv_blocks=256, **common))
    monkeypatch.setenv("KVSERVE_MOE_DECODE", "torch")
    gpu = LLM(str(tmp_path), device="cuda", **common)
    model = gpu.engine.runner.model
    assert model.layers[0].mlp.ops.moe_decode == "torch"
    sparse = [layer.mlp for layer in model.layers if hasattr(layer.mlp, "experts")]
    assert sparse and all(getattr(m, "stacked_experts", None) is not None for m in sparse)
    assert gpu.engine.runner.graphs is not None
    assert run(gpu) == want
    assert gpu.engine.runner.num_graph_steps > 0
    # one at a time: batch-1 decode takes the pairs path
    single = [gpu.generate({"prompt_token_ids": p}, sp, use_tqdm=False)[0].outputs[0].token_ids for p in prompts[:3]]
    assert single == want[:3]


# -- the default decode path (KVSERVE_MOE_DECODE=fused) ----------------------------------------
@pytest.mark.parametrize("renorm", [True, False])
@pytest.mark.parametrize("t,e,k", [(1, 128, 8), (4, 128, 8), (1, 32, 4), (3, 8, 2), (2, 60, 5), (300, 128, 8)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_route_kernel_matches_torch_chain(t, e, k, renorm, dtype):
    moe_checks.check_route(t, e, k, renorm, "cuda", dtype, seed=t + e)


def test_route_kernel_on_bf16_router_logits():
    """Real router outputs (bf16 logits of a random projection): the same experts as the torch
    chain wherever the k-th and (k+1)-th probabilities differ, weights within bf16 rounding."""
    from kvserve.kernels import triton_moe_decode
    from kvserve.models.ops import Ops

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(64, 2048, device="cuda", generator=g).bfloat16()
    router = (torch.randn(128, 2048, device="cuda", generator=g) * 0.02).bfloat16()
    logits = x @ router.t()
    w, ids = triton_moe_decode.route(logits, 8, True, torch.bfloat16)
    w_ref, ids_ref = Ops().route_experts(logits, 8, True, torch.bfloat16)
    probs = torch.softmax(logits.float(), -1).sort(-1, descending=True).values
    clear = probs[:, 7] != probs[:, 8]
    assert torch.equal(ids.sort(-1).values[clear], ids_ref.sort(-1).values[clear])
    same = (ids == ids_ref).all(-1)
    torch.testing.assert_close(w[same].float(), w_ref[same].float(), rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("shape", [QWEN3, GPT_OSS], ids=["qwen3-30b-a3b", "gpt-oss-20b"])
@pytest.mark.parametrize("t", [1, 2, 4, 8])
def test_decode_path_matches_reference_bf16(shape, t):
    e, k, hidden, inter = shape
    rel = moe_checks.check_decode(t, e, k, hidden, inter, "cuda", torch.bfloat16, tol=2e-2)
    rel_pairs = moe_checks.check_fused(t, e, k, hidden, inter, "cuda", torch.bfloat16, "pairs", tol=2e-2)
    assert rel < 2 * rel_pairs + 1e-3  # no worse than the pairs path beyond rounding


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 5e-3)])
def test_decode_path_other_dtypes_and_ragged_shapes(dtype, tol):
    moe_checks.check_decode(3, 16, 3, 200, 72, "cuda", dtype, tol)  # k 3 (padded to 4), ragged K
    moe_checks.check_decode(2, 8, 2, 256, 96, "cuda", dtype, tol, configs=((8, 64, 4), (8, 32, 4, 2)))
    moe_checks.check_decode(1, 8, 8, 2048, 768, "cuda", dtype, tol, configs=((4, 512, 4), (4, 256, 4, 0)))


def test_decode_path_equals_pairs_path_in_fp32():
    """The same math as the pairs path: in fp32 equal up to summation order."""
    w13, w2 = moe_checks.weights(128, 2048, 768, "cuda", torch.float32)
    x = torch.randn(2, 2048, device="cuda")
    w, ids = moe_checks.route(2, 128, 8, "cuda", torch.float32, seed=5)
    a = triton_moe.fused_moe(x, w13, w2, w, ids, path="decode")
    b = triton_moe.fused_moe(x, w13, w2, w, ids, path="pairs")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("t", [1, 4])
def test_decode_path_cuda_graph_follows_new_routing(t):
    """Router kernel + decode expert kernels captured together (PDL edges on Hopper) and
    replayed with new logits and inputs: the eager result, bit for bit."""
    from kvserve.kernels import triton_moe_decode

    e, k, hidden, inter = 128, 8, 2048, 768
    w13, w2 = moe_checks.weights(e, hidden, inter, "cuda", torch.bfloat16)
    x = torch.randn(t, hidden, device="cuda", dtype=torch.bfloat16)
    logits = torch.randn(t, e, device="cuda", dtype=torch.bfloat16)

    def layer() -> torch.Tensor:
        w, ids = triton_moe_decode.route(logits, k, True, x.dtype)
        return triton_moe.fused_moe(x, w13, w2, w, ids, fused_decode=True)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        layer()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = layer()
    for _ in range(3):
        logits.copy_(torch.randn_like(logits))
        x.copy_(torch.randn_like(x))
        g.replay()
        torch.testing.assert_close(out, layer(), rtol=0, atol=0)


def test_moe_decode_env_is_checked_when_the_engine_is_built(monkeypatch):
    from kvserve.platform.cuda_ops import CudaTritonOps

    monkeypatch.delenv("KVSERVE_MOE_DECODE", raising=False)
    assert CudaTritonOps().moe_decode == "fused"
    monkeypatch.setenv("KVSERVE_MOE_DECODE", "default")  # the old name of torch
    assert CudaTritonOps().moe_decode == "torch"
    monkeypatch.setenv("KVSERVE_MOE_DECODE", "fast")
    with pytest.raises(ValueError, match="KVSERVE_MOE_DECODE"):
        CudaTritonOps()


@pytest.mark.parametrize("mode,kind", [("fused", "qwen3_moe"), ("fused", "qwen3_moe_raw"), ("fused", "mixtral"),
                                       ("fused-router", "qwen3_moe"), ("fused-router", "mixtral"),
                                       ("fused-chain", "qwen3_moe"), ("fused-chain", "mixtral")])
def test_engine_greedy_with_fused_decode_matches_cpu(mode, kind, tmp_path, monkeypatch):
    """The default, KVSERVE_MOE_DECODE=fused, and the opt-in fused-router / fused-chain (with
    KVSERVE_QK_NORM_GEMV=1) end to end (fp32, CUDA graphs): the same greedy tokens as the CPU
    engine's expert loop, batched and one at a time."""
    from tests.gpu.test_engine_gpu import _prompts
    from tests.models.test_moe import _save_model

    _save_model(kind, tmp_path)
    prompts = _prompts(8, seed=4)
    sp = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    common = dict(dtype="float32", max_model_len=256, max_num_seqs=16)

    def run(llm: LLM, ps) -> list[list[int]]:
        outs = llm.generate([{"prompt_token_ids": p} for p in ps], sp, use_tqdm=False)
        return [o.outputs[0].token_ids for o in outs]

    want = run(LLM(str(tmp_path), device="cpu", num_kv_blocks=256, **common), prompts)
    if mode == "fused":
        monkeypatch.delenv("KVSERVE_MOE_DECODE", raising=False)  # the default
    else:
        monkeypatch.setenv("KVSERVE_MOE_DECODE", mode)
        monkeypatch.setenv("KVSERVE_QK_NORM_GEMV", "1")
    gpu = LLM(str(tmp_path), device="cuda", **common)
    ops = gpu.engine.runner.model.layers[0].mlp.ops
    assert ops.moe_decode == mode and (mode == "fused" or ops.qk_norm_gemv)
    assert gpu.engine.runner.graphs is not None
    assert run(gpu, prompts) == want
    assert [run(gpu, [p])[0] for p in prompts[:3]] == want[:3]


# -- KVSERVE_MOE_DECODE=fused-router: add-and-norm, router and routing in one launch ------------
@pytest.mark.parametrize("renorm", [True, False])
@pytest.mark.parametrize("t,e,k,hidden", [(1, 128, 8, 2048), (4, 128, 8, 2048), (1, 32, 4, 2880), (16, 60, 5, 200)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_route_matches_torch_chain(t, e, k, hidden, renorm, dtype):
    if dtype == torch.bfloat16:  # bf16 logits summed in another order can swap near-tied picks
        pytest.skip("bf16: see test_norm_route_bf16_picks")
    moe_checks.check_norm_route(t, e, k, hidden, renorm, "cuda", dtype, seed=t + e)


def test_norm_route_bf16_picks():
    """bf16 at Qwen3-30B-A3B shapes: the norm and residual as the norm kernel gives them (within
    one rounding), the experts of the torch chain wherever its k-th and (k+1)-th probabilities
    differ clearly, the weights within bf16 rounding."""
    from kvserve.kernels import triton_moe_decode as tmd
    from kvserve.models import triton_ops
    from kvserve.models.ops import Ops

    g = torch.Generator(device="cuda").manual_seed(0)
    t, hidden, e, k = 16, 2048, 128, 8
    x = torch.randn(t, hidden, device="cuda", generator=g).bfloat16()
    res = torch.randn(t, hidden, device="cuda", generator=g).bfloat16()
    nw = (1 + 0.1 * torch.randn(hidden, device="cuda", generator=g)).bfloat16()
    router = (torch.randn(e, hidden, device="cuda", generator=g) * 0.02).bfloat16()
    counts = torch.zeros(tmd.NORM_ROUTE_MAX_ROWS, dtype=torch.int32, device="cuda")
    h, s, w, ids = tmd.norm_route(x, res, nw, 1e-6, router, k, True, counts)
    h_ref, s_ref = triton_ops.rmsnorm(x, nw, 1e-6, res)
    assert torch.equal(s, s_ref)
    torch.testing.assert_close(h.float(), h_ref.float(), rtol=1e-2, atol=1e-2)
    logits = h_ref @ router.t()
    w_ref, ids_ref = Ops().route_experts(logits, k, True, torch.bfloat16)
    probs = torch.softmax(logits.float(), -1).sort(-1, descending=True).values
    clear = (probs[:, k - 1] - probs[:, k]) > 1e-2 * probs[:, k - 1]
    assert clear.any()
    assert torch.equal(ids.sort(-1).values[clear], ids_ref.sort(-1).values[clear])
    same = (ids == ids_ref).all(-1)
    torch.testing.assert_close(w[same].float(), w_ref[same].float(), rtol=2e-2, atol=2e-3)
    assert int(counts.abs().sum()) == 0


def test_norm_route_cuda_graph_follows_new_inputs():
    """norm_route + the decode expert kernels captured together and replayed with new inputs:
    the eager result, bit for bit (the arrival counters are back at zero after every call)."""
    from kvserve.kernels import triton_moe_decode as tmd

    e, k, hidden, inter = 128, 8, 2048, 768
    w13, w2 = moe_checks.weights(e, hidden, inter, "cuda", torch.bfloat16)
    router = (torch.randn(e, hidden, device="cuda") * 0.02).bfloat16()
    nw = torch.ones(hidden, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1, hidden, device="cuda", dtype=torch.bfloat16)
    res = torch.randn(1, hidden, device="cuda", dtype=torch.bfloat16)
    counts = torch.zeros(tmd.NORM_ROUTE_MAX_ROWS, dtype=torch.int32, device="cuda")
    if torch.cuda.get_device_capability()[0] >= 9:
        assert tmd.l2_prefetch_bytes(w13, x) == tmd.PREFETCH_ROWS * hidden * 2

    def layer() -> tuple[torch.Tensor, torch.Tensor]:
        h, s, w, ids = tmd.norm_route(x, res, nw, 1e-6, router, k, True, counts, w13=w13)  # with the L2 prefetch
        return triton_moe.fused_moe(h, w13, w2, w, ids, fused_decode=True), s
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        layer()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out, out_res = layer()
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        res.copy_(torch.randn_like(res))
        g.replay()
        want, want_res = layer()
        torch.testing.assert_close(out, want, rtol=0, atol=0)
        torch.testing.assert_close(out_res, want_res, rtol=0, atol=0)
    assert int(counts.abs().sum()) == 0


@pytest.mark.parametrize("shape", [QWEN3, GPT_OSS], ids=["qwen3-30b-a3b", "gpt-oss-20b"])
@pytest.mark.parametrize("t", [1, 3])
def test_decode_next_norm_matches_experts_then_norm(shape, t):
    """KVSERVE_MOE_DECODE=fused-chain's down kernel (the next add-and-RMSNorm in its epilogue)
    against the same kernels without it followed by the norm."""
    e, k, hidden, inter = shape
    moe_checks.check_decode_next_norm(t, e, k, hidden, inter, "cuda", torch.float32, 1e-5)
    moe_checks.check_decode_next_norm(t, e, k, hidden, inter, "cuda", torch.bfloat16, 2e-2)
