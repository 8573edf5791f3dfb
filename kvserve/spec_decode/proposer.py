"""The proposer interface: what the engine asks for each step.

A proposer sees the running requests that may speculate this step and returns, per request,
up to `max_tokens[i]` draft tokens, plus the draft distribution `q` they were drawn from when
that is not a point mass (a draft model sampling a random request). The verifier then accepts
a draft token d with probability min(1, p(d) / q(d)) and on rejection resamples from
normalize(max(0, p - q)), which leaves the output distribution exactly the target's. A
proposer whose drafts are deterministic (n-gram lookup, greedy draft models) returns no `q`:
it is the point mass on each draft token.

EAGLE heads or a model's own multi-token-prediction layers fit the same shape: they need the
target's hidden states, which `observe()` could be extended to carry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

from kvserve.core.request import Request


@dataclass
class Proposal:
    token_ids: list[int]
    # [len(token_ids), vocab] draft probabilities (a torch tensor) or None for a point mass.
    probs: Any = None


@dataclass
class ProposalBatch:
    proposals: dict[str, Proposal] = field(default_factory=dict)


class Proposer(Protocol):
    def propose(self, requests: Sequence[Request], max_tokens: Sequence[int]) -> ProposalBatch:
        """Drafts for `requests` (each decoding: all its tokens but the last computed), at
        most `max_tokens[i]` for request i; a request may get none."""
        ...

    def drop(self, request_id: str) -> None:
        """Forget a request (finished, aborted)."""
        ...
