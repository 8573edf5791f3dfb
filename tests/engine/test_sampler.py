"""The batched sampler against plain reference implementations: penalties, logit_bias and
min_tokens on fixed logits; top-k / top-p / min-p truncation and the sampled frequencies
(chi-square); seeds that hold whatever else is in the batch, in the sampler and end to end."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
import torch

from kvserve import LLM, SamplingParams
import kvserve.runner.sampler as sampler_module
from kvserve.runner.sampler import Sampler, SamplingBatch, greedy_tokens, inverse_cdf, truncation_cutoffs
from tests.conftest import TINY_VOCAB

EOS = 1
NEG_INF = float("-inf")


# -- penalties, logit_bias, min_tokens -----------------------------------------------------------
def reference_process(logits: torch.Tensor, params, prompts, outputs, eos: set[int]) -> torch.Tensor:
    """The documented order, written as plainly as possible."""
    rows = logits.tolist()
    for row, p, prompt, output in zip(rows, params, prompts, outputs):
        if p.repetition_penalty != 1.0:
            for t in set(prompt) | set(output):
                row[t] = row[t] / p.repetition_penalty if row[t] > 0 else row[t] * p.repetition_penalty
        for t, count in Counter(output).items():
            row[t] -= p.frequency_penalty * count + p.presence_penalty
        for t, bias in (p.logit_bias or {}).items():
            row[t] += bias
        if len(output) < p.min_tokens:
            banned = set(p.stop_token_ids) | (set() if p.ignore_eos else eos)
            for t in banned:
                row[t] = NEG_INF
    return torch.tensor(rows)


def test_penalties_bias_and_min_tokens_match_reference():
    vocab = 40
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(7, vocab, generator=gen) * 3  # both signs, for repetition_penalty
    params = [
        SamplingParams(repetition_penalty=1.3),
        SamplingParams(repetition_penalty=0.7, temperature=0),
        SamplingParams(presence_penalty=0.5, frequency_penalty=0.25),
        SamplingParams(presence_penalty=-1.0, frequency_penalty=1.5, repetition_penalty=1.1),
        SamplingParams(logit_bias={3: 5.0, 7: -100, 39: 0.5}, min_tokens=4, stop_token_ids=[5, 6]),
        SamplingParams(min_tokens=2, stop_token_ids=[9], ignore_eos=True),  # EOS allowed, 9 banned
        SamplingParams(),  # no knobs
    ]
    prompts = [[1, 2, 3, 3], [4, 5, 6], [7, 8], [10, 11, 12, 12, 12], [13], [14, 15], [16]]
    outputs = [[3, 20, 20], [6, 30], [8, 8, 8, 21, 22, 22], [12, 25, 25, 0], [2, 2], [1], [17]]
    batch = SamplingBatch.from_lists(params, prompts, outputs, {EOS})
    before = logits.clone()
    got = Sampler().process_logits(logits, batch)
    want = reference_process(logits, params, prompts, outputs, {EOS})
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert torch.equal(logits, before)  # the input is not modified
    assert got[4, EOS] == NEG_INF and got[4, 5] == NEG_INF and got[5, 9] == NEG_INF
    assert got[5, EOS] == logits[5, EOS]
    # A batch without knobs is passed through untouched (no copy).
    plain = SamplingBatch.from_lists([SamplingParams()] * 2, prompts[:2], outputs[:2])
    assert Sampler().process_logits(logits[:2], plain).data_ptr() == logits[:2].data_ptr()


def test_min_tokens_lifts_once_reached():
    logits = torch.zeros(3, 10)
    logits[:, EOS] = 10.0  # EOS is by far the most likely
    p = SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[4])
    batch = SamplingBatch.from_lists([p] * 3, [[2]] * 3, [[5], [5, 6], [5, 6, 7]], {EOS})
    out = Sampler().process_logits(logits, batch)
    assert out[0, EOS] == out[1, EOS] == out[0, 4] == out[1, 4] == NEG_INF
    assert out[2, EOS] == 10.0 and out[2, 4] == 0.0  # 3 tokens out: nothing banned
    assert Sampler()(logits, batch).token_ids[2] == EOS
    assert EOS not in Sampler()(logits, batch).token_ids[:2]


# -- truncation -----------------------------------------------------------------------------------
def reference_kept(probs: list[float], p: SamplingParams) -> set[int]:
    """min_p, then top_k, then the nucleus over what remains (renormalized); the token that
    crosses top_p is kept."""
    order = sorted(range(len(probs)), key=lambda t: -probs[t])
    kept = [t for t in order if probs[t] >= p.min_p * probs[order[0]]]
    if p.top_k > 0:
        kept = kept[: p.top_k]
    mass = sum(probs[t] for t in kept)
    nucleus, before = [], 0.0
    for t in kept:
        if before >= p.top_p * mass:
            break
        nucleus.append(t)
        before += probs[t]
    return set(nucleus)


def _draw(logits: torch.Tensor, p: SamplingParams, n_draws: int, seed: int) -> Counter:
    rows = 2000
    sampler = Sampler(torch.Generator().manual_seed(seed))
    batch = SamplingBatch.from_lists([p] * rows, [[0]] * rows, [[]] * rows)
    counts: Counter = Counter()
    for _ in range(n_draws // rows):
        counts.update(sampler(logits.expand(rows, -1), batch).token_ids)
    return counts


def _chi_square_p(counts: Counter, probs: dict[int, float]) -> float:
    n = sum(counts.values())
    stat = sum((counts.get(t, 0) - n * q) ** 2 / (n * q) for t, q in probs.items())
    dof = len(probs) - 1
    if dof == 0:
        return 1.0
    try:
        from scipy.stats import chi2

        return float(chi2.sf(stat, dof))
    except ImportError:  # Wilson-Hilferty approximation of the chi-square tail
        z = ((stat / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
        return 0.5 * math.erfc(z / math.sqrt(2))


# Probabilities 0.40, 0.25, 0.15, 0.10, 0.05, 0.03, 0.02 (no ties).
PROBS = [0.40, 0.25, 0.15, 0.10, 0.05, 0.03, 0.02]
FIXED_LOGITS = torch.tensor(PROBS).log()

TRUNCATIONS = {
    "none": SamplingParams(),
    "temperature": SamplingParams(temperature=1.7),
    "top_k": SamplingParams(top_k=3),
    # 0.40 < 0.5 but 0.40 + 0.25 crosses 0.5: the crossing token (index 1) must be kept.
    "top_p_crossing": SamplingParams(top_p=0.5),
    "top_p": SamplingParams(top_p=0.85),
    "min_p": SamplingParams(min_p=0.2),
    "all": SamplingParams(temperature=0.8, top_k=5, top_p=0.9, min_p=0.1),
}


@pytest.mark.parametrize("name", sorted(TRUNCATIONS))
def test_sampled_frequencies_match_truncated_distribution(name):
    p = TRUNCATIONS[name]
    scaled = torch.softmax(FIXED_LOGITS / p.temperature, dim=-1).tolist()
    kept = reference_kept(scaled, p)
    mass = sum(scaled[t] for t in kept)
    expected = {t: scaled[t] / mass for t in kept}
    counts = _draw(FIXED_LOGITS, p, 40_000, seed=sorted(TRUNCATIONS).index(name))
    assert set(counts) <= kept, f"tokens outside the kept set: {set(counts) - kept}"
    assert _chi_square_p(counts, expected) > 1e-3, (counts, expected)
    if name == "top_p_crossing":
        assert kept == {0, 1} and counts[1] > 0.3 * sum(counts.values())


@pytest.mark.parametrize("candidates", [256, 10**9])  # 10**9: the full-sort (GPU) path
def test_cutoffs_match_reference_on_random_rows(candidates, monkeypatch):
    """Large vocabularies and flat rows exercise the radix select past the top-p candidates;
    the kept set must be exactly the reference's."""
    monkeypatch.setattr(sampler_module, "_TOP_P_CANDIDATES", candidates)
    rng = random.Random(3)
    gen = torch.Generator().manual_seed(3)
    for vocab, scale in ((50, 3.0), (600, 0.5), (5000, 0.3), (5000, 4.0)):
        logits = torch.randn(12, vocab, generator=gen, dtype=torch.float64).float() * scale
        params = [
            SamplingParams(
                top_k=rng.choice([-1, -1, 1, 7, 300]), top_p=rng.choice([1.0, 0.3, 0.9, 0.99]),
                min_p=rng.choice([0.0, 0.0, 0.01, 0.2]),
            )
            for _ in range(12)
        ]
        w = (logits - logits.amax(dim=-1, keepdim=True)).exp()
        cut = truncation_cutoffs(w, params)
        for row, p in enumerate(params):
            probs = (w[row].double() / w[row].double().sum()).tolist()
            want = reference_kept(probs, p)
            got = set((w[row] >= cut[row]).nonzero().flatten().tolist())
            assert got == want, (vocab, row, p)


