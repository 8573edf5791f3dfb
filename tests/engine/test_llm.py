"""`LLM` end to end on a tiny random Llama: scheduling variants give identical greedy tokens,
sampling is reproducible, and bad input is a clear error."""

from __future__ import annotations

import random

import pytest

from kvserve import LLM, SamplingParams
from tests.conftest import TINY_VOCAB


def _prompts(n: int = 6, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(3, TINY_VOCAB) for _ in range(rng.randint(3, 60))]} for _ in range(n)]


GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def llama_dir(tiny_llama):
    return str(tiny_llama[0])


@pytest.fixture(scope="module")
def llm(llama_dir):
    return LLM(llama_dir, dtype="float32", device="cpu", num_kv_blocks=256)


@pytest.fixture(scope="module")
def baseline(llm):
    return [o.outputs[0].token_ids for o in llm.generate(_prompts(), GREEDY, use_tqdm=False)]


def _tokens(llm, prompts, params=GREEDY):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def test_small_cache_preempts_with_same_greedy_output(llama_dir, baseline):
    # 16 blocks x 16 tokens: enough for one request at a time, not for all six.
    small = LLM(llama_dir, dtype="float32", device="cpu", num_kv_blocks=16, max_model_len=256)
    assert _tokens(small, _prompts()) == baseline
    assert small.engine.scheduler.num_preemptions > 0
    kv = small.engine.scheduler.kv
    assert kv.num_free_blocks == kv.num_blocks


def test_chunked_prefill_same_output(llama_dir, baseline):
    chunked = LLM(llama_dir, dtype="float32", device="cpu", num_kv_blocks=256, max_num_batched_tokens=7)
    assert _tokens(chunked, _prompts()) == baseline


def test_prefix_cache_hits_give_same_output(llm, baseline):
    shared = [3, 4, 5] * 20
    prompts = [{"prompt_token_ids": shared + p["prompt_token_ids"]} for p in _prompts(3, seed=4)]
    first = _tokens(llm, prompts)
    hits_before = llm.engine.scheduler.kv.prefix_hits
    again = _tokens(llm, prompts)
    assert again == first
    assert llm.engine.scheduler.kv.prefix_hits - hits_before >= 3 * 48
    no_cache = LLM(llm.engine_args.model, dtype="float32", device="cpu", num_kv_blocks=256, enable_prefix_caching=False)
    assert _tokens(no_cache, prompts) == first


def test_seeded_sampling_is_batch_independent(llm):
    sp = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=42, ignore_eos=True)
    prompt = _prompts(1, seed=8)[0]
    alone = _tokens(llm, [prompt], sp)[0]
    others = [SamplingParams(max_tokens=random.Random(i).randint(4, 20), temperature=0.8, ignore_eos=True) for i in range(15)]
    mixed = llm.generate(_prompts(15, seed=9) + [prompt], others + [sp], use_tqdm=False)
    assert mixed[-1].outputs[0].token_ids == alone
    other_seed = _tokens(llm, [prompt], SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=43, ignore_eos=True))[0]
    assert other_seed != alone


