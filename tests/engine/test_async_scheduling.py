"""Asynchronous scheduling on CPU (forced on; its default is CUDA only): the engine launches
step N+1 before step N's tokens are back, and every output (tokens, logprobs, prompt logprobs,
text, finish reasons) equals the synchronous engine's exactly. Each test also checks that ahead
steps really ran (`num_ahead_steps`), so none can pass on the fallback path alone."""

from __future__ import annotations

import dataclasses
import random

import pytest

from kvserve import LLM, SamplingParams
from kvserve.runner.cuda_graphs import DecodeGraphs
from tests.conftest import TINY_VOCAB

GREEDY = dict(temperature=0.0, ignore_eos=True)


class CpuDecodeGraphs(DecodeGraphs):
    """The decode-graph static-input path on CPU (`_EagerGraph` replays): the CPU attention
    reads host sequence lengths, which a captured graph's metadata cannot know, so here they
    are read back from the static buffer at each replay."""

    def _metadata(self, bs: int, grouped: bool | None = None):
        md = super()._metadata(bs, grouped)
        lens = self.seq_lens[:bs].tolist()
        return dataclasses.replace(md, seq_lens_cpu=lens, max_seq_len=max(lens))


@pytest.fixture(scope="module")
def folder(tiny_llama):
    return str(tiny_llama[0])


def _llm(folder: str, async_: bool, graphs: bool = False, **kw) -> LLM:
    kw = {"num_kv_blocks": 128, **kw}
    llm = LLM(folder, dtype="float32", device="cpu", async_scheduling=async_, **kw)
    assert llm.engine.async_scheduling is async_
    if graphs:
        r = llm.engine.runner
        r.graphs = CpuDecodeGraphs(r, 8, eager=True)
        r.graphs.capture()
    return llm


def _prompts(n: int, seed: int = 0, lo: int = 3, hi: int = 40) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(3, TINY_VOCAB) for _ in range(rng.randint(lo, hi))]} for _ in range(n)]


def _summary(outs) -> list:
    """Everything a user sees of finished outputs."""
    res = []
    for o in outs:
        plp = [None if d is None else {t: (lp.logprob, lp.rank) for t, lp in d.items()} for d in o.prompt_logprobs or []]
        for c in o.outputs:
            lps = [{t: (lp.logprob, lp.rank) for t, lp in d.items()} for d in c.logprobs or []]
            res.append((o.request_id, c.index, c.token_ids, c.text, lps, c.cumulative_logprob,
                        c.finish_reason, c.stop_reason, plp))
    return res


def _compare(folder, prompts, params, graphs: bool = False, **kw):
    """Sync and async runs of the same batch; returns the async engine."""
    want = _summary(_llm(folder, False, graphs, **kw).generate(prompts, params, use_tqdm=False))
    llm = _llm(folder, True, graphs, **kw)
    got = _summary(llm.generate(prompts, params, use_tqdm=False))
    assert got == want
    assert llm.engine.num_ahead_steps > 0
    kv = llm.engine.scheduler.kv
    assert kv.num_free_blocks == kv.num_blocks
    return llm


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
def test_single_request(folder, graphs):
    llm = _compare(folder, _prompts(1), SamplingParams(max_tokens=20, logprobs=3, **GREEDY), graphs=graphs)
    assert llm.engine.num_ahead_steps >= 15
    assert (llm.engine.runner.num_graph_steps > 0) == graphs


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
def test_many_requests_finishing_at_different_steps(folder, graphs):
    prompts = _prompts(7, seed=1)
    params = [SamplingParams(max_tokens=2 + 3 * i, logprobs=2, **GREEDY) for i in range(7)]
    params[2] = SamplingParams(max_tokens=9, prompt_logprobs=2, **GREEDY)
    _compare(folder, prompts, params, graphs=graphs)


def test_stop_token_ids_end_requests_in_flight(folder):
    prompts = _prompts(4, seed=2)
    free = _llm(folder, False).generate(prompts, SamplingParams(max_tokens=16, **GREEDY), use_tqdm=False)
    # Each request stops on a token it would emit at a different step (ahead step N+1 then
    # holds a row for a request that N ended).
    params = [SamplingParams(max_tokens=16, temperature=0.0, stop_token_ids=[o.outputs[0].token_ids[2 + 3 * i]])
              for i, o in enumerate(free)]
    llm = _compare(folder, prompts, params)
    for o, p in zip(llm.generate(prompts, params, use_tqdm=False), params):
        assert o.outputs[0].finish_reason == "stop" and o.outputs[0].token_ids[-1] in p.stop_token_ids


def test_eos_ends_request_in_flight(folder):
    prompt = _prompts(1, seed=3)
    free = _llm(folder, False).generate(prompt, SamplingParams(max_tokens=12, **GREEDY), use_tqdm=False)[0]
    eos = free.outputs[0].token_ids[5]
    llm = _llm(folder, True)
    llm.engine.eos_token_ids = frozenset({eos})  # this model's EOS never comes up in 12 tokens
    want_llm = _llm(folder, False)
    want_llm.engine.eos_token_ids = frozenset({eos})
    sp = SamplingParams(max_tokens=12, temperature=0.0)
    want = _summary(want_llm.generate(prompt, sp, use_tqdm=False))
    got = _summary(llm.generate(prompt, sp, use_tqdm=False))
    assert got == want and len(got[0][2]) == free.outputs[0].token_ids.index(eos) + 1
    assert llm.engine.num_ahead_steps > 0


