"""A proposer forced to a chosen acceptance rate, for tests and benchmarks only (never built
from a `speculative_config`).

It knows each prompt's greedy output from a plain run (`references`: prompt ids -> output ids)
and proposes, for draft j of a request that has produced n tokens, the reference token n + j
with probability `acceptance`, else a token that differs from it. Greedy verification then
accepts each draft with probability `acceptance` while the output follows the reference (a
near-tie that makes the speculative output part from it lowers the rate). `acceptance=0`
is a workload where nothing is ever accepted (the back-off's worst case).
"""

from __future__ import annotations

import random
from typing import Sequence

from kvserve.core.request import Request
from kvserve.spec_decode.proposer import Proposal, ProposalBatch


class OracleProposer:
    def __init__(
        self, references: dict[tuple[int, ...], list[int]], acceptance: float, vocab_size: int, seed: int = 0
    ) -> None:
        if not 0.0 <= acceptance <= 1.0:
            raise ValueError(f"acceptance must be in [0, 1] (got {acceptance!r})")
        self.references = references
        self.acceptance = acceptance
        self.vocab_size = vocab_size
        self.rng = random.Random(seed)
        self.num_calls = 0  # propose() calls with at least one request (tests)
        self.num_drafts = 0  # draft tokens handed out (tests)

    def propose(self, requests: Sequence[Request], max_tokens: Sequence[int]) -> ProposalBatch:
        out = ProposalBatch()
        for req, k in zip(requests, max_tokens):
            ref = self.references.get(tuple(req.prompt_token_ids))
            if ref is None:
                continue
            n = req.num_output_tokens
            drafts = []
            for j in range(min(k, len(ref) - n)):
                right = ref[n + j]
                drafts.append(right if self.rng.random() < self.acceptance else (right + 1) % self.vocab_size)
            if drafts:
                out.proposals[req.request_id] = Proposal(drafts)
                self.num_drafts += len(drafts)
        if requests:
            self.num_calls += 1
        return out

    def drop(self, request_id: str) -> None:
        pass
