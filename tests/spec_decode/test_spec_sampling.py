"""Speculative sampling keeps the output distribution: chi-square tests of sampled tokens with
speculation (adversarial drafts) against plain sampling, on a tiny fp32 model; seeds stay
reproducible; the rejection rule itself against exact distributions."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from kvserve import LLM, SamplingParams
from kvserve.core.sampling_params import SamplingParams as SP
from kvserve.spec_decode.proposer import Proposal, ProposalBatch
from kvserve.spec_decode.rejection import VerifyRow, verify

PROMPT = {"prompt_token_ids": [7, 8, 9, 10, 7, 8]}
N = 600


class Adversarial:
    """Drafts mixing the likeliest continuation (from a greedy run) with unlikely tokens."""

    def __init__(self, likely: list[int]) -> None:
        self.likely = likely

    def propose(self, requests, max_tokens):
        out = ProposalBatch()
        for req, k in zip(requests, max_tokens):
            i = req.num_output_tokens
            d = [self.likely[(i + j) % len(self.likely)] for j in range(min(k, 3))]
            if len(d) > 1:
                d[1] = 500  # a token the model rarely picks
            out.proposals[req.request_id] = Proposal(d)
        return out

    def drop(self, request_id):
        pass


def _chi2_same(a: Counter, b: Counter) -> float:
    """p-value of a chi-square homogeneity test of two samples (rare cells pooled)."""
    from scipy.stats import chi2_contingency

    keys = sorted(set(a) | set(b), key=lambda k: -(a[k] + b[k]))
    big = [k for k in keys if a[k] + b[k] >= 20]
    rest_a = sum(a[k] for k in keys if k not in big)
    rest_b = sum(b[k] for k in keys if k not in big)
    table = [[a[k] for k in big] + ([rest_a] if rest_a + rest_b else []),
             [b[k] for k in big] + ([rest_b] if rest_a + rest_b else [])]
    return chi2_contingency(table)[1]


@pytest.fixture(scope="module")
def llama_dir(tiny_llama):
    return str(tiny_llama[0])


def test_sampled_distribution_equals_plain(llama_dir):
    plain = LLM(llama_dir, dtype="float32", device="cpu", num_kv_blocks=512)
    greedy = plain.generate([PROMPT], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    spec = LLM(llama_dir, dtype="float32", device="cpu", num_kv_blocks=512, max_num_seqs=32, speculative_config={
        "method": "ngram", "num_speculative_tokens": 3, "backoff": False})
    spec.engine.spec.proposer = Adversarial(greedy[0].outputs[0].token_ids)
    params = [SamplingParams(temperature=0.8, top_k=30, max_tokens=3, seed=s, ignore_eos=True) for s in range(N)]
    a = [o.outputs[0].token_ids for o in plain.generate([PROMPT] * N, params, use_tqdm=False)]
    b = [o.outputs[0].token_ids for o in spec.generate([PROMPT] * N, params, use_tqdm=False)]
    st = spec.engine.stats()
    assert st["spec_accepted_tokens"] > 0 and st["spec_accepted_tokens"] < st["spec_draft_tokens"]
    for pos in range(3):
        p = _chi2_same(Counter(t[pos] for t in a), Counter(t[pos] for t in b))
        assert p > 1e-3, (pos, p)
    p = _chi2_same(Counter(tuple(t[:2]) for t in a), Counter(tuple(t[:2]) for t in b))
    assert p > 1e-3, p
    # seeded requests are reproducible with speculation
    again = [o.outputs[0].token_ids for o in spec.generate([PROMPT] * 20, params[:20], use_tqdm=False)]
    assert again == b[:20]


def _exact_check(p: torch.Tensor, draft: int, q: torch.Tensor | None, n: int = 4000) -> float:
    """Sample the first emitted token n times through `verify`; chi-square p-value against p."""
    g = torch.Generator().manual_seed(0)
    logits = p.log()[None].repeat(2, 1)  # row 0 verifies the draft, row 1 is the bonus row
    sp = SP(temperature=1.0)
    counts = Counter()
    for _ in range(n // 200):
        if q is None:
            drafts = [draft] * 200
        else:  # a draft model samples its draft from q
            drafts = torch.multinomial(q, 200, replacement=True, generator=g).tolist()
        rows = [VerifyRow(0, [d], sp, g, None if q is None else q[None]) for d in drafts]
        for toks in verify(logits.repeat(1, 1), rows, g):
            counts[toks[0]] += 1
    from scipy.stats import chisquare

    exp = (p * n).tolist()
    keys = [i for i in range(len(exp)) if exp[i] > 5]
    obs = [counts[i] for i in keys]
    e = [exp[i] for i in keys]
    scale = sum(obs) / sum(e)
    return chisquare(obs, [x * scale for x in e])[1]


def test_rejection_rule_exact_point_mass_and_draft_probs():
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(12), 0)
    unlikely = int(p.argmin())
    assert _exact_check(p, unlikely, None) > 1e-3
    assert _exact_check(p, int(p.argmax()), None) > 1e-3
    q = torch.softmax(torch.randn(12) * 2, 0)  # a draft model's distribution
    assert _exact_check(p, -1, q) > 1e-3


def test_verify_batched_equals_one_request_at_a_time():
    """`verify` over many requests (greedy, point-mass drafts, draft-model drafts, no drafts)
    gives each request what verifying it alone gives (each draws from its own generator)."""
    torch.manual_seed(3)
    vocab = 40
    specs = [(3, None, True), (2, None, False), (0, None, False), (4, "q", False), (1, None, True), (3, None, False)]
    logits, reqs_args, start = [], [], 0
    for k, q, greedy in specs:
        rows = torch.randn(k + 1, vocab) * 2
        logits.append(rows)
        drafts = rows[:k].argmax(-1).tolist()
        if k > 1:
            drafts[1] = int(rows[1].argmin())  # an unlikely draft: rejections happen
        probs = torch.softmax(torch.randn(k, vocab), -1) if q else None
        sp = SP(temperature=0.0) if greedy else SP(temperature=0.9, top_k=25, seed=1)
        reqs_args.append((start, drafts, sp, probs))
        start += k + 1
    processed = torch.cat(logits)
    for trial in range(20):
        gens = [torch.Generator().manual_seed(100 * trial + i) for i in range(len(specs))]
        batch = [VerifyRow(s, d, sp, g, q) for (s, d, sp, q), g in zip(reqs_args, gens)]
        got = verify(processed, batch, None)
        gens = [torch.Generator().manual_seed(100 * trial + i) for i in range(len(specs))]
        alone = [verify(processed, [VerifyRow(s, d, sp, g, q)], None)[0]
                 for (s, d, sp, q), g in zip(reqs_args, gens)]
        assert got == alone
        assert all(len(t) >= 1 for t in got)
