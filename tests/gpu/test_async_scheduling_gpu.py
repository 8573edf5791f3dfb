"""Asynchronous scheduling on CUDA: step N+1 is launched before step N's tokens are back (its
input ids are gathered on the device from N's sampled ids, into the decode graph's static
buffer or the eager inputs). Greedy tokens and logprobs of a tiny random fp32 Llama equal the
synchronous engine's, with CUDA graphs and eagerly, through stop tokens, stop strings, seeded
sampling, preemption and new arrivals; and at TP=2 (2 GPUs: ids broadcast over NCCL) equal
TP=1. Every test checks that ahead steps ran.

    python -m pytest tests/gpu/test_async_scheduling_gpu.py -q
"""

from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from kvserve import LLM, SamplingParams  # noqa: E402

COMMON = dict(device="cuda", dtype="float32", max_model_len=256, max_num_seqs=16, gpu_memory_utilization=0.3)


def _prompts(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(3, 500) for _ in range(rng.randrange(4, 70))]} for _ in range(n)]


def _params(n: int) -> list[SamplingParams]:
    out = [SamplingParams(max_tokens=8 + 5 * i, temperature=0.0, ignore_eos=True, logprobs=2) for i in range(n)]
    out[1] = SamplingParams(max_tokens=20, temperature=0.9, top_p=0.9, seed=3, ignore_eos=True, logprobs=1)
    return out


def _summary(outs):
    return [
        (c.token_ids, c.finish_reason, c.text,
         [{t: lp.logprob for t, lp in d.items()} for d in c.logprobs or []])
        for o in outs for c in o.outputs
    ]


def _assert_same(got, want, tol: float = 1e-5) -> None:
    assert [g[:3] for g in got] == [w[:3] for w in want]  # tokens, finish reasons, text
    for g, w in zip(got, want):
        assert len(g[3]) == len(w[3])
        for gl, wl in zip(g[3], w[3]):
            assert gl.keys() == wl.keys()
            for t in gl:
                assert gl[t] == pytest.approx(wl[t], abs=tol)


@pytest.fixture(scope="module")
def folder(tiny_model_factory):
    return str(tiny_model_factory("llama")[0])


@pytest.mark.parametrize("graphs", [True, False], ids=["graphs", "eager"])
def test_async_equals_sync(folder, graphs):
    prompts, params = _prompts(6, seed=1), _params(6)
    sync = LLM(folder, enforce_eager=not graphs, async_scheduling=False, **COMMON)
    want = _summary(sync.generate(prompts, params, use_tqdm=False))
    assert sync.engine.num_ahead_steps == 0
    llm = LLM(folder, enforce_eager=not graphs, **COMMON)
    assert llm.engine.async_scheduling is True  # the default on CUDA
    got = _summary(llm.generate(prompts, params, use_tqdm=False))
    _assert_same(got, want)
    eng = llm.engine
    assert eng.num_ahead_steps >= 20
    assert (eng.runner.num_graph_steps > 0) == graphs
    if graphs:  # the host is off the GPU's path: one graph per step, not split pieces
        assert eng.runner.graphs.split is False
    assert eng.scheduler.kv.num_free_blocks == eng.scheduler.kv.num_blocks
    # A stop token and a stop string end requests while an ahead step is in flight.
    stop_tok = want[0][0][3]
    stops = [SamplingParams(max_tokens=30, temperature=0.0, stop_token_ids=[stop_tok], logprobs=1),
             SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, stop=["e"]),
             SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)]
    texts = ["The quick brown fox", "Hello world! How are", "Paged attention keeps"]
    before = eng.num_ahead_steps
    _assert_same(_summary(llm.generate(texts, stops, use_tqdm=False)),
                 _summary(sync.generate(texts, stops, use_tqdm=False)))
    assert eng.num_ahead_steps > before


def test_async_preemption_and_arrivals(folder):
    """A KV pool of 24 blocks for 8 requests (preemption), and requests added mid-decode."""
    prompts = _prompts(8, seed=2)
    sp = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, logprobs=1)
    res = {}
    for async_ in (False, True):
        llm = LLM(folder, num_kv_blocks=24, async_scheduling=async_, **COMMON)
        eng = llm.engine
        finals = {}
        for i in range(4):
            eng.add_request(f"r{i}", prompts[i], sp)
        k = 0
        while eng.has_unfinished_requests() or k < 12:
            if k == 10:
                for i in range(4, 8):
                    eng.add_request(f"r{i}", prompts[i], sp)
            for o in eng.step():
                finals[o.request_id] = o
            k += 1
        res[async_] = (_summary(finals[f"r{i}"] for i in range(8)), eng)
    (want, _), (got, eng) = res[False], res[True]
    assert [g[0] for g in got] == [w[0] for w in want]
    assert eng.scheduler.num_preemptions > 0 and eng.num_ahead_steps > 0


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize("graphs", [True, False], ids=["graphs", "eager"])
def test_tp2_async_equals_tp1(folder, graphs):
    prompts, params = _prompts(5, seed=3), _params(5)
    want = _summary(LLM(folder, enforce_eager=not graphs, async_scheduling=False, **COMMON)
                    .generate(prompts, params, use_tqdm=False))
    llm = LLM(folder, tensor_parallel_size=2, enforce_eager=not graphs, **COMMON)
    try:
        assert llm.engine.async_scheduling is True
        got = _summary(llm.generate(prompts, params, use_tqdm=False))
        ahead = llm.engine.num_ahead_steps
        graph_steps = llm.engine.runner.num_graph_steps
    finally:
        llm.engine.shutdown()
    _assert_same(got, want, tol=1e-4)
    assert ahead >= 15
    assert (graph_steps > 0) == graphs
