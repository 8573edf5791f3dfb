"""N-gram prompt lookup: propose the tokens that followed the latest earlier occurrence of
the request's last n tokens, in its own prompt and output (n from prompt_lookup_max down to
prompt_lookup_min, the longest match wins). Pure Python.

Each request keeps an index {n-gram: end position of its latest occurrence} for every n in
the range, extended by the tokens appended since the last call: a lookup costs O(n range),
not O(context), so a batch of long contexts pays nothing per step for the search."""

from __future__ import annotations

from typing import Sequence

from kvserve.core.request import Request
from kvserve.spec_decode.proposer import Proposal, ProposalBatch


class _Index:
    __slots__ = ("maps", "upto")

    def __init__(self, sizes: range) -> None:
        self.maps: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in sizes}
        # n-grams ending before position `upto` (whose next token exists) are indexed.
        self.upto = 0


class NgramProposer:
    def __init__(self, num_tokens: int, n_min: int, n_max: int) -> None:
        self.k = num_tokens
        self.sizes = range(n_min, n_max + 1)
        self._index: dict[str, _Index] = {}

    def propose(self, requests: Sequence[Request], max_tokens: Sequence[int]) -> ProposalBatch:
        out = ProposalBatch()
        for req, k in zip(requests, max_tokens):
            drafts = self.lookup(req.request_id, req.all_token_ids, min(k, self.k))
            if drafts:
                out.proposals[req.request_id] = Proposal(drafts)
        return out

    def lookup(self, key: str, tokens: list[int], k: int) -> list[int]:
        if k <= 0:
            return []
        idx = self._index.get(key)
        if idx is None:
            idx = self._index[key] = _Index(self.sizes)
        length = len(tokens)
        # Index every n-gram that ends at e in [idx.upto, length - 1): its continuation
        # tokens[e] exists; the suffix ending at `length` itself is not indexed (no self-match).
        for e in range(max(idx.upto, 1), length):
            for n, m in idx.maps.items():
                if e >= n:
                    m[tuple(tokens[e - n : e])] = e
        idx.upto = max(idx.upto, length)
        for n in reversed(self.sizes):
            if n > length:
                continue
            e = idx.maps[n].get(tuple(tokens[length - n :]))
            if e is not None:
                return tokens[e : e + k]
        return []

    def drop(self, request_id: str) -> None:
        self._index.pop(request_id, None)
