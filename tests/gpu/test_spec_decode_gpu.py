"""Speculative decoding on CUDA: verify steps replay the decode CUDA graph of their row count
(a graph per batch size and verify width k + 1), asynchronous scheduling stays on (steps go
ahead while every request is backed off), and greedy ids equal plain decoding's; at TP=2
(2 GPUs) with speculation equal TP=1 without.

    python -m pytest tests/gpu/test_spec_decode_gpu.py -q
"""

from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from kvserve import LLM, SamplingParams  # noqa: E402
from kvserve.spec_decode.config import SpeculativeConfig  # noqa: E402
from kvserve.spec_decode.decoder import SpecDecoder  # noqa: E402
from kvserve.spec_decode.oracle import OracleProposer  # noqa: E402

K = 4
COMMON = dict(device="cuda", dtype="float32", max_model_len=256, max_num_seqs=8, gpu_memory_utilization=0.3)
NGRAM = {"method": "ngram", "num_speculative_tokens": K, "prompt_lookup_min": 1, "prompt_lookup_max": 3}


def _prompts(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        body = [rng.randrange(3, 500) for _ in range(rng.randrange(4, 24))]
        out.append({"prompt_token_ids": body * rng.randint(1, 3)})
    return out


def _tokens(llm: LLM, prompts, max_tokens: int = 40) -> list[list[int]]:
    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]


def _record_replays(llm: LLM) -> list[int]:
    g = llm.engine.runner.graphs
    seen: list[int] = []
    replay = g.replay

    def rec(bs: int, verify: bool = False):
        seen.append(bs)
        return replay(bs, verify)

    g.replay = rec
    return seen


def _oracle(llm: LLM, prompts, want, acceptance: float, backoff: bool) -> None:
    refs = {tuple(p["prompt_token_ids"]): w for p, w in zip(prompts, want)}
    prop = OracleProposer(refs, acceptance, llm.engine.model_config.vocab_size, seed=1)
    llm.engine.spec = SpecDecoder(SpeculativeConfig(num_speculative_tokens=K, backoff=backoff), prop)


@pytest.fixture(scope="module")
def folder(tiny_model_factory):
    return str(tiny_model_factory("llama")[0])


@pytest.fixture(scope="module")
def plain(folder):
    return LLM(folder, **COMMON)


def test_ladder_and_async_defaults(folder):
    llm = LLM(folder, speculative_config=NGRAM, **COMMON)
    eng = llm.engine
    assert eng.async_scheduling  # no longer turned off by speculation
    assert {1, 5, 10, 20, 40} <= set(eng.runner.graphs.sizes)


@pytest.mark.parametrize("async_", [True, False], ids=["async", "sync"])
def test_ngram_greedy_equals_plain_with_graphs(folder, plain, async_):
    prompts = _prompts(4)
    want = _tokens(plain, prompts)
    llm = LLM(folder, speculative_config={**NGRAM, "backoff": False}, async_scheduling=async_, **COMMON)
    seen = _record_replays(llm)
    assert _tokens(llm, prompts) == want
    assert llm.engine.stats()["spec_accepted_tokens"] > 0
    assert any(bs > 4 for bs in seen)  # verify steps of more rows than requests replayed graphs


def test_oracle_full_acceptance_graph_widths(folder, plain):
    prompts = _prompts(2, seed=3)
    want = _tokens(plain, prompts)
    llm = LLM(folder, speculative_config=NGRAM, **COMMON)
    _oracle(llm, prompts, want, 1.0, backoff=False)
    seen = _record_replays(llm)
    assert _tokens(llm, prompts) == want
    assert llm.engine.stats()["spec_acceptance_rate"] == 1.0
    assert 10 in seen  # 2 requests x (k + 1) rows


@pytest.mark.parametrize("mode", ["grouped", "rows"])
def test_verify_attention_modes_equal_plain(folder, plain, mode, monkeypatch):
    """KVSERVE_VERIFY_ATTN: verify rows attended by request (default) or row by row."""
    monkeypatch.setenv("KVSERVE_VERIFY_ATTN", mode)
    prompts = _prompts(3, seed=11)
    want = _tokens(plain, prompts)
    llm = LLM(folder, speculative_config=NGRAM, **COMMON)
    assert llm.engine.runner.graphs.group_verify == (mode == "grouped")
    _oracle(llm, prompts, want, 1.0, backoff=False)
    seen = _record_replays(llm)
    assert _tokens(llm, prompts) == want
    assert 20 in seen  # 3 requests x (k + 1) rows, padded to the verify size 20


def test_async_ahead_steps_while_backed_off(folder, plain):
    prompts = _prompts(3, seed=5)
    want = _tokens(plain, prompts, 80)
    llm = LLM(folder, speculative_config=NGRAM, **COMMON)
    _oracle(llm, prompts, want, 0.0, backoff=True)
    assert _tokens(llm, prompts, 80) == want
    st = llm.engine.stats()
    assert st["spec_draft_tokens"] > 0 and st["spec_accepted_tokens"] == 0
    assert llm.engine.num_ahead_steps > 40


def test_eager_spec_equals_plain(folder, plain):
    prompts = _prompts(3, seed=7)
    llm = LLM(folder, speculative_config={**NGRAM, "backoff": False}, enforce_eager=True, **COMMON)
    assert _tokens(llm, prompts) == _tokens(plain, prompts)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_tp2_spec_equals_tp1_plain(folder, plain):
    prompts = _prompts(3, seed=9)
    want = _tokens(plain, prompts)
    llm = LLM(folder, tensor_parallel_size=2, speculative_config={**NGRAM, "backoff": False}, **COMMON)
    try:
        got = _tokens(llm, prompts)
        st = llm.engine.stats()
    finally:
        llm.engine.shutdown()
    assert got == want
    assert st["spec_accepted_tokens"] > 0


def test_batched_rejection_on_cuda_equals_one_request_at_a_time():
    """`rejection.verify` on CUDA tensors with CUDA generators: the batched draws give each
    request what verifying it alone gives (greedy, point-mass and draft-model drafts)."""
    from kvserve.core.sampling_params import SamplingParams as SP
    from kvserve.spec_decode.rejection import VerifyRow, verify

    gen = torch.Generator(device="cuda").manual_seed(0)
    vocab, specs = 1000, [(3, False, True), (2, False, False), (0, False, False), (4, True, False), (3, False, False)]
    rows, args, start = [], [], 0
    for k, q, greedy in specs:
        lg = torch.randn(k + 1, vocab, device="cuda", generator=gen) * 3
        rows.append(lg)
        drafts = lg[:k].argmax(-1).tolist()
        if k > 1:
            drafts[1] = int(lg[1].argmin())
        probs = torch.softmax(torch.randn(k, vocab, device="cuda", generator=gen), -1) if q else None
        args.append((start, drafts, SP(temperature=0.0) if greedy else SP(temperature=0.8, top_p=0.95, seed=1), probs))
        start += k + 1
    logits = torch.cat(rows)
    for trial in range(10):
        gens = [torch.Generator(device="cuda").manual_seed(10 * trial + i) for i in range(len(specs))]
        got = verify(logits, [VerifyRow(s, d, sp, g, q) for (s, d, sp, q), g in zip(args, gens)], None)
        gens = [torch.Generator(device="cuda").manual_seed(10 * trial + i) for i in range(len(specs))]
        alone = [verify(logits, [VerifyRow(s, d, sp, g, q)], None)[0] for (s, d, sp, q), g in zip(args, gens)]
        assert got == alone