def test_large_vocab_frequencies():
    """Probability spread over many CDF blocks (and the padded last one): tokens 5, 700, 1500
    and 2999 of 3000, plus a tail of 2996 tokens holding 10% of the mass in all."""
    vocab = 3000
    probs = torch.full((vocab,), 0.10 / (vocab - 4), dtype=torch.float64)
    heads = {5: 0.40, 700: 0.25, 1500: 0.15, 2999: 0.10}
    for t, q in heads.items():
        probs[t] = q
    counts = _draw(probs.log().float(), SamplingParams(temperature=1.0), 40_000, seed=5)
    tail = sum(c for t, c in counts.items() if t not in heads)
    grouped = Counter({t: counts[t] for t in heads})
    grouped[-1] = tail
    assert _chi_square_p(grouped, {**heads, -1: 0.10}) > 1e-3, grouped
    assert len([t for t in counts if t not in heads]) > 1000  # the tail is really sampled


def test_inverse_cdf_never_picks_zero_weight():
    w = torch.zeros(4, 1000)
    w[:, 0] = 0.0
    w[0, 5], w[1, 999], w[2, 256], w[3, 255] = 1.0, 1.0, 1.0, 1.0
    w[3, 700] = 1e-30
    for u in (0.0, 0.5, 1 - 1e-16):
        picked = inverse_cdf(w, torch.full((4,), u, dtype=torch.float64)).tolist()
        assert picked[:3] == [5, 999, 256] and picked[3] in (255, 700)


