"""Verification of draft tokens against the target model's distributions.

A speculating request computes k + 1 positions in one target forward: its last accepted
token and its k drafts d_1..d_k. Row j's logits give the target distribution p_j of the token
after d_j (d_0 = the last accepted token); each row's logits are processed exactly as plain
decoding would process them at that point of the output (penalties see d_1..d_j as history).

- Greedy: accept d_{j+1} while it equals argmax p_j; the first disagreement is replaced by
  the argmax, and when all k agree the bonus token is argmax p_k. Token-identical to plain
  greedy decoding.
- Random (standard speculative sampling, Leviathan et al. 2023 / Chen et al. 2023): accept
  d_{j+1} with probability min(1, p_j(d) / q_j(d)); at the first rejection draw from
  normalize(max(0, p_j - q_j)) and stop; when all k are accepted draw the bonus token from
  p_k. Each emitted token is then distributed exactly as plain sampling's. With a point-mass
  draft (n-gram lookup) q_j(d) = 1: accept with probability p_j(d), resample from p_j with
  d removed.

p is what the sampler draws from (`sampler.random_weights`: temperature, min_p / top-k /
top-p applied). A request draws k + 1 uniforms per step from its own generator when seeded
(the shared one otherwise), so a seeded request's output is reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvserve.core.sampling_params import SamplingParams
from kvserve.runner.sampler import greedy_tokens, inverse_cdf, random_weights


@dataclass(slots=True)
class VerifyRow:
    """One request of a verify step: its rows are processed[start : start + len(drafts) + 1]."""

    start: int
    drafts: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    draft_probs: torch.Tensor | None = None  # [k, V], None = point mass on each draft


def verify(processed: torch.Tensor, reqs: list[VerifyRow], shared: torch.Generator | None) -> list[list[int]]:
    """Output tokens of each request (accepted drafts + one corrected or bonus token).
    processed: [R, V] fp32 logits after penalties / bias / bans, one row per position."""
    out: list[list[int]] = [[] for _ in reqs]
    dev = processed.device
    greedy = [i for i, r in enumerate(reqs) if r.params.greedy]
    if greedy:
        rows = [r for i in greedy for r in range(reqs[i].start, reqs[i].start + len(reqs[i].drafts) + 1)]
        idx = torch.tensor(rows, device=dev)
        top = greedy_tokens(processed.index_select(0, idx)).tolist()
        o = 0
        for i in greedy:
            r = reqs[i]
            k = len(r.drafts)
            target = top[o : o + k + 1]
            o += k + 1
            a = 0
            while a < k and r.drafts[a] == target[a]:
                a += 1
            out[i] = r.drafts[:a] + [target[a]]
    rand = [i for i, r in enumerate(reqs) if not r.params.greedy]
    if not rand:
        return out
    rows, params = [], []
    for i in rand:
        r = reqs[i]
        n = len(r.drafts) + 1
        rows.extend(range(r.start, r.start + n))
        params.extend([r.params] * n)
    w = random_weights(processed.index_select(0, torch.tensor(rows, device=dev)), params)  # [Rr, V]
    p_all = w / w.sum(dim=-1, keepdim=True, dtype=torch.float64).to(w.dtype)
    o = 0
    for i in rand:
        r = reqs[i]
        k = len(r.drafts)
        p = p_all[o : o + k + 1]  # [k + 1, V]
        wr = w[o : o + k + 1]
        o += k + 1
        u = torch.rand(k + 1, generator=r.generator or shared, dtype=torch.float64, device=dev).tolist()
        out[i] = _speculative_sample(p, wr, r.drafts, r.draft_probs, u)
    return out


def _speculative_sample(
    p: torch.Tensor, w: torch.Tensor, drafts: list[int], q: torch.Tensor | None, u: list[float]
) -> list[int]:
    k = len(drafts)
    if k:
        d = torch.tensor(drafts, device=p.device)
        p_d = p[torch.arange(k, device=p.device), d].tolist()
        q_d = [1.0] * k if q is None else q[torch.arange(k, device=p.device), d].tolist()
    tokens: list[int] = []
    for j in range(k):
        # accept with min(1, p/q): u < p/q  <=>  u * q < p (q > 0: the draft was drawn from it)
        if u[j] * q_d[j] < p_d[j]:
            tokens.append(drafts[j])
            continue
        if q is None:
            residual = w[j].clone()
            residual[drafts[j]] = 0.0
        else:
            residual = (p[j] - q[j].to(p.dtype)).clamp_(min=0.0)
        if not bool(residual.max() > 0):  # p <= q everywhere: only on rounding; keep p
            residual = w[j]
        tokens.append(int(inverse_cdf(residual[None], torch.tensor([u[k]], dtype=torch.float64, device=p.device))[0]))
        return tokens
    tokens.append(int(inverse_cdf(w[k][None], torch.tensor([u[k]], dtype=torch.float64, device=p.device))[0]))
    return tokens
