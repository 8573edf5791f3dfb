"""Speculation with the decode-graph path, asynchronous scheduling and the back-off, on CPU:

- verify steps replay the decode graph of their row count (the static-input path, through
  `_EagerGraph` replays as in tests/engine/test_async_scheduling.py) and give plain greedy output;
- asynchronous scheduling (forced on) with speculation: steps go ahead while every request is
  backed off, verify steps run synchronously, output equals plain;
- the back-off, deterministically: a proposer whose drafts are never accepted is asked for
  drafts in three steps (batch 1), then at the probes only (after 8, then 64 backed-off steps),
  each of one draft token; one whose first drafts are accepted half the time is never backed
  off; in a batch of three every miss starts a cool-down;
- `disable_by_batch_size`: no drafts while that many requests run, drafts again below it, and
  asynchronous scheduling goes ahead in the wide steps.
"""

from __future__ import annotations

import random

import pytest

from kvserve import LLM, SamplingParams
from kvserve.spec_decode.config import SpeculativeConfig
from kvserve.spec_decode.decoder import SpecDecoder, max_step_rows
from kvserve.spec_decode.oracle import OracleProposer
from tests.conftest import TINY_VOCAB
from tests.engine.test_async_scheduling import CpuDecodeGraphs

K = 4
NGRAM = {"method": "ngram", "num_speculative_tokens": K, "prompt_lookup_min": 1, "prompt_lookup_max": 3}


class RecordingGraphs(CpuDecodeGraphs):
    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.replayed: list[int] = []

    def replay(self, bs: int, verify: bool = False):
        self.replayed.append(bs)
        return super().replay(bs, verify)


@pytest.fixture(scope="module")
def folder(tiny_llama):
    return str(tiny_llama[0])


def _prompts(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        body = [rng.randrange(3, TINY_VOCAB) for _ in range(rng.randint(3, 16))]
        out.append({"prompt_token_ids": body * rng.randint(1, 3)})  # repeats: n-gram hits
    return out


def _llm(folder: str, spec: dict | None = None, graphs: bool = False, async_: bool = False, **kw) -> LLM:
    llm = LLM(folder, dtype="float32", device="cpu", num_kv_blocks=128, async_scheduling=async_,
              speculative_config=spec, **kw)
    r = llm.engine.runner
    r.model.cpu_decoder = False  # op by op: the one-call fp32 stack does not take verify rows
    if graphs:
        r.graphs = RecordingGraphs(r, 8, eager=True, verify_width=K + 1, max_rows=max_step_rows(8, K))
        r.graphs.capture()
    return llm


def _tokens(llm: LLM, prompts, max_tokens: int = 40) -> list[list[int]]:
    sp = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]


def _oracle(llm: LLM, prompts, want, acceptance: float, backoff: bool = True) -> OracleProposer:
    """Replace the engine's proposer with one forced to `acceptance`."""
    refs = {tuple(p["prompt_token_ids"]): w for p, w in zip(prompts, want)}
    prop = OracleProposer(refs, acceptance, TINY_VOCAB, seed=1)
    llm.engine.spec = SpecDecoder(SpeculativeConfig(num_speculative_tokens=K, backoff=backoff), prop)
    return prop


def _draft_steps(eng) -> list[tuple[int, int]]:
    """Step the engine until it is done: (step number, draft tokens it verified) for each step
    that verified drafts."""
    out, step = [], 0
    while eng.has_unfinished_requests():
        before = eng.scheduler.num_draft_tokens
        eng.step()
        step += 1
        if eng.scheduler.num_draft_tokens > before:
            out.append((step, eng.scheduler.num_draft_tokens - before))
    return out


@pytest.fixture(scope="module")
def plain(folder):
    return _llm(folder)


def test_graph_ladder_holds_verify_widths(folder):
    llm = _llm(folder, NGRAM, graphs=True)
    sizes = llm.engine.runner.graphs.sizes
    assert {1, 2, 4, 8, 5, 10, 20, 40} <= set(sizes)
    assert sizes[-1] == max_step_rows(8, K) == 40


def test_verify_steps_replay_graphs(folder, plain):
    prompts = _prompts(4)
    want = _tokens(plain, prompts)
    llm = _llm(folder, {**NGRAM, "backoff": False}, graphs=True, max_num_seqs=8)
    assert _tokens(llm, prompts) == want
    st = llm.engine.stats()
    assert st["spec_accepted_tokens"] > 0
    g = llm.engine.runner.graphs
    # some replays served more rows than requests: verify steps (at most 4 requests here)
    assert any(bs > 4 for bs in g.replayed)
    kv = llm.engine.scheduler.kv
    assert kv.num_free_blocks == kv.num_blocks


