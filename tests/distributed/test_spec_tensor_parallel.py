"""Speculative decoding under tensor parallelism on CPU (gloo): greedy output at TP=2 with
speculation equals TP=1 without it, for the n-gram proposer and for a draft model (loaded and
run whole on rank 0); rank 0 verifies and broadcasts the emitted tokens to the worker."""

from __future__ import annotations

import random

import pytest

from kvserve import LLM, SamplingParams
from kvserve.distributed import parallel_state as ps
from tests.conftest import TINY_VOCAB

COMMON = dict(device="cpu", dtype="float32", num_kv_blocks=64, max_model_len=128)


def _prompts() -> list[dict]:
    rng = random.Random(11)
    out = []
    for n in (5, 9, 14):
        body = [rng.randrange(3, TINY_VOCAB) for _ in range(n)]
        out.append({"prompt_token_ids": body * 3})  # repeats: n-gram hits
    return out


def _params() -> list[SamplingParams]:
    return [
        SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=2),
        SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, repetition_penalty=1.2),
    ]


def _run(llm: LLM):
    outs = llm.generate(_prompts(), _params(), use_tqdm=False)
    return [
        (o.outputs[0].token_ids, [{t: lp.logprob for t, lp in d.items()} for d in o.outputs[0].logprobs or []])
        for o in outs
    ]


@pytest.fixture(scope="module")
def want(tiny_model_factory):
    return _run(LLM(str(tiny_model_factory("llama")[0]), **COMMON))


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_tp2_with_speculation_matches_tp1_plain(tiny_model_factory, want, method):
    folder = str(tiny_model_factory("llama")[0])
    cfg = {"method": method, "num_speculative_tokens": 3, "backoff": False}
    if method == "ngram":
        cfg.update(prompt_lookup_min=1, prompt_lookup_max=3)
    else:
        cfg["model"] = str(tiny_model_factory("smollm2")[0])  # same vocabulary
    llm = LLM(folder, tensor_parallel_size=2, speculative_config=cfg, **COMMON)
    try:
        assert ps.get_tp().size == 2
        got = _run(llm)
        st = llm.engine.stats()
        # a seeded random request runs through rank 0's rejection rule and finishes
        sampled = llm.generate(_prompts()[:1], SamplingParams(max_tokens=10, temperature=0.9, seed=3, ignore_eos=True),
                               use_tqdm=False)
        assert len(sampled[0].outputs[0].token_ids) == 10
        # a second batch on the same engine (the worker's copies stayed in step)
        again = _run(llm)
    finally:
        llm.engine.shutdown()
    assert ps.get_tp().size == 1
    assert st["spec_verify_steps"] > 0 and st["spec_draft_tokens"] > 0
    if method == "ngram":
        assert st["spec_accepted_tokens"] > 0
    for (g_ids, g_lp), (w_ids, w_lp) in zip(got, want):
        assert g_ids == w_ids
        assert len(g_lp) == len(w_lp)
        for gd, wd in zip(g_lp, w_lp):
            assert gd.keys() == wd.keys()
            for t in wd:
                assert gd[t] == pytest.approx(wd[t], abs=1e-4)
    assert [g for g, _ in again] == [w for w, _ in want]
