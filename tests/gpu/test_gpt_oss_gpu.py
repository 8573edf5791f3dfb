"""gpt-oss on a GPU: the grouped MXFP4 MoE kernel against the expert loop (fp32 and bf16, up to
gpt-oss-20b's widths), and a tiny MXFP4 gpt-oss end to end (Triton attention with sinks, the
kernel, CUDA graphs) giving the CPU engine's greedy tokens in fp32, on the packed kernels (the
default) and on the legacy ones (`KVSERVE_MXFP4_MOE=legacy`)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_mxfp4_moe_kernel():
    from tests.gpu import mxfp4_moe_checks

    mxfp4_moe_checks.run("cuda")


@pytest.mark.parametrize("impl", ["packed", "legacy"])
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
    monkeypatch.setattr(tm, "MOE_IMPL", impl)  # KVSERVE_MXFP4_MOE, read when the module is imported
    llm = LLM(str(tmp_path), dtype="float32", device="cuda", max_model_len=256, max_num_seqs=8)
    assert llm.engine.runner.graphs is not None  # decode steps replay CUDA graphs
    got = llm.generate(prompts, params, use_tqdm=False)
    moe = llm.engine.runner.model.layers[0].mlp  # the kernels that ran
    assert bool(moe.packed) == (impl == "packed") and bool(moe.stacked) == (impl == "legacy")
    same = sum(g.outputs[0].token_ids == w.outputs[0].token_ids for g, w in zip(got, want))
    assert same >= len(prompts) - 1, [(g.outputs[0].token_ids, w.outputs[0].token_ids) for g, w in zip(got, want)]
