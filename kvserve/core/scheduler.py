"""Continuous batching with chunked prefill and preemption by recompute. Pure Python.

Each step the scheduler decides how many tokens of which requests to compute and hands the
runner a `SchedulerOutput`. Prefill, chunked prefill and decode are not separate modes: a
request is simply asked to compute `num_tokens - num_computed_tokens` more tokens, capped by
the step's token budget. Running requests are served first (oldest first); when the pool runs
dry the newest running request is preempted (its blocks freed, its progress reset) and put back
at the front of the waiting queue, to be recomputed later — nothing is ever dropped.

Asynchronous scheduling: while step N runs, `schedule_ahead(N)` may plan step N+1 before N's
sampled tokens are known. It only does so for a pure decode continuation that cannot change
what `schedule()` would have done: every running request samples in N, nobody waits, every
request's next slot fits without preemption, no request can end at N for lack of room, and no
request samples with its token history on the host (penalties, `min_tokens`). Each row of N+1
then computes the token N samples (a placeholder until N's result is back).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Iterable

from kvserve.core.config import CacheConfig, SchedulerConfig
from kvserve.core.kv_cache_manager import KVCacheManager
from kvserve.core.request import Request, RequestStatus
from kvserve.core.sampling_params import SamplingParams


@dataclass(slots=True)
class NewRequestData:
    """A request the runner has no state for (first admission or resumed after preemption)."""

    req_id: str
    token_ids: list[int]  # prompt + tokens generated so far
    num_prompt_tokens: int
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int  # prefix-cache hits


@dataclass(slots=True)
class CachedRequestData:
    """A request the runner already holds: only what changed."""

    req_id: str
    new_block_ids: list[int]
    num_computed_tokens: int
    # Blocks of the request's table before `new_block_ids` (-1: unchanged). Smaller than the
    # runner's copy after a speculative step released rejected drafts' blocks.
    num_kept_blocks: int = -1


@dataclass
class SchedulerOutput:
    new_requests: list[NewRequestData] = field(default_factory=list)
    cached_requests: list[CachedRequestData] = field(default_factory=list)
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    # Requests that left since the last step (finished, aborted or preempted): drop their state.
    finished_req_ids: set[str] = field(default_factory=set)
    preempted_req_ids: set[str] = field(default_factory=set)
    # Speculative decoding: a request listed here computes its last token and these drafts
    # (num_scheduled_tokens = 1 + len(drafts)) and samples at every one of those positions.
    spec_token_ids: dict[str, list[int]] = field(default_factory=dict)

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())

    @property
    def is_empty(self) -> bool:
        return not self.num_scheduled_tokens


class Scheduler:
    def __init__(self, sched: SchedulerConfig, cache: CacheConfig, num_blocks: int) -> None:
        if num_blocks * cache.block_size < sched.max_model_len:
            raise ValueError(
                f"the KV cache holds {num_blocks * cache.block_size} tokens, fewer than "
                f"max_model_len={sched.max_model_len}: give it more memory or lower max_model_len"
            )
        self.config = sched
        self.kv = KVCacheManager(num_blocks, cache.block_size, cache.enable_prefix_caching)
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._finished_since_last: set[str] = set()
        self.num_preemptions = 0
        self._sampled_last_step: set[str] = set()
        # Speculative decoding totals: verify steps of a request, draft tokens, accepted ones.
        self.num_spec_verifies = 0
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0

    # -- queue management -------------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"request_id {req.request_id!r} is already in use")
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def finish_requests(self, req_ids: Iterable[str], status: RequestStatus) -> list[Request]:
        """End requests now (abort, or a stop string found by the detokenizer) and free
        their blocks. Unknown or already finished ids are ignored."""
        done = []
        for rid in req_ids:
            req = self.requests.get(rid)
            if req is None or req.status.finished:
                continue
            if req.status == RequestStatus.RUNNING:
                self.running.remove(req)
            else:
                self.waiting.remove(req)
            req.status = status
            self._retire(req)
            done.append(req)
        return done

    def _retire(self, req: Request) -> None:
        self.kv.free(req)
        self.requests.pop(req.request_id, None)
        self._finished_since_last.add(req.request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # -- one step ---------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(finished_req_ids=self._finished_since_last)
        self._finished_since_last = set()
        budget = self.config.max_num_batched_tokens
        preempted = False
        if not self.config.enable_kv_cache:
            self._drop_cache_of_running(out)

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            kept = len(req.block_ids)
            num_new, new_blocks = self._allocate_running(req, budget)
            while new_blocks is None:
                victim = self.running.pop()  # the newest request yields first
                self._preempt(victim, out)
                preempted = True
                if victim is req:
                    break
                new_blocks = self.kv.allocate_slots(req, num_new)
            if new_blocks is None:
                break
            out.cached_requests.append(CachedRequestData(req.request_id, new_blocks, req.num_computed_tokens, kept))
            out.num_scheduled_tokens[req.request_id] = num_new
            if req.spec_token_ids:
                out.spec_token_ids[req.request_id] = req.spec_token_ids
                req.spec_token_ids = []
            budget -= num_new
            i += 1

        # Admitting new work right after a preemption would only thrash the cache.
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            hits, num_hit = self.kv.get_computed_blocks(req)
            num_new = req.num_tokens - num_hit
            if num_new > budget:
                if not self.config.enable_chunked_prefill:
                    break
                num_new = budget
            req.num_computed_tokens = 0
            new_blocks = self.kv.allocate_slots(req, num_new, hits)
            if new_blocks is None:
                break
            self.waiting.popleft()
            req.num_computed_tokens = num_hit
            req.num_cached_tokens = num_hit
            if self.kv.enable_prefix_caching:
                self.kv.prefix_queries += req.num_tokens
                self.kv.prefix_hits += num_hit
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.new_requests.append(
                NewRequestData(
                    req.request_id, list(req.all_token_ids), req.num_prompt_tokens,
                    req.sampling_params, list(req.block_ids), num_hit,
                )
            )
            out.num_scheduled_tokens[req.request_id] = num_new
            budget -= num_new
        return out

    def _allocate_running(self, req: Request, budget: int) -> tuple[int, list[int] | None]:
        """Slots for a running request's next tokens, its draft tokens included (those the
        budget leaves out are dropped; all of them when their blocks do not fit, before any
        preemption is considered). Returns (tokens scheduled, new block ids or None)."""
        spec = req.spec_token_ids
        num_new = min(req.num_tokens + len(spec) - req.num_computed_tokens, budget)
        if spec:
            del spec[max(num_new - 1, 0) :]
            new_blocks = self.kv.allocate_slots(req, num_new)
            if new_blocks is not None:
                return num_new, new_blocks
            spec.clear()
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
        return num_new, self.kv.allocate_slots(req, num_new)

    def schedule_ahead(self, inflight: SchedulerOutput) -> SchedulerOutput | None:
        """Plan the step after `inflight` (the one step still running, whose tokens are not
        back yet): one decode of each running request, its input the token `inflight` samples.
        None when that is not certainly what `schedule()` would plan after `inflight`'s
        update (see the module docstring); then the caller waits and calls `schedule()`.

        Progress is not advanced here: `update_from_output(inflight)` and then
        `update_from_output(this plan)` each add their own scheduled tokens."""
        cfg = self.config
        if not cfg.enable_kv_cache or self.waiting or not self.running:
            return None
        if len(self.running) > cfg.max_num_batched_tokens:
            return None
        new_blocks = 0
        for req in self.running:
            n = inflight.num_scheduled_tokens.get(req.request_id)
            if n is None or req.num_computed_tokens + n != req.num_tokens:
                return None  # not sampled by `inflight` (mid-prefill, or left out by the budget)
            if req.spec_token_ids:
                return None  # a verify step samples several tokens: not a one-token decode
            sp = req.sampling_params
            # The host copy of the history lacks the placeholder: samplers that read it wait.
            if sp.repetition_penalty != 1.0 or sp.presence_penalty or sp.frequency_penalty:
                return None
            if req.num_output_tokens < sp.min_tokens:
                return None
            # The in-flight token may end the request by length: nothing to plan after it.
            if req.num_output_tokens + 1 >= req.max_tokens or req.num_tokens + 1 >= cfg.max_model_len:
                return None
            if self.kv.blocks_needed(req.num_tokens + 1) > len(req.block_ids):
                new_blocks += 1
        # All or nothing, and never a preemption: a block for every placeholder that starts one.
        if new_blocks > self.kv.num_free_blocks:
            return None
        out = SchedulerOutput(finished_req_ids=self._finished_since_last)
        self._finished_since_last = set()
        for req in self.running:
            added: list[int] = []
            if self.kv.blocks_needed(req.num_tokens + 1) > len(req.block_ids):
                # The placeholder (position num_tokens) opens a new block, so the blocks this
                # allocation fills hold real tokens only: their prefix hashes are right.
                added = self.kv.allocate_slots(req, req.num_tokens + 1 - req.num_computed_tokens)
                if added is None:  # pragma: no cover - counted above
                    raise RuntimeError("schedule_ahead: block pool changed while planning")
            out.cached_requests.append(CachedRequestData(req.request_id, added, req.num_tokens))
            out.num_scheduled_tokens[req.request_id] = 1
        return out

    def _drop_cache_of_running(self, out: SchedulerOutput) -> None:
        """KV-cache ablation: forget every running request's cached K/V, so this step
        recomputes its whole context (a prefill of all its tokens) before sampling."""
        for req in reversed(self.running):
            if req.request_id not in self._sampled_last_step:
                continue  # still inside a chunked (re)computation: keep its progress
            self.kv.free(req)
            req.num_computed_tokens = 0
            req.spec_token_ids = []
            req.status = RequestStatus.WAITING
            self.waiting.appendleft(req)
            out.preempted_req_ids.add(req.request_id)
        self.running = [r for r in self.running if r.status == RequestStatus.RUNNING]

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        self.kv.free(req)
        req.spec_token_ids = []
        out.spec_token_ids.pop(req.request_id, None)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)
        out.preempted_req_ids.add(req.request_id)
        out.cached_requests = [c for c in out.cached_requests if c.req_id != req.request_id]
        out.num_scheduled_tokens.pop(req.request_id, None)

    def update_from_output(
        self, out: SchedulerOutput, sampled: dict[str, list[int]]
    ) -> tuple[list[Request], list[Request]]:
        """Advance progress by the computed tokens and append sampled ones.
        Returns (requests that got new tokens, requests that finished)."""
        updated: list[Request] = []
        finished: list[Request] = []
        self._sampled_last_step = set(sampled)
        max_len = self.config.max_model_len
        for rid, n in out.num_scheduled_tokens.items():
            req = self.requests.get(rid)
            if req is None or req.status != RequestStatus.RUNNING:
                continue  # aborted while the step ran
            req.num_computed_tokens += n
            tokens = sampled.get(rid)
            if not tokens:
                continue  # a prefill chunk that is not the prompt's last
            for tok in tokens:
                req.append_output_token(tok)
                if req.check_stop(max_len):
                    break
            drafts = out.spec_token_ids.get(rid)
            if drafts:
                self._after_verify(req, len(drafts), len(tokens) - 1)
            updated.append(req)
            if req.status.finished:
                self.running.remove(req)
                self._retire(req)
                finished.append(req)
        return updated, finished

    def _after_verify(self, req: Request, num_drafts: int, num_accepted: int) -> None:
        """A speculative step computed the last token and `num_drafts` drafts, of which
        `num_accepted` were accepted (the token after them is the new, uncomputed last one):
        the K/V of every token but the last is valid; the rejected drafts' slots are not."""
        req.num_draft_tokens += num_drafts
        req.num_accepted_tokens += num_accepted
        self.num_spec_verifies += 1
        self.num_draft_tokens += num_drafts
        self.num_accepted_tokens += num_accepted
        req.num_computed_tokens = req.num_tokens - 1
        self.kv.trim(req, req.num_computed_tokens)