def test_greedy_rows_take_argmax_in_a_mixed_batch():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 100, generator=gen)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, top_k=5)] * 3
    params[2] = SamplingParams(temperature=0, logit_bias={17: 100.0})
    batch = SamplingBatch.from_lists(params, [[1]] * 6, [[]] * 6)
    out = Sampler(torch.Generator().manual_seed(0))(logits, batch).token_ids
    assert out[0] == logits[0].argmax() and out[4] == logits[4].argmax() and out[2] == 17
    assert out[1] in logits[1].topk(5).indices.tolist()


def test_seeded_row_same_alone_and_in_any_batch():
    gen = torch.Generator().manual_seed(2)
    vocab = 3000
    steps = [torch.randn(8, vocab, generator=gen) * 2 for _ in range(6)]
    seeded = SamplingParams(temperature=0.9, top_p=0.95, seed=7)
    others = [
        SamplingParams(temperature=0), SamplingParams(top_k=2000), SamplingParams(top_p=0.5, seed=3),
        SamplingParams(repetition_penalty=1.5, min_p=0.05), SamplingParams(logprobs=3, temperature=2.0),
        SamplingParams(), SamplingParams(frequency_penalty=1.0),
    ]

    def run(params, row_of_seeded):
        sampler = Sampler(torch.Generator().manual_seed(len(params)))
        gens = [torch.Generator().manual_seed(p.seed) if p.seed is not None else None for p in params]
        toks = [[5, 6]] * len(params)
        picked = []
        for logits in steps:
            rows = logits[: len(params)].clone()
            rows[row_of_seeded] = logits[0]
            batch = SamplingBatch(params, gens, [list(t) for t in toks], [2] * len(params))
            out = sampler(rows, batch).token_ids
            picked.append(out[row_of_seeded])
            toks = [t + [o] for t, o in zip(toks, out)]
        return picked

    alone = run([seeded], 0)
    assert run(others[:3] + [seeded] + others[3:], 3) == alone
    assert run([seeded] + others, 0) == alone
    other_seed = run([seeded.clone(seed=8)], 0)
    assert other_seed != alone


# -- end to end -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(str(tiny_llama[0]), dtype="float32", device="cpu", num_kv_blocks=256)


def _prompts(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(3, TINY_VOCAB) for _ in range(rng.randint(3, 40))]} for _ in range(n)]


def test_min_tokens_end_to_end(llm):
    prompt = _prompts(1, seed=11)[0]
    (greedy,) = llm.generate(prompt, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True), use_tqdm=False)
    first = greedy.outputs[0].token_ids[0]
    stop_first = SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[first])
    (out,) = llm.generate(prompt, stop_first, use_tqdm=False)
    assert out.outputs[0].token_ids == [first]
    (out,) = llm.generate(prompt, stop_first.clone(min_tokens=3), use_tqdm=False)
    comp = out.outputs[0]
    assert len(comp.token_ids) >= 3
    assert first not in comp.token_ids[:3]
    assert comp.finish_reason in ("stop", "length")