def test_n_choices_share_prompt_blocks(llm):
    prompt = {"prompt_token_ids": list(range(10, 74))}  # 4 full blocks
    hits_before = llm.engine.scheduler.kv.prefix_hits
    (out,) = llm.generate(prompt, SamplingParams(n=4, max_tokens=8, temperature=1.0, seed=1, ignore_eos=True), use_tqdm=False)
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert all(len(c.token_ids) == 8 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    # Children 1..3 reuse the prompt's full blocks written by child 0 in the same step.
    assert llm.engine.scheduler.kv.prefix_hits - hits_before >= 3 * 48


def test_outputs_in_input_order_and_max_tokens(llm):
    prompts = _prompts(5, seed=2)
    params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in (1, 7, 3, 12, 5)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [1, 7, 3, 12, 5]
    assert [o.prompt_token_ids for o in outs] == [p["prompt_token_ids"] for p in prompts]


def test_eos_stops_generation_unless_ignored(llm, baseline):
    prompt = _prompts()[0]
    first = baseline[0][0]
    eos_llm_params = SamplingParams(max_tokens=24, temperature=0, stop_token_ids=[first])
    (out,) = llm.generate(prompt, eos_llm_params, use_tqdm=False)
    assert out.outputs[0].token_ids == [first]
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason == first


def test_stream_yields_increasing_outputs(llm, baseline):
    prompt = _prompts()[0]
    seen = []
    for out in llm.generate_stream(prompt, GREEDY):
        seen.append(list(out.outputs[0].token_ids))
    assert seen[-1] == baseline[0]
    assert [len(s) for s in seen] == list(range(1, len(baseline[0]) + 1))


def test_string_prompt_and_text(llm):
    (out,) = llm.generate("Hello world", SamplingParams(max_tokens=5, temperature=0, ignore_eos=True), use_tqdm=False)
    tok = llm.get_tokenizer()
    assert out.prompt_token_ids == tok.encode("Hello world")
    assert out.outputs[0].text == tok.decode(out.outputs[0].token_ids)


@pytest.mark.parametrize(
    "prompt, params, match",
    [
        ({"prompt_token_ids": list(range(3, 600))}, None, "max_model_len"),
        ("", None, "empty"),
        ({"prompt_token_ids": []}, None, "empty"),
        ({"prompt_token_ids": [TINY_VOCAB + 5]}, None, "prompt_token_ids"),
    ],
)
def test_bad_prompts(llm, prompt, params, match):
    with pytest.raises(ValueError, match=match):
        llm.generate(prompt, params or GREEDY, use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"n": 0}, "n"),
        ({"logprobs": 50}, "logprobs"),
        ({"seed": 2**64}, "seed"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_sampling_params(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_bad_engine_options(llama_dir, tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        LLM(llama_dir, dtype="float8", device="cpu")
    with pytest.raises(FileNotFoundError):
        LLM(str(tmp_path / "no-such-model"), device="cpu")
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(llama_dir, device="cpu", max_model_len=10**6)
    with pytest.raises(ValueError, match="unknown engine option"):
        LLM(llama_dir, device="cpu", bogus=1)


def test_no_kv_cache_ablation_same_tokens(llama_dir, baseline):
    ablation = LLM(llama_dir, dtype="float32", device="cpu", num_kv_blocks=256, enable_kv_cache=False)
    assert _tokens(ablation, _prompts()) == baseline


def test_model_dependent_param_checks(llm):
    with pytest.raises(ValueError, match="logit_bias"):
        llm.generate({"prompt_token_ids": [5]}, SamplingParams(logit_bias={TINY_VOCAB + 1: 1.0}), use_tqdm=False)
    with pytest.raises(ValueError, match="stop_token_ids"):
        llm.generate({"prompt_token_ids": [5]}, SamplingParams(stop_token_ids=[TINY_VOCAB]), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()


def test_stop_strings_wait_for_min_tokens(llm):
    """A stop string in the first min_tokens tokens does not end the request (vLLM's rule)."""
    prompt = _prompts()[1]
    (base,) = llm.generate(prompt, GREEDY, use_tqdm=False)
    ids, text = base.outputs[0].token_ids, base.outputs[0].text
    tok = llm.get_tokenizer()
    prefixes = [tok.decode(ids[:k]) for k in range(len(ids) + 1)]
    # the first early token whose text is clean and new: it becomes the stop string
    k = next((k for k in range(1, 6) if (new := prefixes[k][len(prefixes[k - 1]):]).strip()
              and "\ufffd" not in new and new not in prefixes[k - 1]), None)
    if k is None:
        pytest.skip("the tiny model's first tokens have no usable text")
    stop = prefixes[k][len(prefixes[k - 1]):]
    early = llm.generate(prompt, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=[stop]), use_tqdm=False)[0]
    assert early.outputs[0].finish_reason == "stop" and len(early.outputs[0].token_ids) == k
    late = llm.generate(
        prompt, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=[stop], min_tokens=k + 6), use_tqdm=False
    )[0].outputs[0]
    assert len(late.token_ids) >= k + 6
    assert late.token_ids == ids[: len(late.token_ids)]
    assert text.startswith(late.text)