def test_verify_graphs_with_oracle_full_acceptance(folder, plain):
    """Every draft right: each verify step is k + 1 rows per request (sizes 5, 10, ...)."""
    prompts = _prompts(2, seed=4)
    want = _tokens(plain, prompts)
    llm = _llm(folder, NGRAM, graphs=True)
    prop = _oracle(llm, prompts, want, 1.0, backoff=False)
    assert _tokens(llm, prompts) == want
    st = llm.engine.stats()
    assert st["spec_acceptance_rate"] == 1.0 and prop.num_drafts > 0
    assert 10 in llm.engine.runner.graphs.replayed


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
def test_async_scheduling_with_backed_off_speculation(folder, plain, graphs):
    """Nothing accepted: after the first probes every request is backed off and steps go
    ahead again; output equals plain decoding."""
    prompts = _prompts(3, seed=2)
    want = _tokens(plain, prompts, 60)
    llm = _llm(folder, NGRAM, graphs=graphs, async_=True)
    assert llm.engine.async_scheduling
    prop = _oracle(llm, prompts, want, 0.0)
    assert _tokens(llm, prompts, 60) == want
    st = llm.engine.stats()
    assert st["spec_draft_tokens"] > 0 and st["spec_accepted_tokens"] == 0
    assert llm.engine.num_ahead_steps > 30
    assert prop.num_calls <= 3 * 3  # a few probes, not one call per step
    kv = llm.engine.scheduler.kv
    assert kv.num_free_blocks == kv.num_blocks


def test_async_scheduling_with_accepting_speculation(folder, plain):
    prompts = _prompts(4, seed=3)
    want = _tokens(plain, prompts)
    llm = _llm(folder, NGRAM, async_=True)
    assert _tokens(llm, prompts) == want
    assert llm.engine.stats()["spec_accepted_tokens"] > 0


def test_backoff_stops_proposing_when_nothing_is_accepted(folder, plain):
    """One request, drafts always wrong: one-token drafts in its first three decode steps (at
    batch 1 the threshold is 0.3 / 1.3 = 0.23 with the CPU's row cost 0.3; the misses leave the
    hit rate at 1 in 3, then 1 in 4, the prior included), then 8 steps backed off (1 in 5), a
    probe, 64 steps backed off, a probe; nothing else in 100 steps."""
    prompts = _prompts(1, seed=5)
    want = _tokens(plain, prompts, 100)
    llm = _llm(folder, NGRAM)
    prop = _oracle(llm, prompts, want, 0.0)
    eng = llm.engine
    eng.add_request("r", prompts[0], SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))
    drafted_at = [step for step, _ in _draft_steps(eng)]
    assert eng.scheduler.num_draft_tokens == len(drafted_at) == 5  # one draft token each
    gaps = [b - a for a, b in zip(drafted_at, drafted_at[1:])]
    assert gaps == [1, 1, 9, 65]  # three steps in a row, then 8 and 64 backed-off steps
    assert eng.spec.num_backed_off >= 8 + 64
    assert prop.num_calls == 5


class _Alternating(OracleProposer):
    """First draft right on every other call, wrong on the rest (a request that copies in
    short spans with misses between them)."""

    def propose(self, requests, max_tokens):
        self.acceptance = 1.0 if self.num_calls % 2 == 0 else 0.0
        return super().propose(requests, max_tokens)


def test_backoff_keeps_drafting_through_misses_while_first_drafts_pay(folder, plain):
    """Half the first drafts accepted (above batch 1's threshold): a miss never starts a cool-down,
    every step after the first drafts, and the output stays plain greedy."""
    prompts = _prompts(1, seed=8)
    want = _tokens(plain, prompts, 60)
    llm = _llm(folder, NGRAM)
    refs = {tuple(p["prompt_token_ids"]): w for p, w in zip(prompts, want)}
    prop = _Alternating(refs, 1.0, TINY_VOCAB, seed=1)
    llm.engine.spec = SpecDecoder(SpeculativeConfig(num_speculative_tokens=K), prop)
    eng = llm.engine
    eng.add_request("r", prompts[0], SamplingParams(max_tokens=60, temperature=0, ignore_eos=True))
    steps = drafted = 0
    out = None
    while eng.has_unfinished_requests():
        before = eng.scheduler.num_draft_tokens
        for o in eng.step():
            out = o
        steps += 1
        drafted += eng.scheduler.num_draft_tokens > before
    assert eng.spec.num_backed_off == 0
    assert drafted >= steps - 2  # the prefill step and the last token's step draft nothing
    assert list(out.outputs[0].token_ids) == want[0]


