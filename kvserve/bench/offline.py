"""kvserve offline: throughput over a request set (sampling `engine.stats()` every step),
batch-1 / small-batch decode latency, prefill time, and the machine's bandwidth floor."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from kvserve.bench.workloads import BenchRequest

logger = logging.getLogger(__name__)


def percentiles(xs: list[float]) -> dict[str, float]:
    import numpy as np

    if not xs:
        return {}
    a = np.asarray(xs, dtype=float)
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99))}


def bandwidth_floor(device: str = "cpu", dtype: str = "float32", mib: int = 256, repeats: int = 5) -> dict[str, float]:
    """Memory read bandwidth from a large matrix-vector product (every weight read once), the
    bound batch-1 decode cannot beat: time/token >= weight bytes / bandwidth."""
    dev = torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu")
    tdtype = getattr(torch, dtype)
    cols = 4096
    rows = max(1, (mib << 20) // (cols * tdtype.itemsize))
    w = torch.randn(rows, cols, dtype=tdtype, device=dev)  # [rows, cols]
    x = torch.randn(cols, 1, dtype=tdtype, device=dev)
    best = float("inf")
    for _ in range(repeats + 1):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.matmul(w, x)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    nbytes = w.numel() * w.element_size()
    return {"gb_per_s": nbytes / best / 1e9, "bytes": float(nbytes), "dtype": dtype, "device": dev.type}  # type: ignore[dict-item]


class KvserveRunner:
    """One `LLM` for a whole benchmark; requests are driven step by step so every step's
    engine stats (KV usage, running / waiting) land in a timeline for the report."""

    name = "kvserve"

    def __init__(self, model: str, **engine_kwargs: Any) -> None:
        from kvserve import LLM

        self.llm = LLM(model, **engine_kwargs)
        self.engine = self.llm.engine
        self.timeline: list[dict[str, float]] = []

    @property
    def vocab_size(self) -> int:
        return self.engine.model_config.vocab_size

    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.engine.loaded.model.parameters())

    def run(self, reqs: list[BenchRequest], *, record: bool = False, progress: Any = None) -> dict[str, Any]:
        """Run `reqs` to completion (greedy, ignore_eos). Returns duration, token counts and
        per-request TTFT / E2E; `progress` is a tqdm-like object updated per finished request."""
        from kvserve import SamplingParams

        ids = []
        for r in reqs:
            rid = self.engine.new_request_id()
            self.engine.add_request(rid, {"prompt_token_ids": r.prompt},
                                    SamplingParams(max_tokens=r.output_len, temperature=0.0, ignore_eos=True))
            ids.append(rid)
        pending = set(ids)
        first: dict[str, float] = {}
        e2e: dict[str, float] = {}
        out_tokens = 0
        t0 = time.perf_counter()
        try:
            while pending:
                outs = self.engine.step()
                now = time.perf_counter()
                for o in outs:
                    if o.request_id not in pending:
                        continue
                    if o.request_id not in first and o.outputs[0].token_ids:
                        first[o.request_id] = now - t0
                    if o.finished:
                        pending.discard(o.request_id)
                        e2e[o.request_id] = now - t0
                        out_tokens += len(o.outputs[0].token_ids)
                        if progress is not None:
                            progress.update(1)
                if record:
                    self.timeline.append({"t": now - t0, **self.engine.stats()})
        except BaseException:
            self.engine.abort_request(list(pending))
            raise
        dt = time.perf_counter() - t0
        return {"duration_s": dt, "output_tokens": out_tokens, "prompt_tokens": sum(len(r.prompt) for r in reqs),
                "output_tok_s": out_tokens / dt, "total_tok_s": (out_tokens + sum(len(r.prompt) for r in reqs)) / dt,
                "ttft_s": [first.get(i, dt) for i in ids], "e2e_s": [e2e[i] for i in ids]}

    def reset_prefix_cache(self) -> None:
        self.engine.scheduler.kv.reset_prefix_cache()

    # -- latency ----------------------------------------------------------------------------------
    def prefill_s(self, prompt: list[int]) -> float:
        self.reset_prefix_cache()
        return self.run([BenchRequest(prompt, 1)])["duration_s"]

    def decode_ms_per_token(self, prompts: list[list[int]], new_tokens: int) -> float:
        """Per-step decode time at batch len(prompts): (E2E - TTFT) / (new_tokens - 1)."""
        self.reset_prefix_cache()
        r = self.run([BenchRequest(p, new_tokens) for p in prompts])
        return (max(r["e2e_s"]) - max(r["ttft_s"])) / max(1, new_tokens - 1) * 1e3
