"""The qkv GEMV with Qwen3's q/k norm, RoPE and the K/V store in its epilogue
(`kvserve/models/triton_qk_norm.py`, `KVSERVE_QK_NORM_GEMV=1`) on the GPU: against the GEMV then
`rope_qk_` at Qwen3-30B-A3B's and Qwen3-8B's attention shapes, inside a CUDA graph, and a dense
Qwen3 end to end (greedy tokens equal the CPU engine's)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from kvserve import LLM, SamplingParams  # noqa: E402
from tests.gpu import qk_norm_checks  # noqa: E402


@pytest.mark.parametrize("hq,hkv,d,hidden", [(32, 4, 128, 2048), (32, 8, 128, 4096), (14, 2, 64, 896)])
@pytest.mark.parametrize("slot", [3, -1])
def test_matches_gemv_then_rope(hq, hkv, d, hidden, slot):
    qk_norm_checks.check(hq, hkv, d, hidden, "cuda", torch.float32, slot, 1e-4)
    qk_norm_checks.check(hq, hkv, d, hidden, "cuda", torch.bfloat16, slot, 2e-2)


def test_cuda_graph_replays_with_new_inputs():
    from kvserve.models.triton_qk_norm import gemv_qk_norm_rope_

    hq, hkv, d, hidden = 32, 4, 128, 2048
    n = (hq + 2 * hkv) * d
    x = torch.randn(1, hidden, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(n, hidden, device="cuda") * 0.02).bfloat16()
    qw = torch.rand(d, device="cuda").bfloat16() + 0.5
    kw = torch.rand(d, device="cuda").bfloat16() + 0.5
    cos_sin = torch.randn(64, d, device="cuda")
    pos = torch.tensor([5], device="cuda")
    counts = torch.zeros(hq + hkv, dtype=torch.int32, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        gemv_qk_norm_rope_(x, w, pos, cos_sin, hq, hkv, d, qw, kw, 1e-6, counts)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = gemv_qk_norm_rope_(x, w, pos, cos_sin, hq, hkv, d, qw, kw, 1e-6, counts)
    for p in (7, 63, 0):
        x.copy_(torch.randn_like(x))
        pos.fill_(p)
        g.replay()
        torch.testing.assert_close(out, gemv_qk_norm_rope_(x, w, pos, cos_sin, hq, hkv, d, qw, kw, 1e-6, counts),
                                   rtol=0, atol=0)
    assert int(counts.abs().sum()) == 0


def test_qwen3_attention_engine_greedy_matches_cpu(tmp_path, monkeypatch):
    """fp32 end to end with KVSERVE_QK_NORM_GEMV=1 (the fp32 qkv projection keeps the GEMV-free
    path, so this checks that the switch changes nothing there): the CPU engine's tokens."""
    from tests.gpu.test_engine_gpu import _prompts
    from tests.models.test_moe import _save_model

    _save_model("qwen3_moe", tmp_path)  # Qwen3 attention (q/k norm); the MoE MLP does not matter here
    prompts = _prompts(6, seed=2)
    sp = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    common = dict(dtype="float32", max_model_len=256, max_num_seqs=8)

    def run(llm: LLM, ps) -> list[list[int]]:
        outs = llm.generate([{"prompt_token_ids": p} for p in ps], sp, use_tqdm=False)
        return [o.outputs[0].token_ids for o in outs]

    want = run(LLM(str(tmp_path), device="cpu", num_kv_blocks=256, **common), prompts)
    monkeypatch.setenv("KVSERVE_QK_NORM_GEMV", "1")
    gpu = LLM(str(tmp_path), device="cuda", **common)
    assert gpu.engine.runner.model.layers[0].mlp.ops.qk_norm_gemv
    assert [run(gpu, [p])[0] for p in prompts[:3]] == want[:3]
    assert run(gpu, prompts) == want


def test_qwen3_attention_engine_bf16_uses_the_kernel(tmp_path, monkeypatch):
    """bf16 (where the one-row GEMV runs): the fused kernel is used at batch 1 (CUDA graphs) and
    the greedy tokens follow the default path's (GEMV then rope_qk_; sums in another order, so a
    late divergence is rounding, not an error)."""
    from kvserve.models import triton_qk_norm
    from tests.gpu.test_engine_gpu import _prompts
    from tests.models.test_moe import _save_model

    _save_model("qwen3_moe", tmp_path)
    prompts = _prompts(4, seed=3)
    sp = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    common = dict(dtype="bfloat16", max_model_len=256, max_num_seqs=8)

    def run(llm: LLM) -> list[list[int]]:
        return [llm.generate([{"prompt_token_ids": p}], sp, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]

    monkeypatch.delenv("KVSERVE_QK_NORM_GEMV", raising=False)
    want = run(LLM(str(tmp_path), device="cuda", **common))
    calls = []
    real = triton_qk_norm.gemv_qk_norm_rope_
    monkeypatch.setattr(triton_qk_norm, "gemv_qk_norm_rope_", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setenv("KVSERVE_QK_NORM_GEMV", "1")
    got = run(LLM(str(tmp_path), device="cuda", **common))
    assert calls, "the fused kernel was never called"
    assert [g[0] for g in got] == [w[0] for w in want]
    same = sum(a == b for g, w in zip(got, want) for a, b in zip(g, w))
    assert same >= 0.75 * sum(len(w) for w in want), (got, want)
