"""Perplexity of a model on a fixed text, from prompt logprobs, with a sliding window.

Windows of `context` tokens start every `stride` tokens. Each window scores only the tokens no
earlier window scored, so with stride < context every token after the first window is
conditioned on at least `context - stride` earlier tokens (the overlap); the first window scores
all its tokens but the first (nothing predicts it). Perplexity = exp(mean NLL) over all scored
tokens. This is the sliding-window evaluation of HF's "perplexity of fixed-length models" guide;
with stride = context the windows are disjoint and each window's first token goes unscored.

kvserve runs every window as one `{"prompt_token_ids": window}` request with
`SamplingParams(max_tokens=1, prompt_logprobs=0)` in a single `LLM.generate` call, so the
engine batches them. `llamacpp_perplexity` scores the same windows of the same token ids with
llama.cpp (llama-cpp-python, `logits_all=True`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvserve.entrypoints.llm import LLM

DEFAULT_TEXT = "us_constitution.txt"  # kvserve/bench/data/; source and licence in README.md there
DEFAULT_CONTEXT = 512


@dataclass(frozen=True)
class Window:
    """Tokens [begin, end) are fed; tokens [first_scored, end) are scored."""

    begin: int
    end: int
    first_scored: int


@dataclass
class PerplexityResult:
    perplexity: float
    mean_nll: float
    num_scored: int
    num_windows: int
    context: int
    stride: int
    seconds: float
    token_logprobs: list[float] = field(default_factory=list, repr=False)  # in text order

    def row(self) -> dict[str, Any]:
        """Everything but the per-token logprobs (a table / JSON row)."""
        return {
            "perplexity": self.perplexity, "mean_nll": self.mean_nll, "tokens_scored": self.num_scored,
            "windows": self.num_windows, "context": self.context, "stride": self.stride,
            "seconds": self.seconds,
        }


def check_window(context: int, stride: int | None) -> int:
    """Validate the window settings; returns the stride (default context // 2)."""
    if isinstance(context, bool) or not isinstance(context, int) or context < 2:
        raise ValueError(f"context must be an integer >= 2 (got {context!r})")
    if stride is None:
        return context // 2
    if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride <= context:
        raise ValueError(f"stride must be an integer in [1, context={context}] (got {stride!r})")
    return stride


def plan_windows(num_tokens: int, context: int, stride: int | None = None,
                 max_tokens_scored: int | None = None) -> list[Window]:
    """The windows over `num_tokens` tokens; the last one is cut short so that at most
    `max_tokens_scored` tokens are scored (None: all of them)."""
    stride = check_window(context, stride)
    if num_tokens < 2:
        raise ValueError(f"token_ids must hold at least 2 tokens to score one (got {num_tokens})")
    if max_tokens_scored is not None and (
        isinstance(max_tokens_scored, bool) or not isinstance(max_tokens_scored, int) or max_tokens_scored < 1
    ):
        raise ValueError(f"max_tokens_scored must be None or an integer >= 1 (got {max_tokens_scored!r})")
    budget = num_tokens if max_tokens_scored is None else max_tokens_scored
    out: list[Window] = []
    scored_upto = 1  # token 0 is never scored
    for begin in range(0, num_tokens, stride):
        end = min(begin + context, num_tokens)
        # A window's own first token has no context inside it (only when stride == context).
        first = max(scored_upto, begin + 1)
        end = min(end, first + budget)
        if end > first:
            out.append(Window(begin, end, first))
            budget -= end - first
            scored_upto = end
        if scored_upto >= num_tokens or budget == 0:
            break
    return out


def _result(windows: list[Window], logprobs: list[float], context: int, stride: int, seconds: float) -> PerplexityResult:
    mean_nll = -math.fsum(logprobs) / len(logprobs)
    return PerplexityResult(math.exp(mean_nll), mean_nll, len(logprobs), len(windows), context, stride,
                            seconds, logprobs)


def perplexity(llm: LLM, token_ids: list[int], context: int = DEFAULT_CONTEXT, stride: int | None = None,
               max_tokens_scored: int | None = None, use_tqdm: bool = False) -> PerplexityResult:
    """Sliding-window perplexity of `token_ids` under `llm` (module docstring)."""
    from kvserve.core.sampling_params import SamplingParams

    stride = check_window(context, stride)
    limit = llm.engine.max_model_len
    if context >= limit:
        raise ValueError(
            f"context must be < max_model_len={limit} (a window is a prompt, with room for one "
            f"generated token); got {context}"
        )
    token_ids = [int(t) for t in token_ids]
    windows = plan_windows(len(token_ids), context, stride, max_tokens_scored)
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, prompt_logprobs=0)
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": token_ids[w.begin : w.end]} for w in windows], params,
                        use_tqdm=use_tqdm)
    seconds = time.perf_counter() - t0
    logprobs: list[float] = []
    for w, out in zip(windows, outs):
        entries = out.prompt_logprobs  # entry j: {token: Logprob} for window token j (j >= 1)
        for pos in range(w.first_scored, w.end):
            target = token_ids[pos]
            logprobs.append(entries[pos - w.begin][target].logprob)
    return _result(windows, logprobs, context, stride, seconds)


def llamacpp_perplexity(model_path: str | Path, token_ids: list[int], context: int = DEFAULT_CONTEXT,
                        stride: int | None = None, max_tokens_scored: int | None = None,
                        n_threads: int | None = None) -> PerplexityResult:
    """The same windows of the same ids scored by llama.cpp on a GGUF file (one window at a
    time: llama-cpp-python has no batching API). Raises ImportError without llama-cpp-python."""
    import os

    import numpy as np
    from llama_cpp import Llama

    stride = check_window(context, stride)
    token_ids = [int(t) for t in token_ids]
    windows = plan_windows(len(token_ids), context, stride, max_tokens_scored)
    threads = n_threads or os.cpu_count() or 1
    llm = Llama(str(model_path), n_ctx=context, n_batch=context, logits_all=True, n_threads=threads,
                n_threads_batch=threads, verbose=False)
    logprobs: list[float] = []
    t0 = time.perf_counter()
    for w in windows:
        llm.reset()
        llm.eval(token_ids[w.begin : w.end])
        # Row i of the scores predicts window token i + 1.
        rows = np.asarray(llm.scores[w.first_scored - 1 - w.begin : w.end - 1 - w.begin], dtype=np.float64)
        m = rows.max(axis=1, keepdims=True)
        lse = (m + np.log(np.exp(rows - m).sum(axis=1, keepdims=True)))[:, 0]  # [n]
        targets = np.asarray(token_ids[w.first_scored : w.end])
        logprobs.extend((rows[np.arange(len(targets)), targets] - lse).tolist())
    seconds = time.perf_counter() - t0
    return _result(windows, logprobs, context, stride, seconds)


def default_text() -> str:
    return resources.files("kvserve.bench").joinpath("data", DEFAULT_TEXT).read_text(encoding="utf-8")


def read_text(path: str | Path | None) -> tuple[str, str]:
    """(label, text): the bundled text for None, else the file at `path`."""
    if path is None:
        return f"bundled:{DEFAULT_TEXT}", default_text()
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--text file not found: {p}")
    return str(p), p.read_text(encoding="utf-8")
