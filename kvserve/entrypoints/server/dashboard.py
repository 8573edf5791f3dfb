"""The live dashboard: `GET /dashboard` (a static HTML page) and `GET /dashboard/state` (JSON it
polls about twice a second).

The state is read on the engine thread between two steps (`AsyncLLMEngine.call_in_engine_thread`),
never from the asyncio thread while the engine mutates it. Reading it costs O(blocks) Python work,
so it is done only when a dashboard asks, and one snapshot serves every poll within
`_MIN_INTERVAL_S`, or within 20x the time the last snapshot took on the engine thread, whichever
is longer (so even a huge pool costs the engine at most ~5% of its time).

The block grid: one cell per KV block, up to `MAX_CELLS` cells. A bigger pool is aggregated,
`blocks_per_cell` consecutive blocks per cell; such a cell shows the request holding most of its
blocks (else "cached" if any of them holds a cached prefix, else "free"), and `fill` says what
fraction of its blocks are in use (0-9).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from importlib import resources
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, JSONResponse

from kvserve.engine.async_engine import AsyncLLMEngine, EngineDeadError
from kvserve.entrypoints.server.errors import APIError

if TYPE_CHECKING:
    from kvserve.core.request import Request
    from kvserve.engine.llm_engine import LLMEngine

logger = logging.getLogger(__name__)

MAX_CELLS = 4096
MAX_LISTED = 64  # requests listed per table (the counts are always exact)
FREE, CACHED = -1, -2  # cell codes; a code >= 0 is an index into the owners list
_MIN_INTERVAL_S = 0.2
_MAX_ENGINE_SHARE = 0.05  # of the engine thread's time spent on snapshots, at most
_RATE_WINDOW_S = 3.0


def engine_snapshot(engine: LLMEngine, max_cells: int = MAX_CELLS) -> dict[str, Any]:
    """Block grid, running and waiting requests and prefix-cache counters of `engine`. Call it
    on the engine thread only."""
    t0 = time.perf_counter()
    sched = engine.scheduler
    kv = sched.kv
    pool = kv.pool
    n = pool.num_blocks
    state = [FREE] * n
    for blk in pool.cached.values():
        if blk.ref_cnt == 0:
            state[blk.block_id] = CACHED
    num_cached_free = state.count(CACHED)

    owners_by_id = kv.block_owners()
    order = [r.request_id for r in sched.running if r.request_id in owners_by_id]
    seen = set(order)
    order += [rid for rid in owners_by_id if rid not in seen]  # defensive: a holder not running
    shared: set[int] = set()
    for idx, rid in enumerate(order):
        for b in owners_by_id[rid]:
            if state[b] >= 0:
                shared.add(b)  # keep the first holder's colour
            else:
                state[b] = idx
    used = n - pool.num_free

    per_cell = max(1, -(-n // max_cells))
    if per_cell == 1:
        cells, fill = state, None
        shared_cells = sorted(shared)
    else:
        cells, fill = _aggregate(state, per_cell)
        shared_cells = sorted({b // per_cell for b in shared})

    running = {r.request_id: r for r in sched.running}
    holders = [_request_row(running.get(rid) or sched.requests.get(rid), rid, len(owners_by_id[rid]))
               for rid in order[:MAX_LISTED]]
    waiting = [_request_row(r, r.request_id, 0) for r in list(sched.waiting)[:MAX_LISTED]]
    return {
        "num_blocks": n,
        "block_size": kv.block_size,
        "blocks_used": used,
        "blocks_cached_free": num_cached_free,
        "blocks_free": pool.num_free - num_cached_free,
        "blocks_shared": len(shared),
        "blocks_per_cell": per_cell,
        "cells": cells,
        "fill": fill,
        "shared_cells": shared_cells,
        "owners": order,
        "num_running": sched.num_running,
        "num_waiting": sched.num_waiting,
        "running": holders,
        "waiting": waiting,
        "prefix_caching": kv.enable_prefix_caching,
        "prefix_queries": kv.prefix_queries,
        "prefix_hits": kv.prefix_hits,
        "prefix_hit_rate": kv.prefix_hits / kv.prefix_queries if kv.prefix_queries else 0.0,
        "num_preemptions": sched.num_preemptions,
        "spec_decode": sched.num_draft_tokens > 0,
        "spec_draft_tokens": sched.num_draft_tokens,
        "spec_accepted_tokens": sched.num_accepted_tokens,
        "spec_acceptance_rate": sched.num_accepted_tokens / sched.num_draft_tokens if sched.num_draft_tokens else 0.0,
        "spec_mean_accepted_length": 1 + sched.num_accepted_tokens / sched.num_spec_verifies if sched.num_spec_verifies else 0.0,
        "snapshot_ms": 1e3 * (time.perf_counter() - t0),
    }


def _aggregate(state: list[int], per_cell: int) -> tuple[list[int], str]:
    cells: list[int] = []
    fill: list[str] = []
    for start in range(0, len(state), per_cell):
        chunk = state[start : start + per_cell]
        counts: dict[int, int] = {}
        for code in chunk:
            if code >= 0:
                counts[code] = counts.get(code, 0) + 1
        in_use = sum(counts.values())
        if counts:
            cells.append(max(counts, key=counts.__getitem__))
        else:
            cells.append(CACHED if CACHED in chunk else FREE)
        fill.append(str(-(-in_use * 9 // len(chunk))))  # any use shows as at least 1
    return cells, "".join(fill)


def _request_row(req: Request | None, rid: str, num_blocks: int) -> dict[str, Any]:
    if req is None:
        return {"id": rid, "blocks": num_blocks}
    return {
        "id": rid,
        "status": req.status.name.lower(),
        "prompt_tokens": req.num_prompt_tokens,
        "output_tokens": req.num_output_tokens,
        "computed_tokens": req.num_computed_tokens,
        "cached_tokens": req.num_cached_tokens,
        "blocks": num_blocks,
        "preemptions": req.num_preemptions,
    }


class Dashboard:
    """Serves the page and its state; keeps the samples that tokens/s is computed from."""

    def __init__(self, engine: AsyncLLMEngine, model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name
        self.html = (resources.files("kvserve.entrypoints.server") / "static" / "dashboard.html").read_text("utf-8")
        self._last: dict[str, Any] | None = None
        self._last_at = 0.0
        self._interval = _MIN_INTERVAL_S
        self._lock = asyncio.Lock()
        self._samples: deque[tuple[float, int]] = deque()  # (monotonic time, tokens generated)

    def tokens_per_s(self, now: float) -> float:
        """Generation tokens/s over the last few seconds of polls."""
        total = self.engine.num_generated_tokens
        samples = self._samples
        if samples and now - samples[-1][0] > 3 * _RATE_WINDOW_S:
            samples.clear()  # nobody watched for a while: no average over the gap
        samples.append((now, total))
        while len(samples) > 2 and now - samples[1][0] >= _RATE_WINDOW_S:
            samples.popleft()
        t0, n0 = samples[0]
        return (total - n0) / (now - t0) if now > t0 else 0.0

    async def state(self) -> dict[str, Any]:
        async with self._lock:  # concurrent polls share one engine-thread snapshot
            now = time.monotonic()
            if self._last is None or now - self._last_at >= self._interval:
                if not self.engine.is_running:
                    raise APIError(503, f"engine is not running: {self.engine.dead_error or 'not started'}")
                try:
                    snap = await self.engine.call_in_engine_thread(engine_snapshot)
                except EngineDeadError as e:
                    raise APIError(503, str(e)) from e
                except asyncio.TimeoutError as e:
                    raise APIError(503, "the engine did not finish its step in time; try again") from e
                now = time.monotonic()
                self._interval = max(_MIN_INTERVAL_S, snap["snapshot_ms"] / 1e3 / _MAX_ENGINE_SHARE)
                snap["model"] = self.model_name
                snap["generation_tokens_total"] = self.engine.num_generated_tokens
                snap["tokens_per_s"] = self.tokens_per_s(now)
                snap["time"] = time.time()
                self._last, self._last_at = snap, now
            return self._last


def add_dashboard_routes(app: FastAPI, dashboard: Dashboard) -> None:
    @app.get("/dashboard")
    async def dashboard_page() -> HTMLResponse:
        return HTMLResponse(dashboard.html, headers={"Cache-Control": "no-cache"})

    @app.get("/dashboard/state")
    async def dashboard_state() -> JSONResponse:
        return JSONResponse(await dashboard.state(), headers={"Cache-Control": "no-store"})
