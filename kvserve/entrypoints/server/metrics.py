"""Prometheus metrics for `GET /metrics`, in a registry of the app's own (never the global one,
so several apps can live in one process, as tests do).

Engine gauges (running/waiting requests, KV blocks, prefix-cache hit rate) are read at scrape
time from the engine thread's latest stats snapshot; token counters and latency histograms are
fed by the request handlers as outputs arrive.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from kvserve.engine.async_engine import AsyncLLMEngine
    from kvserve.engine.outputs import RequestOutput

PREFIX = "kvserve:"
_TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)


class _EngineCollector(Collector):
    def __init__(self, engine: AsyncLLMEngine, model_name: str, metrics: ServerMetrics) -> None:
        self.engine = engine
        self.model_name = model_name
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        s = self.engine.stats()
        labels = [self.model_name]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(PREFIX + name, doc, labels=["model_name"])
            g.add_metric(labels, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(PREFIX + name, doc, labels=["model_name"])
            c.add_metric(labels, value)
            return c

        total = s.get("kv_blocks_total", 0)
        free = s.get("kv_blocks_free", 0)
        queries = s.get("prefix_queries", 0)
        hits = s.get("prefix_hits", 0)
        yield gauge("num_requests_running", "Requests in the engine's running batch.", s.get("num_running", 0))
        yield gauge("num_requests_waiting", "Requests queued in the engine, waiting to run.", s.get("num_waiting", 0))
        yield gauge("num_requests_in_flight", "HTTP generation requests being served.", self.metrics.in_flight)
        yield gauge("kv_cache_blocks_total", "KV-cache blocks in the pool.", total)
        yield gauge("kv_cache_blocks_used", "KV-cache blocks referenced by requests.", total - free)
        yield gauge("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1).", (total - free) / total if total else 0.0)
        yield gauge("prefix_cache_hit_rate", "Prompt tokens served from the prefix cache / tokens looked up.",
                    hits / queries if queries else 0.0)
        yield counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", queries)
        yield counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.", hits)
        yield counter("num_preemptions", "Requests preempted for lack of KV blocks.", s.get("num_preemptions", 0))
        yield counter("engine_prefill_tokens", "Prompt tokens the engine scheduled for computation (prefill and "
                      "recompute after preemption; prefix-cache hits excluded).", s.get("num_prefill_tokens", 0))
        if "spec_draft_tokens" in s:  # speculative decoding is on
            yield counter("spec_decode_num_draft_tokens", "Draft tokens proposed and verified.", s["spec_draft_tokens"])
            yield counter("spec_decode_num_accepted_tokens", "Draft tokens accepted by the target model.",
                          s["spec_accepted_tokens"])
            yield counter("spec_decode_num_verify_steps", "Verify steps (one per speculating request and step).",
                          s["spec_verify_steps"])
            yield gauge("spec_decode_acceptance_rate", "Accepted / proposed draft tokens since start.",
                        s["spec_acceptance_rate"])
            yield gauge("spec_decode_mean_accepted_length",
                        "Tokens emitted per verify step (accepted drafts + the target's token).",
                        s["spec_mean_accepted_length"])
            yield counter("spec_decode_draft_time_seconds", "Time spent proposing drafts.", s["spec_draft_time_s"])


class ServerMetrics:
    def __init__(self, engine: AsyncLLMEngine, model_name: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.model_name = model_name
        self.in_flight = 0
        reg, labels = self.registry, ["model_name"]
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens of requests added.", labels, registry=reg).labels(model_name)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Tokens generated.", labels, registry=reg).labels(model_name)
        self.request_success = Counter(
            PREFIX + "request_success", "Requests finished, by finish reason.", ["model_name", "finished_reason"], registry=reg
        )
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Time from request arrival to its first token.",
                              labels, buckets=_TTFT_BUCKETS, registry=reg).labels(model_name)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds", "Time between successive token batches of a request.",
                             labels, buckets=_ITL_BUCKETS, registry=reg).labels(model_name)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "Time from request arrival to its last token.",
                             labels, buckets=_E2E_BUCKETS, registry=reg).labels(model_name)
        self.rejected = Counter(
            PREFIX + "request_rejected", "Requests refused with 429 because the engine was overloaded, by reason "
            "(queue_full: --max-waiting-requests; queue_timeout: --max-queue-time).",
            ["model_name", "reason"], registry=reg,
        )
        for reason in ("queue_full", "queue_timeout"):
            self.rejected.labels(model_name, reason)
        self.registry.register(_EngineCollector(engine, model_name, self))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def count_abort(self, n: int = 1) -> None:
        self.request_success.labels(self.model_name, "abort").inc(n)

    def count_rejected(self, reason: str) -> None:
        self.rejected.labels(self.model_name, reason).inc()

    def tracker(self, num_prompt_tokens: int) -> RequestTracker:
        self.prompt_tokens.inc(num_prompt_tokens)
        return RequestTracker(self)


class RequestTracker:
    """Per engine request: feeds TTFT, inter-token latency, token and finish counters."""

    __slots__ = ("m", "start", "last", "done")

    def __init__(self, metrics: ServerMetrics) -> None:
        self.m = metrics
        self.start = time.perf_counter()
        self.last: float | None = None
        self.done = False

    def observe(self, out: RequestOutput) -> None:
        new = sum(len(c.delta_token_ids) for c in out.outputs)
        now = time.perf_counter()
        if new:
            self.m.generation_tokens.inc(new)
            if self.last is None:
                self.m.ttft.observe(now - self.start)
            else:
                self.m.itl.observe(now - self.last)
            self.last = now
        if out.finished and not self.done:
            self.done = True
            self.m.e2e.observe(now - self.start)
            for c in out.outputs:
                self.m.request_success.labels(self.m.model_name, c.finish_reason or "abort").inc()
