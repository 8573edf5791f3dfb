"""Seeded request sets: every run with the same seed does exactly the same work."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BenchRequest:
    prompt: list[int]
    output_len: int


def _ids(rng: random.Random, n: int, vocab: int) -> list[int]:
    lo = min(100, max(vocab // 4, 1))  # skip the low ids, where special tokens usually live
    return [rng.randrange(lo, vocab) for _ in range(n)]


def random_requests(n: int, seed: int, vocab: int, *, input_len: int | None = None, output_len: int | None = None,
                    min_len: int = 100, max_len: int = 1024, scale: float = 1.0) -> list[BenchRequest]:
    """The field's offline workload: prompt and output lengths uniform in [min_len, max_len]
    (times `scale`), random token ids; `input_len`/`output_len` fix a length instead."""
    if n < 1:
        raise ValueError(f"num_requests must be >= 1 (got {n})")
    if not 0 < scale <= 1:
        raise ValueError(f"scale must be in (0, 1] (got {scale})")
    rng = random.Random(seed)
    lo, hi = max(1, round(min_len * scale)), max(1, round(max_len * scale))
    out = []
    for _ in range(n):
        p = input_len if input_len else rng.randint(lo, hi)
        o = output_len if output_len else rng.randint(lo, hi)
        out.append(BenchRequest(_ids(rng, p, vocab), o))
    return out


def chat_requests(n: int, seed: int, vocab: int, *, mean_in: int = 200, mean_out: int = 180,
                  sigma: float = 0.9, max_len: int = 4096, scale: float = 1.0) -> list[BenchRequest]:
    """Synthetic chat lengths: log-normal (a long right tail, like real conversation data),
    with means `mean_in` / `mean_out` tokens (times `scale`), capped at `max_len`."""
    rng = random.Random(seed)

    def draw(mean: float) -> int:
        mu = math.log(mean) - sigma * sigma / 2  # so that E[X] = mean
        return max(1, min(max_len, round(rng.lognormvariate(mu, sigma))))

    return [BenchRequest(_ids(rng, draw(mean_in * scale), vocab), draw(mean_out * scale)) for _ in range(n)]


def shared_prefix_requests(n: int, seed: int, vocab: int, *, prefix_len: int, suffix_len: int,
                           output_len: int) -> list[BenchRequest]:
    """Requests that share one long system prompt, each with its own short question."""
    rng = random.Random(seed)
    prefix = _ids(rng, prefix_len, vocab)
    return [BenchRequest(prefix + _ids(rng, suffix_len, vocab), output_len) for _ in range(n)]


def totals(reqs: list[BenchRequest]) -> dict[str, int]:
    return {"requests": len(reqs), "prompt_tokens": sum(len(r.prompt) for r in reqs),
            "output_tokens": sum(r.output_len for r in reqs)}
