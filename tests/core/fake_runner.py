"""A torch-free stand-in for the model runner that really uses the paged KV cache.

The "model" predicts the next token from the context it *reads back from cache slots* through
the block table, so any bookkeeping error (wrong block table, stale prefix-cache hit, chunk
boundary off by one, lost state on preemption) changes the output. The ground truth is the
same function applied to the plain token list.
"""

from __future__ import annotations

from kvserve.core.config import CacheConfig, SchedulerConfig
from kvserve.core.request import Request, RequestStatus
from kvserve.core.sampling_params import SamplingParams
from kvserve.core.scheduler import Scheduler, SchedulerOutput

VOCAB = 1000


def next_token(context: list[int]) -> int:
    h = 0
    for pos, tok in enumerate(context):
        h = (h * 31 + tok * (pos + 7)) % 1_000_003
    return h % VOCAB


def reference(prompt: list[int], max_tokens: int) -> list[int]:
    toks = list(prompt)
    for _ in range(max_tokens):
        toks.append(next_token(toks))
    return toks[len(prompt):]


class FakeRunner:
    def __init__(self, block_size: int) -> None:
        self.bs = block_size
        self.slots: dict[int, int] = {}  # slot -> token stored there
        self.states: dict[str, dict] = {}
        self.tokens_computed = 0

    def execute(self, so: SchedulerOutput) -> dict[str, list[int]]:
        for rid in so.finished_req_ids | so.preempted_req_ids:
            self.states.pop(rid, None)
        for nr in so.new_requests:
            self.states[nr.req_id] = {"tokens": list(nr.token_ids), "blocks": list(nr.block_ids), "computed": nr.num_computed_tokens}
        for cr in so.cached_requests:
            st = self.states[cr.req_id]
            st["blocks"].extend(cr.new_block_ids)
            st["computed"] = cr.num_computed_tokens
        bs = self.bs
        # Like a real layer: every new K/V of the step is written before any attention reads.
        for rid, n in so.num_scheduled_tokens.items():
            st = self.states[rid]
            for pos in range(st["computed"], st["computed"] + n):
                self.slots[st["blocks"][pos // bs] * bs + pos % bs] = st["tokens"][pos]
            self.tokens_computed += n
        sampled = {}
        for rid, n in so.num_scheduled_tokens.items():
            st = self.states[rid]
            end = st["computed"] + n
            if end == len(st["tokens"]):
                ctx = [self.slots[st["blocks"][p // bs] * bs + p % bs] for p in range(end)]
                tok = next_token(ctx)
                st["tokens"].append(tok)
                sampled[rid] = [tok]
        return sampled


def run_all(
    prompts: list[list[int]],
    max_tokens: list[int] | int,
    *,
    num_blocks: int = 256,
    block_size: int = 4,
    budget: int = 64,
    max_num_seqs: int = 16,
    max_model_len: int = 256,
    prefix_caching: bool = True,
    chunked: bool = True,
    arrivals: list[int] | None = None,
    kv_cache: bool = True,
    ahead: bool = False,
    aborts: dict[int, str] | None = None,
    params: list[SamplingParams] | None = None,
) -> tuple[dict[str, list[int]], Scheduler, FakeRunner]:
    """Run requests to completion; `arrivals[i]` is the step at which request i is added.

    `ahead`: drive the scheduler like the engine's asynchronous loop: while step N is "in
    flight", `schedule_ahead(N)` may plan N+1, which the (synchronous) runner executes before
    the scheduler sees N's tokens. `aborts[step]` is aborted before that step; `params[i]`
    replaces request i's default SamplingParams. `sched.num_ahead` counts the ahead plans."""
    if isinstance(max_tokens, int):
        max_tokens = [max_tokens] * len(prompts)
    arrivals = arrivals or [0] * len(prompts)
    sched = Scheduler(
        SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                        max_model_len=max_model_len, enable_chunked_prefill=chunked,
                        enable_kv_cache=kv_cache),
        CacheConfig(block_size=block_size, enable_prefix_caching=prefix_caching),
        num_blocks,
    )
    runner = FakeRunner(block_size)
    results: dict[str, list[int]] = {}
    pending = list(range(len(prompts)))
    step = 0
    sched.num_ahead = 0
    inflight = None
    while pending or sched.has_unfinished_requests():
        for i in [i for i in pending if arrivals[i] <= step]:
            sp = params[i] if params else SamplingParams(max_tokens=max_tokens[i], ignore_eos=True)
            sched.add_request(Request(str(i), list(prompts[i]), sp, max_tokens=max_tokens[i]))
            pending.remove(i)
        if aborts and step in aborts:
            sched.finish_requests([aborts[step]], RequestStatus.FINISHED_ABORTED)
        if inflight is None:
            so = sched.schedule()
            inflight = (so, runner.execute(so))
        so, sampled = inflight
        inflight = None
        if ahead:
            nxt = sched.schedule_ahead(so)
            if nxt is not None:
                sched.num_ahead += 1
                inflight = (nxt, runner.execute(nxt))
        _, finished = sched.update_from_output(so, sampled)
        for req in finished:
            results[req.request_id] = list(req.output_token_ids)
        if inflight is None and ahead and sched.has_unfinished_requests():
            nxt = sched.schedule()
            inflight = (nxt, runner.execute(nxt))
        step += 1
        if step > 100_000:
            raise RuntimeError("scheduler made no progress")
    return results, sched, runner
