"""Draft-model proposer on tiny random models sharing a vocabulary: greedy output equals plain
decoding; a draft identical to the target has every draft accepted (its own paged KV cache is
right across rejections and catch-ups); bad draft models are refused naming the field."""

from __future__ import annotations

import random

import pytest

from kvserve import LLM, SamplingParams
from tests.conftest import TINY_VOCAB

GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


def _prompts(n=4, seed=0):
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(3, TINY_VOCAB) for _ in range(rng.randint(3, 40))]} for _ in range(n)]


def _tokens(llm, prompts, params=GREEDY):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def _spec(target, draft, **kw):
    cfg = {"method": "draft_model", "model": draft, "num_speculative_tokens": 3, "backoff": False}
    return LLM(target, dtype="float32", device="cpu", num_kv_blocks=128, speculative_config=cfg, **kw)


def test_draft_model_greedy_identical(tiny_model_factory):
    target = str(tiny_model_factory("llama")[0])
    draft = str(tiny_model_factory("smollm2")[0])  # another architecture, same vocabulary
    plain = LLM(target, dtype="float32", device="cpu", num_kv_blocks=128)
    llm = _spec(target, draft)
    assert _tokens(llm, _prompts()) == _tokens(plain, _prompts())
    st = llm.engine.stats()
    assert st["spec_draft_tokens"] > 0
    # sampled requests run through the rejection rule and finish
    outs = llm.generate(_prompts(2), SamplingParams(max_tokens=8, temperature=1.0, seed=3, ignore_eos=True), use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 8 for o in outs)


def test_draft_equal_to_target_accepts_everything(tiny_model_factory):
    target = str(tiny_model_factory("llama")[0])
    llm = _spec(target, target)
    plain = LLM(target, dtype="float32", device="cpu", num_kv_blocks=128)
    assert _tokens(llm, _prompts(3, seed=2)) == _tokens(plain, _prompts(3, seed=2))
    st = llm.engine.stats()
    assert st["spec_draft_tokens"] > 0
    assert st["spec_acceptance_rate"] > 0.95, st


def test_draft_model_vocab_mismatch(tiny_model_factory):
    target = str(tiny_model_factory("llama")[0])
    other = str(tiny_model_factory("llama_kv1")[0])  # 3 more vocabulary ids
    with pytest.raises(ValueError, match="speculative_config.model"):
        _spec(target, other)


def test_config_validation():
    from kvserve.spec_decode.config import SpeculativeConfig

    for bad, field in [
        ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
        ({"method": "eagle"}, "method"),
        ({"num_speculative_tokens": 3}, "method"),
        ({"method": "ngram", "prompt_lookup_min": 4, "prompt_lookup_max": 2}, "prompt_lookup_min"),
        ({"method": "ngram", "foo": 1}, "foo"),
        ({"method": "draft_model"}, "model"),
        ({"method": "ngram", "disable_by_batch_size": 1}, "disable_by_batch_size"),
        ({"method": "ngram", "disable_by_batch_size": "8"}, "disable_by_batch_size"),
        ("{not json", "JSON"),
    ]:
        with pytest.raises(ValueError, match=field):
            SpeculativeConfig.parse(bad)
    cfg = SpeculativeConfig.parse('{"method": "ngram", "num_speculative_tokens": 7}')
    assert cfg.num_speculative_tokens == 7
