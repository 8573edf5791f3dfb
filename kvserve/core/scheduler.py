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
then computes the token N samples (a placeholder until N's result is back). A grammar
(structured output) does not block it: the runner waits for N's tokens only before N+1's
sampling, while N+1's forward already runs.

Latency policy (what keeps an abort or a new short request from waiting behind a long prompt):

- **Step time budget** (optional, `set_step_time_budget`; the server turns it on for CPU): the
  step's token budget is also capped so that the step should take about that many seconds,
  from a running estimate of the per-step overhead and the per-token cost (`record_step`).
  A long prompt is then prefilled in several short chunks, and aborts and new requests are
  applied at every chunk boundary. Prompts always get at least max(16, number of decodes)
  tokens a step, so a big decode batch on a slow machine cannot starve them (such a step takes
  up to about twice a decode-only step).
- **Decodes first**: every running request that needs one token gets it before any prefill
  chunk takes budget.
- **Prefill share**: while requests wait (and could be admitted), the chunks of prompts already
  being prefilled get at most half of what the decodes leave; the rest admits waiting requests
  in arrival order. A waiting prompt too long for what is left is admitted with a chunk of at
  most half of it (at least one block) when others could follow it in the same step. So a new
  short request is admitted within a step or two of its arrival even while long prompts are
  being prefilled, and a long prompt still advances every step.
"""

from __future__ import annotations

import math
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
        # Prompt tokens scheduled for computation (prefill and recompute), for metrics.
        self.num_prefill_tokens = 0
        # Step time budget (None: token budget only) and the cost model it is enforced with.
        self.step_time_budget: float | None = None
        self._step_overhead: float | None = None  # EMA of the time of steps of few tokens (s)
        self._token_cost: float | None = None  # EMA of the time per token of larger steps (s)
        self._last_step_tokens = 0
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

    def is_queued(self, req_id: str) -> bool:
        """True while the request waits for its first admission (never scheduled yet)."""
        req = self.requests.get(req_id)
        return req is not None and req.status == RequestStatus.WAITING and req.num_computed_tokens == 0

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # -- step time budget ---------------------------------------------------------------------
    _SMALL_STEP = 8  # steps of at most this many tokens measure the fixed per-step cost
    _LARGE_STEP = 32  # steps of at least this many tokens measure the per-token cost
    _MIN_TIMED_TOKENS = 16  # the time budget never cuts a step's prefill below this
    _UNTIMED_CAP = 64  # tokens per step until the per-token cost was measured
    _EMA = 0.3

    @property
    def last_step_tokens(self) -> int:
        """Tokens the step last planned (by `schedule` or `schedule_ahead`) computes."""
        return self._last_step_tokens

    def set_step_time_budget(self, seconds: float | None) -> None:
        """Aim for steps of about `seconds` (None: no time cap, only `max_num_batched_tokens`)."""
        if seconds is not None and (not math.isfinite(seconds) or seconds <= 0):
            raise ValueError(f"step_time_budget must be a positive number of seconds (got {seconds!r})")
        self.step_time_budget = seconds

    def record_step(self, seconds: float) -> None:
        """Feed the wall time of the step last returned by `schedule()` into the cost model."""
        n = self._last_step_tokens
        if n <= 0 or not math.isfinite(seconds) or seconds < 0:
            return
        a = self._EMA
        if n <= self._SMALL_STEP:
            self._step_overhead = seconds if self._step_overhead is None else (1 - a) * self._step_overhead + a * seconds
        if n >= self._LARGE_STEP:
            per_token = max(seconds - (self._step_overhead or 0.0), 0.0) / n
            self._token_cost = per_token if self._token_cost is None else (1 - a) * self._token_cost + a * per_token

    def step_token_budget(self, num_decodes: int = 0) -> int:
        """Tokens the next step may compute: `max_num_batched_tokens`, capped by the step time
        budget when one is set, but never below the decodes plus max(16, decodes) prompt
        tokens. Until a large step was timed the cap is `_UNTIMED_CAP` tokens."""
        budget = self.config.max_num_batched_tokens
        target = self.step_time_budget
        if target is None:
            return budget
        if self._token_cost is None:
            cap = self._UNTIMED_CAP
        elif self._token_cost <= 0:
            cap = budget
        else:
            left = max(target - (self._step_overhead or 0.0), 0.0)
            cap = int(left / self._token_cost)
        # Prefill always gets at least max(_MIN_TIMED_TOKENS, num_decodes) tokens: when the
        # decodes alone take the whole time budget (a big batch, a slow or busy machine), a step
        # may take up to about twice a decode-only step rather than starve every prompt.
        floor = num_decodes + max(self._MIN_TIMED_TOKENS, num_decodes)
        return max(1, min(budget, max(cap, floor)))

    # -- one step ---------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(finished_req_ids=self._finished_since_last)
        self._finished_since_last = set()
        preempted = False
        if not self.config.enable_kv_cache:
            self._drop_cache_of_running(out)
        # Decodes first: one token for each running request that only needs one is set aside.
        decodes_left = sum(1 for r in self.running if r.num_tokens - r.num_computed_tokens == 1)
        budget = self.step_token_budget(decodes_left)
        can_admit = bool(self.waiting) and len(self.running) < self.config.max_num_seqs
        # Prefill share: while requests wait, running prompts' chunks get half of what is left.
        prefill_left = max(budget - decodes_left, 0)
        if can_admit:
            prefill_left //= 2

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            remaining = req.num_tokens - req.num_computed_tokens
            kept = len(req.block_ids)
            if remaining == 1:  # a decode, with its draft tokens when it speculates
                decodes_left -= 1
                num_new, new_blocks = self._allocate_running(req, max(1, budget - max(decodes_left, 0)))
            else:
                num_new = min(remaining, prefill_left, budget - max(decodes_left, 0))
                if num_new <= 0:
                    i += 1  # its prompt continues next step
                    continue
                new_blocks = self.kv.allocate_slots(req, num_new)
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
            if remaining > 1:
                prefill_left -= num_new
                self.num_prefill_tokens += min(num_new, max(req.num_prompt_tokens - req.num_computed_tokens, 0))
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
                if len(self.waiting) > 1 and len(self.running) + 1 < self.config.max_num_seqs:
                    # Others could follow it in this step: leave them half.
                    num_new = max(budget // 2, min(budget, self.kv.block_size))
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
            self.num_prefill_tokens += min(num_new, max(req.num_prompt_tokens - num_hit, 0))
            budget -= num_new
        self._last_step_tokens = out.total_num_scheduled_tokens
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
        self._last_step_tokens = len(self.running)
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
