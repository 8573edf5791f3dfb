"""The scheduler's latency policy (no torch): the step time budget, decodes first, and the
prefill share that lets a new short request in while a long prompt is being prefilled."""

from __future__ import annotations

import pytest

from kvserve.core.config import CacheConfig, SchedulerConfig
from kvserve.core.request import Request
from kvserve.core.sampling_params import SamplingParams
from kvserve.core.scheduler import Scheduler

GREEDY = SamplingParams(temperature=0)


def _sched(budget: int = 2048, max_num_seqs: int = 64) -> Scheduler:
    cfg = SchedulerConfig(max_model_len=1024, max_num_batched_tokens=budget, max_num_seqs=max_num_seqs)
    return Scheduler(cfg, CacheConfig(block_size=16), 512)


def _step(s: Scheduler, seconds_per_token: float = 0.0) -> dict[str, int]:
    so = s.schedule()
    s.record_step(0.001 + seconds_per_token * so.total_num_scheduled_tokens)
    sampled = {rid: [7] for rid, n in so.num_scheduled_tokens.items()
               if s.requests[rid].num_computed_tokens + n >= s.requests[rid].num_tokens}
    s.update_from_output(so, sampled)
    return dict(so.num_scheduled_tokens)


def test_no_time_budget_keeps_the_token_budget():
    s = _sched()
    s.add_request(Request("a", list(range(900)), GREEDY, max_tokens=2))
    assert _step(s) == {"a": 900}


def test_time_budget_chunks_a_long_prefill():
    s = _sched()
    s.set_step_time_budget(0.2)
    s.add_request(Request("a", list(range(900)), GREEDY, max_tokens=2))
    assert _step(s, 0.01) == {"a": 64}  # not yet timed: a small first chunk
    sizes = [_step(s, 0.01)["a"] for _ in range(3)]
    assert all(15 <= n <= 20 for n in sizes), sizes  # ~0.2 s at 10 ms a token
    s.set_step_time_budget(None)
    assert _step(s)["a"] > 500


def test_time_budget_is_validated():
    with pytest.raises(ValueError, match="step_time_budget"):
        _sched().set_step_time_budget(0)


def test_decodes_first_and_a_short_request_gets_in_during_a_long_prefill():
    s = _sched(budget=64)
    s.add_request(Request("d", [1, 2, 3], GREEDY, max_tokens=50))
    _step(s)  # "d" is decoding now
    s.add_request(Request("long", list(range(10, 600)), GREEDY, max_tokens=2))
    assert _step(s) == {"d": 1, "long": 63}
    s.add_request(Request("short", [5, 6, 7, 8], GREEDY, max_tokens=2))
    # The decode first; then while "short" waits, "long" gets half of what is left.
    assert _step(s) == {"d": 1, "long": 31, "short": 4}
    assert s.requests["short"].num_output_tokens == 1  # first token after one step
    assert _step(s) == {"d": 1, "short": 1, "long": 62}  # nobody waits: the whole budget again


def test_a_long_waiting_prompt_leaves_room_for_those_behind_it():
    s = _sched(budget=64)
    s.add_request(Request("long", list(range(10, 600)), GREEDY, max_tokens=2))
    s.add_request(Request("short", [5, 6, 7, 8], GREEDY, max_tokens=2))
    assert _step(s) == {"long": 32, "short": 4}


def test_is_queued():
    s = _sched(budget=16)
    s.add_request(Request("a", list(range(40)), GREEDY, max_tokens=2))
    s.add_request(Request("b", list(range(50, 90)), GREEDY, max_tokens=2))
    assert s.is_queued("a") and s.is_queued("b") and not s.is_queued("nope")
    _step(s)
    assert not s.is_queued("a")
