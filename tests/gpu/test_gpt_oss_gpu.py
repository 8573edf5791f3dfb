"""gpt-oss on a GPU: the grouped MXFP4 MoE kernel against the expert loop (fp32 and bf16, up to
gpt-oss-20b's widths), and a tiny MXFP4 gpt-oss end to end (Triton attention with sinks, the
kernel, CUDA graphs) giving the CPU engine's greedy tokens in fp32, on the packed kernels (the
default, and with the opt-in split down GEMV) and on the legacy ones (`KVSERVE_MXFP4_MOE=legacy`);
the split down GEMV in a CUDA graph replayed with new routing."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_mxfp4_moe_kernel():
    from tests.gpu import mxfp4_moe_checks

    mxfp4_moe_checks.run("cuda")


@pytest.mark.parametrize("t", [1, 3])
@pytest.mark.parametrize("gu_cfg, split", [(None, (32, 16, 4, 1, 2)), ((32, 8, 4, 3), (32, 16, 4, 3, 2)),
                                           ((32, 8, 4, 3), (32, 16, 4, 3, 0))])
def test_mxfp4_split_down_in_a_cuda_graph(monkeypatch, t, gu_cfg, split):
    """The split down GEMV (KVSERVE_MXFP4_GEMV_DOWN's SPLIT >= 1) at gpt-oss-20b widths: selected by
    the variable, captured into a CUDA graph (its fp32 scratch from the graph pool) and replayed
    with new activations and routing, the same bits as run eagerly and on a second run (a fixed
    reduce order, no atomics), and the sequential kernel's result up to the fp32 summation order.
    The same for the packed-half-math GEMVs (DECODE 3 gate/up and down, with and without the
    split: their activation pairs' scratch from the graph pool, the launches PDL on Hopper)."""
    from kvserve.kernels import triton_mxfp4_moe as tm
    from tests.gpu.mxfp4_moe_checks import ALPHA, _packed_case

    x, ids, wts, packed, _ = _packed_case(t, "cuda", torch.bfloat16, 2880, 2880, 32, 4, 20 + t, True, 7.0)
    monkeypatch.setenv("KVSERVE_MXFP4_GEMV_DOWN", ",".join(map(str, split)))
    if gu_cfg:
        monkeypatch.setenv("KVSERVE_MXFP4_GEMV_GU", ",".join(map(str, gu_cfg)))
    else:
        monkeypatch.delenv("KVSERVE_MXFP4_GEMV_GU", raising=False)
    assert tm.gemv_configs()[1] == split

    def layer(a, i, w):
        return tm.fused_moe_mxfp4(a, i, w, packed, ALPHA, 7.0, path="gemv")

    want = layer(x, ids, wts)
    assert torch.equal(want, tm.fused_moe_mxfp4(x, ids, wts, packed, ALPHA, 7.0, path="gemv",
                                                gemv_cfg=(tm.gemv_configs()[0], split)))  # the variable picked it
    seq = tm.fused_moe_mxfp4(x, ids, wts, packed, ALPHA, 7.0, path="gemv", gemv_cfg=((32, 8, 4, 1), (32, 16, 4, 1, 0)))
    assert ((want.float() - seq.float()).norm() / seq.float().norm()).item() < 1e-2  # bf16: one rounding apart
    sx, sids, swts = x.clone(), ids.clone(), wts.clone()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        layer(sx, sids, swts)  # warm-up on the capture stream
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=stream):
            out = layer(sx, sids, swts)
    torch.cuda.current_stream().wait_stream(stream)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, want)
    gen = torch.Generator(device="cuda").manual_seed(t)
    for _ in range(3):  # new routing and activations through the same graph
        x2 = torch.randn(x.shape, device="cuda", generator=gen).to(x.dtype)
        ids2 = torch.stack([torch.randperm(31, device="cuda", generator=gen)[:4] for _ in range(t)])
        wts2 = torch.softmax(torch.randn(t, 4, device="cuda", generator=gen), -1).to(x.dtype)
        sx.copy_(x2)
        sids.copy_(ids2)
        swts.copy_(wts2)
        g.replay()
        torch.cuda.synchronize()
        eager = layer(x2, ids2, wts2)
        assert torch.equal(out, eager) and torch.equal(layer(x2, ids2, wts2), eager)


@pytest.mark.parametrize("impl", ["packed", "legacy", "packed-split-down"])
def test_tiny_mxfp4_gpt_oss_cuda_matches_cpu(tmp_path, monkeypatch, impl):
    pytest.importorskip("transformers")
    from kvserve import LLM, SamplingParams
    from kvserve.kernels import triton_mxfp4_moe as tm
    from tests.conftest import _save_tokenizer
    from tests.models.test_gpt_oss import _hf_model, _prompts, _write_mxfp4_checkpoint

    _write_mxfp4_checkpoint(_hf_model(inter=64), tmp_path)
    _save_tokenizer(tmp_path)
    prompts = [{"prompt_token_ids": p} for p in _prompts()[1:]]
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    want = LLM(str(tmp_path), dtype="float32", device="cpu", num_kv_blocks=64).generate(prompts, params, use_tqdm=False)
    if impl == "packed-split-down":  # the split down GEMV (read at each call, so at each capture)
        monkeypatch.setenv("KVSERVE_MXFP4_GEMV_DOWN", "32,16,4,1,2")
        impl = "packed"
    monkeypatch.setattr(tm, "MOE_IMPL", impl)  # KVSERVE_MXFP4_MOE, read when the module is imported
    llm = LLM(str(tmp_path), dtype="float32", device="cuda", max_model_len=256, max_num_seqs=8)
    assert llm.engine.runner.graphs is not None  # decode steps replay CUDA graphs
    got = llm.generate(prompts, params, use_tqdm=False)
    moe = llm.engine.runner.model.layers[0].mlp  # the kernels that ran
    assert bool(moe.packed) == (impl == "packed") and bool(moe.stacked) == (impl == "legacy")
    same = sum(g.outputs[0].token_ids == w.outputs[0].token_ids for g, w in zip(got, want))
    assert same >= len(prompts) - 1, [(g.outputs[0].token_ids, w.outputs[0].token_ids) for g, w in zip(got, want)]
