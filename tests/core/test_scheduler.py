"""Scheduler + KV-cache manager against a torch-free fake runner (milliseconds per test)."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest

from kvserve.core.config import CacheConfig, SchedulerConfig
from kvserve.core.kv_cache_manager import KVCacheManager
from kvserve.core.request import Request, RequestStatus
from kvserve.core.sampling_params import SamplingParams
from kvserve.core.scheduler import Scheduler
from tests.core.fake_runner import reference, run_all


def _random_prompts(n: int, seed: int, lo: int = 1, hi: int = 40) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1000) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def _expected(prompts, max_tokens):
    return {str(i): reference(p, max_tokens) for i, p in enumerate(prompts)}


def test_core_does_not_import_torch():
    code = (
        "import sys, kvserve.core.scheduler, kvserve.core.kv_cache_manager, "
        "kvserve.core.sampling_params, kvserve.core.config; "
        "sys.exit('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_outputs_match_reference_and_blocks_return():
    prompts = _random_prompts(12, seed=1)
    results, sched, _ = run_all(prompts, 10)
    assert results == _expected(prompts, 10)
    assert sched.kv.num_free_blocks == sched.kv.num_blocks
    assert not sched.requests and not sched.running and not sched.waiting


def test_shared_prefix_reuses_blocks():
    rng = random.Random(3)
    system = [rng.randrange(1000) for _ in range(32)]  # 8 full blocks of 4
    prompts = [system + [rng.randrange(1000) for _ in range(5)] for _ in range(4)]
    # The first request runs alone; the others arrive after it finished.
    results, sched, runner = run_all(prompts, 6, arrivals=[0, 50, 50, 50])
    assert results == _expected(prompts, 6)
    assert sched.kv.prefix_hits >= 3 * 32
    no_cache, _, runner_nc = run_all(prompts, 6, arrivals=[0, 50, 50, 50], prefix_caching=False)
    assert no_cache == results
    assert runner.tokens_computed <= runner_nc.tokens_computed - 3 * 32


def test_identical_prompts_in_one_step_share_blocks():
    prompt = list(range(100, 140))
    results, sched, runner = run_all([prompt] * 4, 3)
    assert results == _expected([prompt] * 4, 3)
    # Only the first copy computes the 9 full shared blocks (36 tokens).
    assert runner.tokens_computed <= 40 + 3 * (4 + 3) + 3


def test_fully_cached_prompt_still_computes_last_token():
    prompt = list(range(16))  # exactly 4 full blocks
    results, sched, _ = run_all([prompt, prompt], 4, arrivals=[0, 30])
    assert results == _expected([prompt, prompt], 4)
    assert sched.kv.prefix_hits == 12  # 3 blocks: the last block is recomputed for its logits


def test_small_cache_preempts_but_gives_same_outputs():
    prompts = _random_prompts(10, seed=5, lo=10, hi=30)
    big, _, _ = run_all(prompts, 24, num_blocks=512)
    small, sched, _ = run_all(prompts, 24, num_blocks=64, max_model_len=64)
    assert sched.num_preemptions > 0
    assert small == big == _expected(prompts, 24)
    assert sched.kv.num_free_blocks == sched.kv.num_blocks


def test_chunked_prefill_matches_unchunked():
    prompts = _random_prompts(6, seed=9, lo=20, hi=60)
    whole, _, _ = run_all(prompts, 8, budget=512, chunked=False)
    chunked, _, _ = run_all(prompts, 8, budget=7)
    assert chunked == whole == _expected(prompts, 8)


def test_evicted_block_is_never_a_stale_hit():
    rng = random.Random(11)
    a = [rng.randrange(1000) for _ in range(24)]
    fillers = [[rng.randrange(1000) for _ in range(30)] for _ in range(6)]
    prompts = [a] + fillers + [a]
    # A small pool: the fillers must evict A's cached blocks before A returns.
    arrivals = [0] + [20] * 6 + [400]
    results, _, _ = run_all(prompts, 4, num_blocks=40, max_model_len=40, arrivals=arrivals)
    assert results == _expected(prompts, 4)


@pytest.mark.parametrize("seed", range(5))
def test_random_workloads(seed):
    rng = random.Random(seed)
    prompts = _random_prompts(20, seed=100 + seed, lo=1, hi=50)
    max_tokens = [rng.randint(1, 20) for _ in prompts]
    arrivals = [rng.randint(0, 30) for _ in prompts]
    results, sched, _ = run_all(
        prompts, max_tokens, num_blocks=rng.choice([20, 40, 400]), block_size=4,
        budget=rng.choice([5, 16, 100]), max_num_seqs=rng.choice([2, 8]), max_model_len=72,
        arrivals=arrivals,
    )
    assert results == {str(i): reference(p, m) for i, (p, m) in enumerate(zip(prompts, max_tokens))}
    assert sched.kv.num_free_blocks == sched.kv.num_blocks


def test_abort_frees_blocks_at_once():
    sched = Scheduler(SchedulerConfig(max_model_len=64), CacheConfig(block_size=4), 64)
    for i in range(3):
        sched.add_request(Request(str(i), list(range(20)), SamplingParams(max_tokens=5), max_tokens=5))
    so = sched.schedule()
    assert sched.kv.num_free_blocks < 64
    done = sched.finish_requests(["0", "1", "2", "unknown"], RequestStatus.FINISHED_ABORTED)
    assert len(done) == 3
    assert sched.kv.num_free_blocks == 64
    assert not sched.has_unfinished_requests()
    assert sched.schedule().finished_req_ids == {"0", "1", "2"}


def test_sequence_limit_and_token_budget():
    sched = Scheduler(SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=10, max_model_len=64),
                      CacheConfig(block_size=4), 64)
    for i in range(3):
        sched.add_request(Request(str(i), list(range(8)), SamplingParams(max_tokens=2), max_tokens=2))
    so = sched.schedule()
    assert so.num_scheduled_tokens == {"0": 8, "1": 2}  # budget 10 split; third waits
    assert len(sched.running) == 2 and len(sched.waiting) == 1


def test_cache_smaller_than_max_model_len_is_rejected():
    with pytest.raises(ValueError, match="max_model_len"):
        Scheduler(SchedulerConfig(max_model_len=100), CacheConfig(block_size=16), 4)


def test_block_pool_lru_and_refcounts():
    kv = KVCacheManager(num_blocks=4, block_size=2)
    r1 = Request("a", [1, 2, 3, 4, 5], SamplingParams())
    assert kv.allocate_slots(r1, 5) is not None
    assert kv.num_free_blocks == 1
    r2 = Request("b", [1, 2, 3, 4, 9], SamplingParams())
    hits, n = kv.get_computed_blocks(r2)
    assert n == 4 and [b.block_id for b in hits] == r1.block_ids[:2]
    assert kv.allocate_slots(r2, 1, hits) is not None
    assert [b.ref_cnt for b in hits] == [2, 2]
    kv.free(r1)
    kv.free(r2)
    assert kv.num_free_blocks == 4
    r3 = Request("c", [1, 2, 3, 4, 7], SamplingParams())
    hits, n = kv.get_computed_blocks(r3)
    assert n == 4  # freed blocks keep their cached prefix until evicted
    with pytest.raises(ValueError):
        KVCacheManager(num_blocks=0, block_size=2)


def test_no_kv_cache_recomputes_everything_with_same_outputs():
    prompts = _random_prompts(4, seed=21, lo=5, hi=20)
    cached, _, r_cached = run_all(prompts, 10)
    recomputed, sched, r_nc = run_all(prompts, 10, kv_cache=False, prefix_caching=False)
    assert recomputed == cached == _expected(prompts, 10)
    # Without a cache each step recomputes the whole context: quadratic total work.
    expected_work = sum(sum(len(p) + i for i in range(10)) for p in prompts)
    assert r_nc.tokens_computed == expected_work
    assert r_cached.tokens_computed == sum(len(p) + 9 for p in prompts)
    assert sched.kv.num_free_blocks == sched.kv.num_blocks


# -- asynchronous scheduling (schedule_ahead) ---------------------------------------------------
@pytest.mark.parametrize("seed", range(6))
def test_ahead_random_workloads_match_reference(seed):
    """The engine's asynchronous loop over the cache-reading fake runner: same outputs, every
    block back, and ahead plans really made. Block size 4 puts placeholders on every block
    boundary (a wrong prefix hash of a placeholder block would give stale hits later)."""
    rng = random.Random(seed)
    prompts = _random_prompts(16, seed=200 + seed, lo=1, hi=30)
    prompts += [prompts[0][:9] + p for p in _random_prompts(4, seed=300 + seed)]  # shared prefixes
    max_tokens = [rng.randint(1, 20) for _ in prompts]
    arrivals = [rng.choice([0, 0, rng.randint(0, 40)]) for _ in prompts]
    results, sched, _ = run_all(
        prompts, max_tokens, num_blocks=rng.choice([20, 40, 400]), block_size=4,
        budget=rng.choice([5, 16, 100]), max_num_seqs=rng.choice([2, 8]), max_model_len=72,
        arrivals=arrivals, ahead=True,
    )
    assert results == {str(i): reference(p, m) for i, (p, m) in enumerate(zip(prompts, max_tokens))}
    assert sched.kv.num_free_blocks == sched.kv.num_blocks
    assert sched.num_ahead > 0


def test_ahead_plan_shape_and_progress():
    sched = Scheduler(SchedulerConfig(max_model_len=64), CacheConfig(block_size=4), 64)
    sched.add_request(Request("a", list(range(7)), SamplingParams(max_tokens=10), max_tokens=10))
    sched.add_request(Request("b", list(range(8)), SamplingParams(max_tokens=10), max_tokens=10))
    so = sched.schedule()  # the prompts; each samples one token
    a, b = sched.requests["a"], sched.requests["b"]
    nxt = sched.schedule_ahead(so)
    assert nxt.num_scheduled_tokens == {"a": 1, "b": 1}
    cr = {c.req_id: c for c in nxt.cached_requests}
    assert cr["a"].num_computed_tokens == 7 and cr["b"].num_computed_tokens == 8  # placeholders
    assert cr["a"].new_block_ids == [] and len(a.block_ids) == 2  # position 7: in block 1
    assert len(cr["b"].new_block_ids) == 1 and len(b.block_ids) == 3  # position 8 opens block 2
    assert a.num_computed_tokens == 0  # nothing advanced until the updates
    sched.update_from_output(so, {"a": [100], "b": [200]})
    nxt2 = sched.schedule_ahead(nxt)  # N+1 in flight, N applied
    assert nxt2 is not None and {c.num_computed_tokens for c in nxt2.cached_requests} == {8, 9}
    sched.update_from_output(nxt, {"a": [101], "b": [201]})
    sched.update_from_output(nxt2, {"a": [102], "b": [202]})
    assert a.num_computed_tokens == 9 and a.output_token_ids == [100, 101, 102]
    assert b.num_computed_tokens == 10 and b.output_token_ids == [200, 201, 202]


def _one_running(sp: SamplingParams, max_tokens: int = 10, max_model_len: int = 64, **cfg):
    sched = Scheduler(SchedulerConfig(max_model_len=max_model_len, **cfg), CacheConfig(block_size=4), 64)
    sched.add_request(Request("a", list(range(5)), sp, max_tokens=max_tokens))
    return sched, sched.schedule()


def test_ahead_refuses_what_it_cannot_plan_exactly():
    greedy = SamplingParams(temperature=0)
    sched, so = _one_running(greedy)
    assert sched.schedule_ahead(so) is not None
    for sp in (SamplingParams(repetition_penalty=1.1), SamplingParams(presence_penalty=0.5),
               SamplingParams(frequency_penalty=0.5), SamplingParams(min_tokens=3)):
        sched, so = _one_running(sp)
        assert sched.schedule_ahead(so) is None, sp
    sched, so = _one_running(greedy, max_tokens=1)  # the in-flight token is the last one
    assert sched.schedule_ahead(so) is None
    sched, so = _one_running(greedy, max_model_len=6)  # 5 + the in-flight token fill the context
    assert sched.schedule_ahead(so) is None
    sched, so = _one_running(greedy, enable_kv_cache=False)
    assert sched.schedule_ahead(so) is None
    sched, so = _one_running(greedy)
    sched.add_request(Request("w", [1, 2], greedy, max_tokens=4))  # someone waits
    assert sched.schedule_ahead(so) is None
    # Mid-prefill (chunked): the step samples nothing for it.
    sched = Scheduler(SchedulerConfig(max_model_len=64, max_num_batched_tokens=4), CacheConfig(block_size=4), 64)
    sched.add_request(Request("a", list(range(10)), greedy, max_tokens=4))
    assert sched.schedule_ahead(sched.schedule()) is None


def test_ahead_never_preempts_and_takes_nothing_when_short():
    greedy = SamplingParams(temperature=0)
    # 4 blocks of 4: two 8-token prompts fill them; each placeholder would open a new block.
    sched = Scheduler(SchedulerConfig(max_model_len=16), CacheConfig(block_size=4), 4)
    for rid, start in (("a", 0), ("b", 10)):
        sched.add_request(Request(rid, list(range(start, start + 8)), greedy, max_tokens=4))
    so = sched.schedule()
    assert sched.kv.num_free_blocks == 0
    assert sched.schedule_ahead(so) is None
    assert sched.kv.num_free_blocks == 0 and sched.num_preemptions == 0
    assert [len(r.block_ids) for r in sched.running] == [2, 2]


def test_ahead_abort_and_finish_in_flight():
    """A request aborted while N and N+1 are in flight gives no more tokens, its blocks come
    back, and the others are unaffected (fake-runner loop)."""
    prompts = _random_prompts(4, seed=7)
    results, sched, _ = run_all(prompts, 12, ahead=True, aborts={5: "1"})
    assert "1" not in results
    assert {k: v for k, v in results.items()} == {str(i): reference(p, 12) for i, p in enumerate(prompts) if i != 1}
    assert sched.kv.num_free_blocks == sched.kv.num_blocks
    assert sched.num_ahead > 0


def test_ahead_with_penalties_mixed_in_falls_back():
    prompts = _random_prompts(3, seed=9)
    params = [SamplingParams(max_tokens=8, ignore_eos=True, temperature=0) for _ in prompts]
    params[1] = SamplingParams(max_tokens=8, ignore_eos=True, temperature=0, repetition_penalty=1.2)
    results, sched, _ = run_all(prompts, 8, ahead=True, params=params, arrivals=[0, 3, 0])
    assert results == {str(i): reference(p, 8) for i, p in enumerate(prompts)}
    # Ahead before request 1 arrives and after it finishes, never while it runs.
    assert sched.num_ahead > 0
