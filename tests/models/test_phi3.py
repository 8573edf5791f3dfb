"""Phi-3 / Phi-4-mini (Phi3ForCausalLM): greedy parity with HF transformers in fp32 on tiny random
models: fused qkv_proj / gate_up_proj checkpoint tensors, partial rotary (Phi-4-mini's 0.75),
LongRoPE short and long factors, a sliding window shorter than the prompt."""

from __future__ import annotations

import random

import pytest
import torch

from kvserve import LLM
from kvserve.core.config import ModelConfig
from tests.conftest import TINY_VOCAB, _save_tokenizer
from tests.models.test_parity import NEW_TOKENS, assert_batched_and_alone_match_hf, hf_greedy
from tests.models.tp_check import assert_tp2_matches_tp1

ORIGINAL_MAX = 48  # LongRoPE's switch point


def _model(tmp_path, **extra):
    import transformers as tf

    torch.manual_seed(0)
    kw = dict(
        vocab_size=TINY_VOCAB, hidden_size=96, intermediate_size=128, num_hidden_layers=2, num_attention_heads=3,
        num_key_value_heads=1, max_position_embeddings=512, eos_token_id=2, bos_token_id=1, pad_token_id=0,
        sliding_window=None,
    )
    kw.update(extra)
    model = tf.Phi3ForCausalLM(tf.Phi3Config(**kw)).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.mul_(4.0 if "emb" in name else 2.0)
    model.save_pretrained(tmp_path)
    _save_tokenizer(tmp_path)
    return model


def _prompts(*lengths: int) -> list[list[int]]:
    rng = random.Random(7)
    return [[rng.randrange(3, TINY_VOCAB) for _ in range(n)] for n in lengths]


def _check(llm: LLM, hf, prompts: list[list[int]]) -> None:
    refs = [hf_greedy(hf, p, NEW_TOKENS) for p in prompts]
    assert_batched_and_alone_match_hf(llm, prompts, refs)


def test_phi3_fused_checkpoint_and_window_match_hf(tmp_path):
    hf = _model(tmp_path, sliding_window=8)
    llm = LLM(str(tmp_path), dtype="float32", device="cpu", num_kv_blocks=64)
    assert llm.engine.runner.model.layers[0].self_attn.sliding_window == 8
    _check(llm, hf, _prompts(1, 5, 17, 40))


def test_phi4_mini_longrope_partial_rotary_matches_hf(tmp_path):
    rope = {
        "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
        "original_max_position_embeddings": ORIGINAL_MAX,
        "short_factor": [1.0 + 0.05 * i for i in range(12)], "long_factor": [1.0 + 0.5 * i for i in range(12)],
    }
    hf = _model(tmp_path, partial_rotary_factor=0.75, original_max_position_embeddings=ORIGINAL_MAX,
                rope_parameters=rope)
    llm = LLM(str(tmp_path), dtype="float32", device="cpu", num_kv_blocks=64)
    m = llm.engine.runner.model
    assert m.rotary_dim == 24 and m.rotary.mscale > 1.0
    # Contexts that stay within the original length use the short factors throughout; a prompt
    # already longer uses the long ones from its first token (HF's choice for each).
    _check(llm, hf, _prompts(1, 5, ORIGINAL_MAX - NEW_TOKENS) + _prompts(ORIGINAL_MAX + 12))
    # Chunked prefill: a prompt longer than the original length whose first chunks are not still
    # takes the long factors from its first token, as HF does running the prompt in one call.
    chunked = LLM(str(tmp_path), dtype="float32", device="cpu", num_kv_blocks=64, max_num_batched_tokens=24,
                  enable_chunked_prefill=True)
    _check(chunked, hf, _prompts(ORIGINAL_MAX + 12, ORIGINAL_MAX + 30))


def test_phi3_config_errors():
    base = {
        "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "vocab_size": 100, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    }
    cfg = ModelConfig.from_hf_dict({**base, "rope_scaling": {"type": "su", "short_factor": [1.0] * 8,
                                                             "long_factor": [2.0] * 8}})
    assert cfg.family == "phi3" and cfg.rope_scaling["rope_type"] == "longrope"
    with pytest.raises(ValueError, match="rope_scaling type 'yarn'"):
        ModelConfig.from_hf_dict({**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="longrope"):  # Llama has no LongRoPE
        ModelConfig.from_hf_dict({**base, "architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                  "rope_scaling": {"rope_type": "longrope"}})


def test_phi3_tensor_parallel_matches_tp1(tmp_path):
    """TP=2 on CPU processes (gloo): the fused tensors are read whole and each part cut to the
    rank's rows; greedy tokens and logprobs equal TP=1's."""
    _model(tmp_path, num_attention_heads=4, num_key_value_heads=2, sliding_window=8)
    assert_tp2_matches_tp1(str(tmp_path), _prompts(5, 17, 40))
