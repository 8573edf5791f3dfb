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
from kvserve.runner.sampler import _index, _tensor, greedy_tokens, inverse_cdf, random_weights


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
    processed: [R, V] fp32 logits after penalties / bias / bans, one row per position.

    Batched over requests: the greedy rows take one argmax; the random rows read the host once
    for every request's uniforms and draft probabilities, decide acceptance there, then draw
    every request's last token (the residual at its first rejection, else the bonus row) in one
    `inverse_cdf`: three device syncs a step whatever the number of requests."""
    out: list[list[int]] = [[] for _ in reqs]
    dev = processed.device
    greedy = [i for i, r in enumerate(reqs) if r.params.greedy]
    if greedy:
        rows = [r for i in greedy for r in range(reqs[i].start, reqs[i].start + len(reqs[i].drafts) + 1)]
        top = greedy_tokens(_select(processed, rows)).tolist()
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
    rows, params, firsts = [], [], []
    for i in rand:
        r = reqs[i]
        n = len(r.drafts) + 1
        firsts.append(len(rows))
        rows.extend(range(r.start, r.start + n))
        params.extend([r.params] * n)
    w = random_weights(_select(processed, rows), params)  # [Rr, V]
    p_all = w / w.sum(dim=-1, keepdim=True, dtype=torch.float64).to(w.dtype)
    # k + 1 uniforms per request from its own generator (else the shared one), in request order.
    u_dev = [torch.rand(len(reqs[i].drafts) + 1, generator=reqs[i].generator or shared, dtype=torch.float64,
                        device=dev) for i in rand]
    # p_j(d_{j+1}) of every draft, and q_j(d_{j+1}) where a draft model gave its distribution.
    d_rows = [o + j for i, o in zip(rand, firsts) for j in range(len(reqs[i].drafts))]
    d_toks = [d for i in rand for d in reqs[i].drafts]
    parts = list(u_dev)
    if d_rows:
        parts.append(p_all[_index(d_rows, dev), _index(d_toks, dev)].double())
    q_reqs = [i for i in rand if reqs[i].draft_probs is not None and reqs[i].drafts]
    for i in q_reqs:
        r = reqs[i]
        k = len(r.drafts)
        parts.append(r.draft_probs[torch.arange(k, device=dev), _index(r.drafts, dev)].double())
    host = torch.cat(parts).tolist()  # one sync for every request
    u_off = 0
    pd_off = sum(len(reqs[i].drafts) + 1 for i in rand)
    q_off = pd_off + len(d_rows)
    q_d_of: dict[int, list[float]] = {}
    for i in q_reqs:
        k = len(reqs[i].drafts)
        q_d_of[i] = host[q_off : q_off + k]
        q_off += k
    final_rows, final_u, zero_cells, q_rows = [], [], [], []
    for i, o in zip(rand, firsts):
        r = reqs[i]
        k = len(r.drafts)
        u = host[u_off : u_off + k + 1]
        u_off += k + 1
        p_d = host[pd_off : pd_off + k]
        pd_off += k
        q_d = q_d_of.get(i, [1.0] * k)
        tokens: list[int] = []
        j = 0
        # accept with min(1, p/q): u < p/q  <=>  u * q < p (q > 0: the draft was drawn from it)
        while j < k and u[j] * q_d[j] < p_d[j]:
            tokens.append(r.drafts[j])
            j += 1
        out[i] = tokens
        if j < k:  # rejected: draw from the residual of row j
            if r.draft_probs is None:
                zero_cells.append((len(final_rows), r.drafts[j]))  # point mass: p with d removed
            else:
                q_rows.append((len(final_rows), o + j, r.draft_probs[j]))  # max(0, p - q)
        final_rows.append(o + j)  # j == k: the bonus row
        final_u.append(u[k])
    base = w.index_select(0, _index(final_rows, dev))  # [F, V], a copy
    final = base.clone()
    if zero_cells:
        at, toks = zip(*zero_cells)
        final[_index(at, dev), _index(toks, dev)] = 0.0
    for at, row, q in q_rows:
        final[at] = (p_all[row] - q.to(p_all.dtype)).clamp_(min=0.0)
    # p <= q everywhere happens only on rounding: keep p then.
    final = torch.where((final.amax(dim=-1) > 0)[:, None], final, base)
    last = inverse_cdf(final, _tensor(final_u, torch.float64, dev)).tolist()
    for i, t in zip(rand, last):
        out[i].append(int(t))
    return out


def _select(x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """x[rows], without a copy (or an index upload) when rows are all of x in order."""
    if len(rows) == x.shape[0] and rows == list(range(len(rows))):
        return x
    return x.index_select(0, _index(rows, x.device))
