"""The fused MoE kernels (`kvserve/kernels/triton_moe.py`) on the GPU: both paths against the
fp32 oracle at Qwen3-30B-A3B and gpt-oss-20b expert shapes, the expert sort, CUDA-graph
capture and replay with new routing, and end to end: greedy tokens of the tiny MoE models in
fp32 through the CUDA engine (fused experts, CUDA graphs) equal the CPU engine's expert loop."""

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
def test_engine_greedy_matches_cpu_expert_loop(kind, tmp_path):
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
    gpu = LLM(str(tmp_path), device="cuda", **common)
    model = gpu.engine.runner.model
    sparse = [layer.mlp for layer in model.layers if hasattr(layer.mlp, "experts")]
    assert sparse and all(getattr(m, "stacked_experts", None) is not None for m in sparse)
    assert gpu.engine.runner.graphs is not None
    assert run(gpu) == want
    assert gpu.engine.runner.num_graph_steps > 0
    # one at a time: batch-1 decode takes the pairs path
    single = [gpu.generate({"prompt_token_ids": p}, sp, use_tqdm=False)[0].outputs[0].token_ids for p in prompts[:3]]
    assert single == want[:3]
