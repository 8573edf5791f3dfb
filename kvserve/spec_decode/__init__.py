"""Speculative decoding: proposers (n-gram prompt lookup, a draft model) and the
verification rule (greedy agreement, rejection sampling). See docs/speculative.md."""

from kvserve.spec_decode.config import SpeculativeConfig

__all__ = ["SpeculativeConfig"]