def test_stop_strings_finish_while_next_step_in_flight(folder):
    prompts = ["The quick brown fox", "Hello world! How are", "Paged attention keeps"]
    free = _llm(folder, False).generate(prompts, SamplingParams(max_tokens=20, **GREEDY), use_tqdm=False)
    stops = []
    for o in free:
        text = o.outputs[0].text
        stops.append(text[len(text) // 3 : len(text) // 3 + 2] or "zzz")
    params = [SamplingParams(max_tokens=20, stop=[s], **GREEDY) for s in stops]
    llm = _compare(folder, prompts, params)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert sum(o.outputs[0].finish_reason == "stop" for o in outs) >= 2
    for o, s, f in zip(outs, stops, free):
        c = o.outputs[0]
        if c.finish_reason == "stop":
            assert s not in c.text and len(c.token_ids) < len(f.outputs[0].token_ids)


def test_n_choices_and_seeded_sampling(folder):
    prompts = _prompts(3, seed=4)
    params = [
        SamplingParams(n=3, max_tokens=10, temperature=0.9, seed=11, ignore_eos=True, logprobs=1),
        SamplingParams(max_tokens=14, temperature=1.0, top_p=0.8, top_k=50, seed=5, ignore_eos=True),
        SamplingParams(n=2, max_tokens=8, **GREEDY),
    ]
    _compare(folder, prompts, params)


def test_penalties_mixed_in_fall_back_then_resume(folder):
    prompts = _prompts(4, seed=5)
    params = [SamplingParams(max_tokens=18, logprobs=1, **GREEDY) for _ in prompts]
    params[1] = SamplingParams(max_tokens=5, repetition_penalty=1.3, presence_penalty=0.5, **GREEDY)
    params[2] = SamplingParams(max_tokens=8, min_tokens=6, temperature=0.0)
    llm = _compare(folder, prompts, params)
    # Ahead steps only once requests 1 and 2 are done: fewer than the 17 decode steps.
    assert llm.engine.num_ahead_steps < 17


def test_small_cache_preempts_same_outputs(folder):
    prompts = _prompts(6, seed=6, lo=20, hi=60)
    params = SamplingParams(max_tokens=24, logprobs=1, **GREEDY)
    llm = _compare(folder, prompts, params, num_kv_blocks=16, max_model_len=256)
    assert llm.engine.scheduler.num_preemptions > 0


def test_max_model_len_reached(folder):
    prompts = _prompts(3, seed=7, lo=30, hi=40)
    llm = _compare(folder, prompts, SamplingParams(temperature=0.0, ignore_eos=True), max_model_len=48)
    for o in llm.generate(prompts, SamplingParams(temperature=0.0, ignore_eos=True), use_tqdm=False):
        assert len(o.prompt_token_ids) + len(o.outputs[0].token_ids) == 48
        assert o.outputs[0].finish_reason == "length"


def _drive(llm: LLM, script: dict[int, list], max_steps: int = 200) -> list:
    """Step the engine by hand; `script[k]` holds callables run on the engine before step k.
    Returns every step's outputs (summaries, in order)."""
    eng = llm.engine
    seen = []
    for k in range(max_steps):
        for act in script.get(k, []):
            act(eng)
        if not eng.has_unfinished_requests() and k > max(script):
            break
        seen.append(_summary(eng.step()))
    return seen


def test_new_requests_mid_decode_and_abort_in_flight(folder):
    prompts = _prompts(4, seed=8)
    sp = SamplingParams(max_tokens=16, logprobs=1, **GREEDY)
    in_flight_at_abort = []

    def add(i):
        return lambda eng: eng.add_request(f"r{i}", prompts[i], sp)

    def abort(eng):
        if eng.async_scheduling:  # an ahead step holding a row of r1 is in flight
            so = eng._inflight[0]
            in_flight_at_abort.append("r1" in so.num_scheduled_tokens and eng.num_ahead_steps > 0)
        eng.abort_request("r1")

    script = {0: [add(0), add(1)], 4: [add(2)], 7: [abort], 9: [add(3)]}
    # The baseline overlaps like the CUDA engine without async scheduling (step k's outputs
    # come from the call that completes it), so the two agree step by step.
    overlapped = _llm(folder, False)
    overlapped.engine._overlap = True
    want = _drive(overlapped, script)
    llm = _llm(folder, True)
    got = _drive(llm, script)
    assert got == want
    assert overlapped.engine.num_ahead_steps == 0
    # And request by request with the plain synchronous engine (tokens and text: there the
    # batches are composed differently, which moves logprobs in the last float bits).
    last = lambda steps: {row[0]: row[2:4] for step in steps for row in step}  # noqa: E731
    assert last(got) == last(_drive(_llm(folder, False), script))
    assert in_flight_at_abort == [True]
    assert llm.engine.num_ahead_steps > 10
    kv = llm.engine.scheduler.kv
    assert kv.num_free_blocks == kv.num_blocks


def test_default_is_off_on_cpu(folder):
    llm = LLM(folder, dtype="float32", device="cpu", num_kv_blocks=32)
    assert llm.engine.async_scheduling is False
    llm.generate(_prompts(1), SamplingParams(max_tokens=4, **GREEDY), use_tqdm=False)
    assert llm.engine.num_ahead_steps == 0


def test_cli_flag():
    from kvserve.entrypoints.cli import add_engine_args, engine_kwargs
    import argparse

    p = argparse.ArgumentParser()
    add_engine_args(p)
    assert engine_kwargs(p.parse_args([]))["async_scheduling"] is None
    assert engine_kwargs(p.parse_args(["--async-scheduling"]))["async_scheduling"] is True
    assert engine_kwargs(p.parse_args(["--no-async-scheduling"]))["async_scheduling"] is False
