"""Mixture-of-experts models (Qwen3-MoE, Mixtral): greedy parity with HF transformers in fp32 on
tiny random models (several experts, top-2 routing, with and without renormalized top-k
weights, a dense layer among sparse ones), batched and one at a time."""

from __future__ import annotations

import pytest
import torch

from kvserve import LLM, SamplingParams
from kvserve.models.moe import SparseMoE
from tests.conftest import TINY_VOCAB, _save_tokenizer
from tests.models.test_parity import NEW_TOKENS, assert_batched_and_alone_match_hf, _prompts, hf_greedy
from tests.models.tp_check import assert_tp2_matches_tp1

COMMON = dict(vocab_size=TINY_VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, eos_token_id=2, bos_token_id=1, pad_token_id=0)


def _config(kind: str):
    import transformers as tf

    if kind == "qwen3_moe":  # renormalized top-2 of 6, layer 1 dense
        return tf.Qwen3MoeConfig(**COMMON, intermediate_size=96, moe_intermediate_size=32, head_dim=16, num_experts=6,
                                 num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[1])
    if kind == "qwen3_moe_raw":  # top-3 of 5 weights as the softmax gives them
        return tf.Qwen3MoeConfig(**COMMON, intermediate_size=96, moe_intermediate_size=32, head_dim=16, num_experts=5,
                                 num_experts_per_tok=3, norm_topk_prob=False)
    return tf.MixtralConfig(**COMMON, intermediate_size=48, num_local_experts=5, num_experts_per_tok=2,
                            sliding_window=None)


def _save_model(kind, path):
    """A tiny random HF model of `kind` (weights scaled up so routing and tokens are not flat),
    saved with a tokenizer to `path`; returns the HF model."""
    import transformers as tf

    torch.manual_seed(0)
    hf = tf.AutoModelForCausalLM.from_config(_config(kind)).float().eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.dim() >= 2:
                p.mul_(4.0 if "emb" in name else 2.0)
    hf.save_pretrained(path)
    _save_tokenizer(path)
    return hf


@pytest.mark.parametrize("kind", ["qwen3_moe", "qwen3_moe_raw", "mixtral"])
def test_moe_greedy_matches_hf_batched_and_alone(kind, tmp_path):
    hf = _save_model(kind, tmp_path)
    prompts = _prompts()[1:]
    refs = [hf_greedy(hf, p, NEW_TOKENS) for p in prompts]
    llm = LLM(str(tmp_path), dtype="float32", device="cpu", num_kv_blocks=64)
    layers = llm.engine.runner.model.layers
    assert isinstance(layers[0].mlp, SparseMoE)
    assert isinstance(layers[1].mlp, SparseMoE) == (kind != "qwen3_moe")
    assert_batched_and_alone_match_hf(llm, prompts, refs, alone=2)


def test_moe_experts_take_the_platforms_linear_method(tmp_path):
    """Quantized at load (q8_0): every expert's projections are GGML blocks; the router stays dense."""
    import transformers as tf

    from kvserve.models.linear import DenseLinearMethod
    from kvserve.platform.ggml_linear import GGMLLinearMethod

    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(_config("mixtral")).save_pretrained(tmp_path)
    _save_tokenizer(tmp_path)
    llm = LLM(str(tmp_path), dtype="float32", device="cpu", num_kv_blocks=32, quantization="q8_0")
    moe = llm.engine.runner.model.layers[0].mlp
    assert all(isinstance(e.gate_up_proj.method, GGMLLinearMethod) for e in moe.experts)
    assert isinstance(moe.gate.method, DenseLinearMethod)
    (out,) = llm.generate({"prompt_token_ids": [5, 9, 13]}, SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)
    assert len(out.outputs[0].token_ids) >= 1


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral"])
def test_moe_tensor_parallel_matches_tp1(kind, tmp_path):
    """TP=2 on CPU processes (gloo): each rank holds half of every expert (and of the dense MLP of
    Qwen3-MoE's layer 1); greedy tokens and logprobs equal TP=1's."""
    _save_model(kind, tmp_path)
    assert_tp2_matches_tp1(str(tmp_path), _prompts()[1:4])
