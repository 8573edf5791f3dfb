"""The verify GEMM (`kvserve/kernels/triton_verify_gemm.py`) on the GPU: the shared checks of
`tests/gpu/verify_gemm_checks.py` in fp16 / bf16, Llama-3.1-8B projections at 2..16 rows against
`F.linear` (cuBLAS) + the unfused epilogue kernels, split-K ticket counters across CUDA-graph
replays, and an engine with `KVSERVE_VERIFY_GEMM=triton` whose speculative greedy ids equal its
plain ones.

    python -m pytest tests/gpu/test_verify_gemm.py -q
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

LLAMA8B = {"qkv": (6144, 4096), "o_proj": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
           "lm_head": (128256, 4096)}


@pytest.mark.parametrize("pre", [None, 0], ids=["pdl-default", "no-preload"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_shared_checks(dtype, pre):
    import contextlib

    from tests.gpu import verify_gemm_checks as c

    with c.preload(pre) if pre is not None else contextlib.nullcontext():
        _shared(c, dtype)


def _shared(c, dtype):
    for m in (2, 5, 16):
        c.check_plain(m, 64, 96, "cuda", dtype, (32, 32, 2, 4, 2), bias=m == 5)
        c.check_plain(m, 200, 160, "cuda", dtype, (64, 32, 3, 4, 2))
        c.check_silu_mul(m, 96, 256, "cuda", dtype, bias=m == 2)
        c.check_rope(m, 4, 2, 64, 256, "cuda", dtype, bias=m == 16)
        c.check_rope(m, 4, 2, 128, 256, "cuda", dtype, write=m != 2)


def _x_w(m, n, k, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(m, k, device="cuda", generator=g).bfloat16()
    w = (torch.randn(n, k, device="cuda", generator=g) / k**0.5).bfloat16()
    return x, w


def _close_to_cublas(got, cublas, ref32):
    """Within bf16 rounding of the fp32 result, and as close to it as cuBLAS + epilogue is."""
    err = (got.float() - ref32).abs().max().item()
    err_cublas = (cublas.float() - ref32).abs().max().item()
    scale = ref32.abs().max().item()
    assert err <= max(2 * err_cublas, 8e-3 * scale), (err, err_cublas, scale)


@pytest.mark.parametrize("m", [2, 5, 8, 16])
@pytest.mark.parametrize("name", ["o_proj", "down", "lm_head"])
def test_llama8b_plain(name, m):
    from kvserve.kernels import triton_verify_gemm as vg

    n, k = LLAMA8B[name]
    x, w = _x_w(m, n, k)
    _close_to_cublas(vg.verify_gemm(x, w), F.linear(x, w), F.linear(x.float(), w.float()))


@pytest.mark.parametrize("m", [2, 5, 8, 16])
def test_llama8b_gate_up(m):
    from kvserve.kernels import triton_verify_gemm as vg
    from kvserve.models import triton_ops

    n, k = LLAMA8B["gate_up"]
    x, w = _x_w(m, n, k, seed=1)
    y32 = F.linear(x.float(), w.float())
    ref32 = F.silu(y32[:, : n // 2]) * y32[:, n // 2 :]
    _close_to_cublas(vg.verify_gemm_silu_mul(x, w), triton_ops.silu_and_mul(F.linear(x, w)), ref32)


@pytest.mark.parametrize("m", [2, 5, 8, 16])
def test_llama8b_qkv_rope_kv(m):
    from kvserve.kernels import triton_verify_gemm as vg
    from kvserve.models import fused_ops, triton_ops

    hq, hkv, d = 32, 8, 128
    n, k = LLAMA8B["qkv"]
    x, w = _x_w(m, n, k, seed=2)
    cos_sin = fused_ops.build_cos_sin(1.0 / (500000 ** (torch.arange(0, d, 2, device="cuda").float() / d)), 4096)
    pos = torch.arange(1000, 1000 + m, device="cuda")
    slots = torch.arange(2000, 2000 + m, device="cuda")
    slots[-1] = -1
    cache = torch.zeros(2, 256, 16, hkv, d, device="cuda", dtype=torch.bfloat16)
    ref_cache = cache.clone()
    got = vg.verify_gemm_rope_(x, w, None, pos, cos_sin, hq, hkv, d, cache, slots)
    ref = F.linear(x, w)
    triton_ops.rope_qk_(ref, pos, cos_sin, hq, hkv, d, kv_cache=ref_cache, slot_mapping=slots)
    ref32 = F.linear(x.float(), w.float()).bfloat16()  # rotate the fp32 sums rounded as the model rounds
    triton_ops.rope_qk_(ref32, pos, cos_sin, hq, hkv, d)
    _close_to_cublas(got, ref, ref32.float())
    _close_to_cublas(cache, ref_cache, ref_cache.float())
    assert (cache.view(2, -1, hkv, d)[:, slots[:-1]] != 0).any(dim=-1).all()  # every real row stored
    written = cache.view(2, -1, hkv, d).abs().sum(dim=(0, 2, 3)) != 0
    assert written.sum().item() == m - 1  # the padding row (slot -1) wrote nothing


def test_split_k_counters_survive_graph_replays():
    """The last program of a tile resets its counter: graph replays and eager calls agree."""
    from kvserve.kernels import triton_verify_gemm as vg

    x, w = _x_w(5, 4096, 14336, seed=4)
    want = vg.verify_gemm(x, w)  # eager first: allocates the counters outside the capture
    assert vg.verify_gemm_config(64, 14336)[2] > 1
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        vg.verify_gemm(x, w)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = vg.verify_gemm(x, w)
    for _ in range(3):
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, want)
    assert torch.equal(vg.verify_gemm(x, w), want)


def test_engine_spec_greedy_equals_plain(tiny_model_factory, monkeypatch):
    """fp16 engine with the verify GEMM on (decode batches of 2..16 rows and verify steps take
    it): speculative greedy ids (oracle drafts, every one right) equal plain greedy ids."""
    from kvserve import LLM, SamplingParams
    from kvserve.kernels import triton_verify_gemm as vg
    from kvserve.spec_decode.config import SpeculativeConfig
    from kvserve.spec_decode.decoder import SpecDecoder
    from kvserve.spec_decode.oracle import OracleProposer

    monkeypatch.setenv("KVSERVE_VERIFY_GEMM", "triton")
    vg.requested.cache_clear()
    try:
        folder = str(tiny_model_factory("llama")[0])
        llm = LLM(folder, device="cuda", dtype="float16", max_model_len=256, max_num_seqs=8,
                  gpu_memory_utilization=0.3, speculative_config={"method": "ngram", "num_speculative_tokens": 4})
        # Two requests: plain decode steps are 2 rows (a graph of 5), verify steps 10, so every
        # projection takes the verify GEMM, whose sums do not depend on the row count.
        prompts = [{"prompt_token_ids": [5 + i, 17, 33, 9 * i + 2, 40, 41]} for i in range(2)]
        sp = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
        llm.engine.spec = None
        want = [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]
        refs = {tuple(p["prompt_token_ids"]): w for p, w in zip(prompts, want)}
        prop = OracleProposer(refs, 1.0, llm.engine.model_config.vocab_size, seed=1)
        llm.engine.spec = SpecDecoder(SpeculativeConfig(num_speculative_tokens=4, backoff=False), prop)
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]
        assert got == want
        assert llm.engine.stats()["spec_accepted_tokens"] > 0
    finally:
        vg.requested.cache_clear()
