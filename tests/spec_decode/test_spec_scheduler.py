"""Scheduler and KV-cache manager with draft tokens (pure Python, milliseconds): slots for
k + 1 positions, drafts dropped to fit the budget, rejected drafts' blocks released, prefix
hashes only from accepted tokens; the n-gram lookup."""

from __future__ import annotations

from kvserve.core.config import CacheConfig, SchedulerConfig
from kvserve.core.request import Request
from kvserve.core.sampling_params import SamplingParams
from kvserve.core.scheduler import Scheduler
from kvserve.spec_decode.ngram import NgramProposer


def _running(prompt_len=7, budget=64):
    s = Scheduler(SchedulerConfig(max_model_len=64, max_num_batched_tokens=budget), CacheConfig(block_size=4), 16)
    r = Request("a", list(range(10, 10 + prompt_len)), SamplingParams(max_tokens=30), max_tokens=30)
    s.add_request(r)
    so = s.schedule()
    s.update_from_output(so, {"a": [99]})  # prefill samples one token: 8 tokens, 7 computed
    return s, r


def test_verify_step_slots_trim_and_hashes():
    s, r = _running()
    assert (r.num_tokens, r.num_computed_tokens, len(r.block_ids)) == (8, 7, 2)
    r.spec_token_ids = [1, 2, 3, 4, 5]
    so = s.schedule()
    assert so.num_scheduled_tokens["a"] == 6 and so.spec_token_ids["a"] == [1, 2, 3, 4, 5]
    assert len(r.block_ids) == s.kv.blocks_needed(13) == 4  # slots for positions 7..12
    # prefix hashes: only the block of real tokens (0..7) is cached; nothing from drafts
    cached = {b.token_ids for b in s.kv.pool.cached.values()}
    assert cached == {(10, 11, 12, 13), (14, 15, 16, 99)}
    free_before = s.kv.num_free_blocks
    s.update_from_output(so, {"a": [1, 7]})  # one draft accepted, then the target's 7
    assert r.all_token_ids[-3:] == [99, 1, 7]
    assert (r.num_tokens, r.num_computed_tokens) == (10, 9)
    assert len(r.block_ids) == s.kv.blocks_needed(9) == 3  # the block of positions 12.. is unused
    assert s.kv.num_free_blocks == free_before + 1
    assert (s.num_draft_tokens, s.num_accepted_tokens, s.num_spec_verifies) == (5, 1, 1)
    # a rejection that leaves a whole block unused gives it back
    r.spec_token_ids = [5, 5, 5, 5, 5, 5]
    so = s.schedule()
    assert len(r.block_ids) == s.kv.blocks_needed(16) == 4
    s.update_from_output(so, {"a": [8]})
    assert len(r.block_ids) == s.kv.blocks_needed(r.num_computed_tokens) == 3
    so = s.schedule()
    assert so.cached_requests[0].num_kept_blocks == 3 and so.num_scheduled_tokens["a"] == 1
    cached = {b.token_ids for b in s.kv.pool.cached.values()}
    assert (5, 5, 5, 5) not in cached


def test_budget_drops_drafts():
    s, r = _running(prompt_len=2, budget=3)  # a decode (its prompt fits one step), 3 tokens a step
    assert r.num_tokens - r.num_computed_tokens == 1
    r.spec_token_ids = [1, 2, 3, 4]
    so = s.schedule()
    assert so.num_scheduled_tokens["a"] == 3 and so.spec_token_ids["a"] == [1, 2]


def test_ngram_lookup():
    p = NgramProposer(num_tokens=3, n_min=1, n_max=3)
    toks = [1, 2, 3, 4, 5, 1, 2, 3]
    assert p.lookup("x", toks, 3) == [4, 5, 1]  # longest match: (1, 2, 3) at the start
    toks += [9]
    assert p.lookup("x", toks, 3) == []  # 9 never occurred before
    toks += [4]
    assert p.lookup("x", toks, 2) == [5, 1]  # (4,) -> latest earlier occurrence
    toks += [5, 1]
    # (4, 5, 1) occurred at 3..5: continuation 2, 3, 9
    assert p.lookup("x", toks, 3) == [2, 3, 9]


def test_metrics_export_spec_counters():
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry, generate_latest

    from kvserve.entrypoints.server.metrics import _EngineCollector

    stats = {"spec_draft_tokens": 40, "spec_accepted_tokens": 30, "spec_verify_steps": 10,
             "spec_acceptance_rate": 0.75, "spec_mean_accepted_length": 4.0, "spec_draft_time_s": 0.5}
    reg = CollectorRegistry()
    reg.register(_EngineCollector(SimpleNamespace(stats=lambda: stats), "m", SimpleNamespace(in_flight=0)))
    text = generate_latest(reg).decode()
    assert 'kvserve:spec_decode_acceptance_rate{model_name="m"} 0.75' in text
    assert 'kvserve:spec_decode_num_accepted_tokens_total{model_name="m"} 30.0' in text
    assert 'kvserve:spec_decode_mean_accepted_length{model_name="m"} 4.0' in text
    assert "kvserve:spec_decode_draft_time_seconds_total" in text
