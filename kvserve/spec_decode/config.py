"""`speculative_config`: vLLM's shape, validated. Pure Python (no torch import)."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

METHODS = ("ngram", "draft_model")


@dataclass(frozen=True)
class SpeculativeConfig:
    """method: 'ngram' (prompt lookup in the request's own prompt and output) or
        'draft_model' (a smaller model with the same tokenizer; `model` names it).
    num_speculative_tokens: draft tokens proposed per step (k); a verify step computes k + 1
        positions of the target model.
    prompt_lookup_min / prompt_lookup_max: n-gram sizes tried, longest first (ngram only).
    model: the draft model (draft_model only): any name `LLM(model=...)` accepts.
    backoff: stop proposing to a request whose drafts keep being rejected (see
        docs/speculative.md); False always proposes (tests, measurements).
    disable_by_batch_size: propose nothing in a step while at least this many requests are
        running (vLLM's field: in a wide batch every draft row costs compute, so speculation
        trades throughput for latency); None never disables."""

    method: str = "ngram"
    num_speculative_tokens: int = 4
    prompt_lookup_min: int = 2
    prompt_lookup_max: int = 5
    model: str | None = None
    backoff: bool = True
    disable_by_batch_size: int | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"speculative_config.method must be one of {list(METHODS)} (got {self.method!r})")
        k = self.num_speculative_tokens
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 32:
            raise ValueError(f"speculative_config.num_speculative_tokens must be an integer in [1, 32] (got {k!r})")
        for name in ("prompt_lookup_min", "prompt_lookup_max"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 64:
                raise ValueError(f"speculative_config.{name} must be an integer in [1, 64] (got {v!r})")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(
                f"speculative_config.prompt_lookup_min ({self.prompt_lookup_min}) must be <= "
                f"prompt_lookup_max ({self.prompt_lookup_max})"
            )
        if self.method == "draft_model" and not self.model:
            raise ValueError("speculative_config.model must name the draft model when method is 'draft_model'")
        if self.method == "ngram" and self.model is not None:
            raise ValueError("speculative_config.model is only used with method 'draft_model'")
        if not isinstance(self.backoff, bool):
            raise ValueError(f"speculative_config.backoff must be true or false (got {self.backoff!r})")
        n = self.disable_by_batch_size
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 2):
            raise ValueError(f"speculative_config.disable_by_batch_size must be an integer >= 2 or null (got {n!r})")

    @classmethod
    def parse(cls, value: SpeculativeConfig | dict[str, Any] | str | None) -> SpeculativeConfig | None:
        """None, a SpeculativeConfig, a dict, or a JSON object string (the CLI's form)."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"speculative_config is not valid JSON: {e}") from None
        if not isinstance(value, dict):
            raise ValueError(f"speculative_config must be a dict or a JSON object (got {type(value).__name__})")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"speculative_config: unknown field(s) {unknown}; known: {sorted(known)}")
        if "method" not in value:
            raise ValueError("speculative_config.method is required ('ngram' or 'draft_model')")
        return cls(**value)