def test_backoff_grows_drafts_when_all_are_accepted(folder, plain):
    """The draft length doubles after each fully accepted step: 1, 2, 4, 4, ..."""
    prompts = _prompts(1, seed=6)
    want = _tokens(plain, prompts, 30)
    llm = _llm(folder, NGRAM)
    _oracle(llm, prompts, want, 1.0)
    eng = llm.engine
    eng.add_request("r", prompts[0], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
    sizes = []
    while eng.has_unfinished_requests():
        before = eng.scheduler.num_draft_tokens
        eng.step()
        if eng.scheduler.num_draft_tokens > before:
            sizes.append(eng.scheduler.num_draft_tokens - before)
    assert sizes[:4] == [1, 2, 4, 4]


def test_fixed_draft_length_keeps_k_and_the_cooldown(folder, plain):
    """`SpecDecoder.adapt_length = False` (benchmarks' fixed-k comparison): every proposal is k
    long (bounded by max_tokens at the end), the cool-down after a fully rejected step stays, and
    greedy output equals plain decoding."""
    prompts = _prompts(1, seed=7)
    want = _tokens(plain, prompts, 30)
    llm = _llm(folder, NGRAM)
    _oracle(llm, prompts, want, 1.0)
    eng = llm.engine
    eng.spec.adapt_length = False
    k = eng.spec.config.num_speculative_tokens
    eng.add_request("r", prompts[0], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
    sizes, out = [], None
    while eng.has_unfinished_requests():
        before = eng.scheduler.num_draft_tokens
        for o in eng.step():
            out = o
        if eng.scheduler.num_draft_tokens > before:
            sizes.append(eng.scheduler.num_draft_tokens - before)
    assert sizes[0] == k and all(s == k for s in sizes[:-1]) and 1 <= sizes[-1] <= k
    assert list(out.outputs[0].token_ids) == want[0]

    llm = _llm(folder, NGRAM)  # nothing accepted: drafts in 3 steps, then 8 and 64 apart, k each
    _oracle(llm, prompts, _tokens(plain, prompts, 100), 0.0)
    eng = llm.engine
    eng.spec.adapt_length = False
    eng.add_request("r", prompts[0], SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))
    drafted_at = [step for step, _ in _draft_steps(eng)]
    assert [b - a for a, b in zip(drafted_at, drafted_at[1:])] == [1, 1, 9, 65]
    assert eng.scheduler.num_draft_tokens == 5 * k


def test_disable_by_batch_size(folder, plain):
    """Three requests with disable_by_batch_size 3: the steps with all three running have no
    drafts (and, with asynchronous scheduling, go ahead); once one has finished the others
    speculate; output equals plain greedy."""
    prompts = _prompts(3, seed=9)
    lens = [12, 40, 40]
    want = [_tokens(plain, [p], n)[0] for p, n in zip(prompts, lens)]
    llm = _llm(folder, NGRAM, async_=True)
    refs = {tuple(p["prompt_token_ids"]): w for p, w in zip(prompts, want)}
    prop = OracleProposer(refs, 1.0, TINY_VOCAB, seed=1)
    llm.engine.spec = SpecDecoder(SpeculativeConfig(num_speculative_tokens=K, disable_by_batch_size=3), prop)
    eng = llm.engine
    for i, (p, n) in enumerate(zip(prompts, lens)):
        eng.add_request(str(i), p, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
    wide_drafts = narrow_drafts = 0
    outs = {}
    while eng.has_unfinished_requests():
        wide = len(eng.scheduler.running) == 3
        before = eng.scheduler.num_draft_tokens
        for o in eng.step():
            outs[o.request_id] = list(o.outputs[0].token_ids)
        if wide:
            wide_drafts += eng.scheduler.num_draft_tokens - before
        else:
            narrow_drafts += eng.scheduler.num_draft_tokens - before
    assert wide_drafts == 0 and narrow_drafts > 0
    assert eng.num_ahead_steps > 0
    assert [outs[str(i)] for i in range(3)] == want


def test_backoff_in_a_wide_batch_cools_down_after_every_miss(folder, plain):
    """Three requests, drafts always wrong: at batch 3 the threshold is 0.9 / 1.9 = 0.47, above
    the 1 in 3 a first miss leaves, so each request's first miss already starts the 8-step
    cool-down (the rule of a compute-bound batch)."""
    prompts = _prompts(3, seed=10)
    want = _tokens(plain, prompts, 20)
    llm = _llm(folder, NGRAM)
    prop = _oracle(llm, prompts, want, 0.0)
    eng = llm.engine
    for i, p in enumerate(prompts):
        eng.add_request(str(i), p, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    drafted_at = _draft_steps(eng)
    assert [n for _, n in drafted_at] == [3, 3]  # one token each, at the first step and 9 later
    assert drafted_at[1][0] - drafted_at[0][0] == 9
    assert prop.num_calls == 2


def test_backoff_threshold_takes_the_platforms_row_cost(folder, monkeypatch):
    """The engine's spec decoder prices a draft row at its platform's `draft_row_cost`: with a
    tiny cost (a GPU's 0.03) a lone request whose drafts always miss keeps drafting through
    more misses before its first cool-down than at the CPU's 0.3 (three)."""
    from kvserve.platform.base import Platform

    monkeypatch.setattr(Platform, "draft_row_cost", 0.03)
    llm = _llm(folder, NGRAM)
    assert llm.engine.spec.row_cost == 0.03
    prompts = _prompts(1, seed=11)
    refs = {tuple(p["prompt_token_ids"]): w for p, w in zip(prompts, [[0] * 40])}
    prop = OracleProposer(refs, 0.0, TINY_VOCAB, seed=1)
    llm.engine.spec.proposer = prop
    llm.engine.add_request("r", prompts[0], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    steps = [step for step, _ in _draft_steps(llm.engine)]
    # threshold 0.03 / 1.03: misses until 1 / (2 + m) < 0.029, i.e. 33 drafts in a row
    assert steps == list(range(steps[0], steps[0] + len(steps))) and len(steps) >= 30
