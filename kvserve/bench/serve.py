"""Streaming clients against any OpenAI-compatible server (`/v1/completions` with token-id
prompts, `ignore_eos`, greedy): a concurrency sweep or a Poisson request rate.

Per level: TTFT, TPOT = (E2E - TTFT) / (output tokens - 1), ITL (gap between streamed chunks)
and E2E as mean / p50 / p90 / p99, output tok/s, and goodput (requests per second that met
the SLO). When the server has kvserve's `/metrics`, its KV usage and running / waiting
requests are sampled while the load runs."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from kvserve.bench.offline import percentiles
from kvserve.bench.workloads import BenchRequest

logger = logging.getLogger(__name__)

_METRIC_RE = re.compile(r"^kvserve:([a-z_]+)(?:\{[^}]*\})? ([-+0-9.eEinfNa]+)$")


@dataclass
class Result:
    ok: bool = False
    ttft: float = 0.0
    e2e: float = 0.0
    output_tokens: int = 0
    itl: list[float] = field(default_factory=list)
    error: str = ""


async def one_request(client: httpx.AsyncClient, model: str, req: BenchRequest) -> Result:
    body = {"model": model, "prompt": req.prompt, "max_tokens": req.output_len, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    res = Result()
    t0 = time.perf_counter()
    last = None
    chunks = 0
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                now = time.perf_counter()
                if "error" in data:
                    res.error = str(data["error"])
                    return res
                if data.get("choices"):
                    chunks += 1
                    if last is None:
                        res.ttft = now - t0
                    else:
                        res.itl.append(now - last)
                    last = now
                if data.get("usage"):
                    res.output_tokens = data["usage"]["completion_tokens"]
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        res.error = f"{type(e).__name__}: {e}"
        return res
    res.e2e = time.perf_counter() - t0
    res.output_tokens = res.output_tokens or chunks
    res.ok = last is not None
    return res


async def _poll_metrics(client: httpx.AsyncClient, t0: float, out: list[dict[str, float]], every: float) -> None:
    while True:
        try:
            r = await client.get("/metrics", timeout=5)
            if r.status_code != 200:
                return
            m = {mm.group(1): float(mm.group(2)) for mm in map(_METRIC_RE.match, r.text.splitlines()) if mm}
            if "kv_cache_usage_perc" not in m:
                return  # not a kvserve server
            out.append({"t": time.perf_counter() - t0, "kv_usage": m["kv_cache_usage_perc"],
                        "num_running": m.get("num_requests_running", 0.0),
                        "num_waiting": m.get("num_requests_waiting", 0.0),
                        "prefix_hit_rate": m.get("prefix_cache_hit_rate", 0.0)})
        except httpx.HTTPError:
            return
        await asyncio.sleep(every)


async def run_load(base_url: str, model: str, reqs: list[BenchRequest], *, concurrency: int | None = None,
                   request_rate: float | None = None, seed: int = 0, api_key: str | None = None,
                   progress: Any = None, metrics_every: float = 0.25) -> tuple[list[Result], float, list[dict]]:
    """Send `reqs` with at most `concurrency` in flight, or as Poisson arrivals at
    `request_rate` per second (unbounded concurrency). Returns results, wall time, timeline."""
    limit = concurrency or len(reqs)
    sem = asyncio.Semaphore(limit)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=limit + 4, max_keepalive_connections=limit + 4)
    timeline: list[dict[str, float]] = []
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=httpx.Timeout(3600.0), limits=limits) as client:
        rng = random.Random(seed)
        t0 = time.perf_counter()
        poller = asyncio.create_task(_poll_metrics(client, t0, timeline, metrics_every))

        async def go(i: int, req: BenchRequest, delay: float) -> Result:
            if delay:
                await asyncio.sleep(delay)
            async with sem:
                r = await one_request(client, model, req)
            if progress is not None:
                progress.update(1)
            return r

        delays, t = [], 0.0
        for _ in reqs:
            delays.append(t)
            if request_rate:
                t += rng.expovariate(request_rate)
        results = await asyncio.gather(*(go(i, r, d if request_rate else 0.0) for i, (r, d) in enumerate(zip(reqs, delays))))
        duration = time.perf_counter() - t0
        poller.cancel()
        try:
            await poller
        except asyncio.CancelledError:
            pass
    return list(results), duration, timeline


def summarize(results: list[Result], duration: float, slo_ttft_ms: float, slo_tpot_ms: float) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    out: dict[str, Any] = {"requests": len(results), "failed": len(results) - len(ok), "duration_s": duration}
    errors = [r.error for r in results if not r.ok]
    if errors:
        out["first_error"] = errors[0]
    if not ok:
        return out

    def tpot(r: Result) -> float | None:
        return (r.e2e - r.ttft) / (r.output_tokens - 1) * 1e3 if r.output_tokens > 1 else None

    tokens = sum(r.output_tokens for r in ok)
    good = [r for r in ok if r.ttft * 1e3 <= slo_ttft_ms and (tpot(r) is None or tpot(r) <= slo_tpot_ms)]
    out.update({
        "output_tokens": tokens, "output_tok_s": tokens / duration, "request_per_s": len(ok) / duration,
        "goodput_req_s": len(good) / duration, "slo": {"ttft_ms": slo_ttft_ms, "tpot_ms": slo_tpot_ms},
        "slo_attained": len(good) / len(results),
        "ttft_ms": percentiles([r.ttft * 1e3 for r in ok]),
        "tpot_ms": percentiles([t for r in ok if (t := tpot(r)) is not None]),
        "itl_ms": percentiles([x * 1e3 for r in ok for x in r.itl]),
        "e2e_ms": percentiles([r.e2e * 1e3 for r in ok]),
        "samples": {"ttft_ms": [r.ttft * 1e3 for r in ok], "tpot_ms": [t for r in ok if (t := tpot(r)) is not None]},
    })
    return out


def wait_healthy(base_url: str, timeout: float = 30.0) -> None:
    """Fail early, with the URL, when nothing answers there."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            r = httpx.get(base_url.rstrip("/") + "/v1/models", timeout=5)
            if r.status_code < 500:
                return
            last = f"HTTP {r.status_code}"
        except httpx.HTTPError as e:
            last = f"{type(e).__name__}: {e}"
        time.sleep(0.5)
    raise ValueError(f"no OpenAI-compatible server answers at {base_url} ({last})")