def test_seeded_request_in_mixed_batch_of_16(llm):
    seeded = SamplingParams(max_tokens=8, temperature=0.9, top_k=50, top_p=0.95, seed=1234, ignore_eos=True, logprobs=2)
    prompt = _prompts(1, seed=21)[0]
    (alone,) = llm.generate(prompt, seeded, use_tqdm=False)
    rng = random.Random(5)
    others = [
        SamplingParams(
            max_tokens=rng.randint(2, 10), ignore_eos=True,
            temperature=rng.choice([0.0, 0.7, 1.3]), top_k=rng.choice([-1, 5, 100]),
            top_p=rng.choice([1.0, 0.8]), min_p=rng.choice([0.0, 0.1]),
            repetition_penalty=rng.choice([1.0, 1.2]), presence_penalty=rng.choice([0.0, 0.5]),
            frequency_penalty=rng.choice([0.0, -0.5]), logprobs=rng.choice([None, 0, 3]),
            seed=rng.choice([None, rng.randrange(100)]),
            logit_bias=rng.choice([None, {7: 2.0}]),
        )
        for _ in range(15)
    ]
    outs = llm.generate(_prompts(15, seed=22) + [prompt], others + [seeded], use_tqdm=False)
    got = outs[-1].outputs[0]
    assert got.token_ids == alone.outputs[0].token_ids
    assert [sorted(d) for d in got.logprobs] == [sorted(d) for d in alone.outputs[0].logprobs]
    for o, p in zip(outs, others):
        assert len(o.outputs[0].token_ids) == p.max_tokens
    (other,) = llm.generate(prompt, seeded.clone(seed=4321), use_tqdm=False)
    assert other.outputs[0].token_ids != alone.outputs[0].token_ids


def test_nucleus_radix_select_matches_sort():
    from kvserve.runner.sampler import nucleus_cutoff

    gen = torch.Generator().manual_seed(9)
    w = (torch.randn(6, 3000, generator=gen) * torch.tensor([0.1, 1.0, 3.0, 0.5, 2.0, 0.0])[:, None]).exp()
    w = w / w.amax(dim=-1, keepdim=True)
    w[3, ::7] = 0.0  # zeros (banned tokens) carry no mass
    w[4, :500] = w[4, 0]  # a plateau of ties
    top_p = torch.tensor([0.9, 0.5, 0.99, 0.7, 0.3, 0.95], dtype=torch.float64)
    got = nucleus_cutoff(w, top_p)
    for r in range(6):
        vals = w[r].double().sort(descending=True).values
        before = torch.cat([torch.zeros(1, dtype=torch.float64), vals.cumsum(0)[:-1]])
        crossing = int((before < top_p[r] * vals.sum()).sum()) - 1
        assert got[r].item() == vals[crossing].float().item(), r


@pytest.mark.parametrize("rows", [1, 3])
def test_greedy_tokens_is_the_first_row_argmax(rows):
    torch.manual_seed(rows)
    logits = torch.randn(rows, 49152)
    logits[:, 7] = logits[:, 40000] = 10.0  # a tie: the first index wins, as torch.argmax
    logits[-1, 123] = 11.0
    got = greedy_tokens(logits)
    assert got.dtype == torch.int64 and got.shape == (rows,)
    assert torch.equal(got, logits.argmax(dim=-1))
    assert got.tolist() == [7] * (rows - 1) + [123]
    assert greedy_tokens(logits[-1:]).tolist() == [123]  # a one-row view of a batch


@pytest.mark.parametrize(
    "knob",
    [{}, {"repetition_penalty": 1.3}, {"presence_penalty": 0.5}, {"frequency_penalty": 0.5},
     {"logit_bias": {3: 2.0}}, {"min_tokens": 4}],
    ids=["none", "repetition", "presence", "frequency", "logit_bias", "min_tokens"],
)
def test_modifies_logits_matches_process_logits(knob):
    """`SamplingParams.modifies_logits` (which lets tensor-parallel ranks skip the token
    broadcast of a greedy step) is True exactly for the knobs `process_logits` applies."""
    params = SamplingParams(temperature=0.0, max_tokens=8, **knob)
    logits = torch.randn(1, 20)
    # Prompt [1, 2], outputs [3, 3]: every penalty has tokens to act on, min_tokens is not met.
    batch = SamplingBatch([params], [None], [[1, 2, 3, 3]], [2], eos_token_ids=frozenset({0}))
    processed = Sampler().process_logits(logits, batch)
    assert params.modifies_logits == bool(knob)
    assert (processed is logits) == (not knob)
    if knob:
        assert not torch.equal(processed, logits)
