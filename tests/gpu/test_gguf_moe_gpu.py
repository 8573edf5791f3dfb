"""Qwen3-MoE / Mixtral GGUF files on the GPU (tiny random models, `tests/models/test_gguf_families.py`
writes them): by default the quantized experts are dequantized, stacked for the fused Triton MoE
and decode steps run in CUDA graphs, greedy tokens equal to the CPU engine on the same file
dequantized; with `quantization="gguf"` the experts keep their blocks (the CUDA quantized linear
method), run the expert loop, and the model decodes eagerly (no graphs) with the same tokens up
to near-ties."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
pytest.importorskip("gguf")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from kvserve import LLM, SamplingParams  # noqa: E402
from tests.models.test_gguf_families import QUANT, _assert_close_runs, _hf_model, _write_gguf  # noqa: E402
from tests.models.test_parity import _prompts  # noqa: E402

GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=2)


def _file(kind: str, tmp_path):
    _hf_model(kind, tmp_path / "hf")
    path = tmp_path / f"{kind}-q.gguf"
    _write_gguf(kind, tmp_path / "hf", path, QUANT)
    return str(path)


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral"])
def test_dequantized_experts_fused_with_graphs_match_cpu(kind, tmp_path):
    path = _file(kind, tmp_path)
    prompts = [{"prompt_token_ids": p} for p in _prompts()[1:]]
    common = dict(dtype="float32", max_model_len=256, quantization="none")
    want = LLM(path, device="cpu", num_kv_blocks=64, **common).generate(prompts, GREEDY, use_tqdm=False)
    gpu = LLM(path, device="cuda", **common)
    model = gpu.engine.runner.model
    sparse = [layer.mlp for layer in model.layers if hasattr(layer.mlp, "experts")]
    assert sparse and all(getattr(m, "stacked_experts", None) is not None for m in sparse)
    assert model.supports_cuda_graphs and gpu.engine.runner.graphs is not None
    got = gpu.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    assert gpu.engine.runner.num_graph_steps > 0


def test_gguf_quantized_experts_run_eagerly(tmp_path):
    from kvserve.platform.cuda_quant import CudaQuantLinearMethod

    path = _file("qwen3_moe", tmp_path)
    prompts = [{"prompt_token_ids": p} for p in _prompts()[1:]]
    gpu = LLM(path, device="cuda", dtype="float32", max_model_len=256, quantization="gguf")
    model = gpu.engine.runner.model
    experts = model.layers[0].mlp.experts
    assert all(isinstance(ex.gate_up_proj.method, CudaQuantLinearMethod) for ex in experts)
    assert not model.supports_cuda_graphs and gpu.engine.runner.graphs is None
    cpu = LLM(path, device="cpu", dtype="float32", num_kv_blocks=64, quantization="none")
    _assert_close_runs(gpu.generate(prompts, GREEDY, use_tqdm=False), cpu.generate(prompts, GREEDY, use_tqdm=False), 0.05)
