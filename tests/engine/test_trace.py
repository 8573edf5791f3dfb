"""`kvserve trace`: per-step Q/K/V shapes, FLOPs and KV-cache use of one layer, on tiny GPT-2
and Llama (GQA) models, with and without the KV cache."""

from __future__ import annotations

import json

import pytest

from kvserve import LLM, SamplingParams
from kvserve.engine.trace import attention_flops, attention_modules, model_step_flops, trace_generation
from kvserve.entrypoints import cli

PROMPT = [5, 17, 42, 99, 7, 300, 12]  # 7 tokens, as in the GPT-2 example
STEPS = 4
BLOCK = 4

# arch -> (query heads, KV heads, head_dim, layers, hidden), from tests/conftest.py's configs
SHAPES = {"gpt2": (4, 4, 16, 2, 64), "llama": (4, 2, 16, 2, 64), "smollm2": (6, 2, 16, 2, 96)}


@pytest.fixture(scope="module")
def engines(tiny_model_factory):
    made: dict[tuple[str, bool, bool], LLM] = {}

    def get(arch: str, kv_cache: bool = True, prefix_caching: bool = False) -> LLM:
        # Prefix caching is off unless asked for, so that tracing a prompt again still
        # shows its full prefill.
        key = (arch, kv_cache, prefix_caching)
        if key not in made:
            folder = str(tiny_model_factory(arch)[0])
            made[key] = LLM(
                folder, dtype="float32", device="cpu", num_kv_blocks=32, block_size=BLOCK,
                max_num_seqs=1, enable_kv_cache=kv_cache, enable_prefix_caching=prefix_caching,
            )
        return made[key]

    return get


@pytest.mark.parametrize("arch", ["gpt2", "llama", "smollm2"])
def test_shapes_follow_config_and_cache_grows(engines, arch):
    hq, hkv, d, layers, hidden = SHAPES[arch]
    llm = engines(arch)
    tr = trace_generation(llm.engine, PROMPT, steps=STEPS, layer=1)
    assert (tr.num_heads, tr.num_kv_heads, tr.head_dim, tr.layer) == (hq, hkv, d, 1)
    assert [s.stage for s in tr.steps] == ["prefill"] + ["decode"] * (STEPS - 1)

    pre = tr.steps[0]
    assert pre.tokens_computed == 7 and pre.cached_before == 0
    assert pre.q == [1, hq, 7, d]
    assert pre.k_new == pre.v_new == pre.k_cache == pre.v_cache == [1, hkv, 7, d]
    assert pre.scores == [1, hq, 7, 7]

    for j, s in enumerate(tr.steps[1:], start=1):
        ctx = len(PROMPT) + j  # the prompt plus the j tokens generated before this step
        assert s.tokens_computed == 1 and s.cached_before == ctx - 1 and s.context_len == ctx
        assert s.q == [1, hq, 1, d]
        assert s.k_new == s.v_new == [1, hkv, 1, d]
        assert s.k_cache == s.v_cache == [1, hkv, ctx, d]
        assert s.scores == [1, hq, 1, ctx]

    for s in tr.steps:
        assert s.kv_tokens == s.context_len
        assert s.kv_bytes == s.context_len * layers * 2 * hkv * d * 4  # fp32
        assert s.kv_blocks == -(-s.context_len // BLOCK) == s.pool_blocks_in_use
        assert s.kv_allocated_bytes == s.kv_blocks * BLOCK * layers * 2 * hkv * d * 4
        assert s.pool_blocks_total == 32
        assert s.step_time_s > 0 and s.token_id is not None
        assert s.flops == attention_flops(hidden, hq, hkv, d, s.tokens_computed, s.context_len)

    # Tracing neither changes the tokens nor leaves the recording backend behind.
    greedy = SamplingParams(max_tokens=STEPS, temperature=0, ignore_eos=True)
    ref = llm.generate({"prompt_token_ids": PROMPT}, greedy, use_tqdm=False)[0].outputs[0].token_ids
    assert tr.generated_token_ids == ref
    mods = attention_modules(llm.engine.runner.model)
    assert len(mods) == layers and all(m.backend is llm.engine.backend for m in mods)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_no_kv_cache_every_step_is_a_prefill_of_the_whole_context(engines, arch):
    hq, hkv, d, _, _ = SHAPES[arch]
    tr = trace_generation(engines(arch, kv_cache=False).engine, PROMPT, steps=STEPS)
    assert not tr.kv_cache
    for j, s in enumerate(tr.steps):
        ctx = len(PROMPT) + j
        assert s.stage == "prefill" and s.cached_before == 0
        assert s.tokens_computed == s.context_len == ctx
        assert s.q == [1, hq, ctx, d]
        assert s.k_new == s.k_cache == s.v_cache == [1, hkv, ctx, d]
        assert s.scores == [1, hq, ctx, ctx]
    cached = trace_generation(engines(arch).engine, PROMPT, steps=STEPS)
    assert tr.generated_token_ids == cached.generated_token_ids


def test_prefix_cache_hit_shows_as_cached_keys(engines):
    eng = engines("llama", prefix_caching=True).engine
    first = trace_generation(eng, PROMPT, steps=2)
    again = trace_generation(eng, PROMPT, steps=2)
    assert first.steps[0].tokens_computed == 7 and first.steps[0].cached_before == 0
    # The prompt's first full block (4 tokens) is shared: only the other 3 are computed, and
    # attention still reads K/V for all 7.
    s = again.steps[0]
    assert (s.stage, s.tokens_computed, s.cached_before, s.context_len) == ("prefill", 3, 4, 7)
    assert s.q == [1, 4, 3, 16] and s.k_new == [1, 2, 3, 16] and s.k_cache == [1, 2, 7, 16]
    assert again.generated_token_ids == first.generated_token_ids


def test_flops_match_hand_computed_numbers():
    # GPT-2 small, layer shapes of the example: hidden 768, 12 heads x 64, 7-token prompt.
    f = attention_flops(768, 12, 12, 64, num_tokens=7, context_len=7)
    assert f.q_proj == f.k_proj == f.v_proj == 2 * 7 * 768 * 768 == 8_257_536
    assert f.qk == f.av == 2 * 12 * 7 * 7 * 64 == 75_264
    assert f.total == 3 * 8_257_536 + 2 * 75_264
    # First decode: one new token against 8 cached keys.
    f = attention_flops(768, 12, 12, 64, num_tokens=1, context_len=8)
    assert (f.q_proj, f.qk, f.av) == (1_179_648, 12_288, 12_288)
    # GQA (tiny llama): K and V projections are Hkv/Hq the size of Q's.
    f = attention_flops(64, 4, 2, 16, num_tokens=1, context_len=8)
    assert (f.q_proj, f.k_proj, f.v_proj, f.qk, f.av) == (8192, 4096, 4096, 1024, 1024)


def test_traced_step_flops_and_whole_model_flops(engines):
    tr = trace_generation(engines("llama").engine, PROMPT, steps=2)
    first_decode = tr.steps[1]  # 1 new token, context 8
    assert first_decode.flops.to_dict() == {
        "q_proj": 8192, "k_proj": 4096, "v_proj": 4096, "qk": 1024, "av": 1024, "total": 18432,
    }
    cfg = engines("llama").engine.model_config
    m = model_step_flops(cfg, num_tokens=1, context_len=8)
    # per layer: qkv 16384, scores 2048, o_proj 2*64*64, MLP 3 matrices of 2*64*128; 2 layers;
    # LM head 2*64*512 for the one sampled row.
    assert m == {
        "qkv_proj": 32768, "qk_av": 4096, "o_proj": 16384, "mlp": 98304, "lm_head": 65536, "total": 217088,
    }


def test_bad_layer_and_steps(engines):
    eng = engines("gpt2").engine
    with pytest.raises(ValueError, match="layer must be"):
        trace_generation(eng, PROMPT, layer=2)
    with pytest.raises(ValueError, match="steps must be"):
        trace_generation(eng, PROMPT, steps=0)
    assert not eng.has_unfinished_requests()


def test_cli_json_and_text(tiny_model_factory, capsys):
    folder = str(tiny_model_factory("llama")[0])
    common = ["--model", folder, "--dtype", "float32", "--device", "cpu", "--steps", "3", "--layer", "1"]
    assert cli.main(["trace", "Hello world", "--json", *common]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["layer"] == 1 and data["num_heads"] == 4 and data["num_kv_heads"] == 2
    steps = data["steps"]
    assert [s["stage"] for s in steps] == ["prefill", "decode", "decode"]
    n = len(data["prompt_token_ids"])
    assert steps[2]["k_cache"] == [1, 2, n + 2, 16] and steps[2]["q"] == [1, 4, 1, 16]
    assert steps[0]["flops"]["total"] == sum(v for k, v in steps[0]["flops"].items() if k != "total")

    assert cli.main(["trace", "Hello world", "--no-kv-cache", *common]) == 0
    text = capsys.readouterr().out
    assert "KV cache OFF" in text and "DECODE" not in text
    assert f"[1, 2, {n + 2}, 16]" in text and "4 query heads sharing 2 KV heads" in text

    assert cli.main(["trace", "Hello", "--layer", "9", "--model", folder, "--device", "cpu"]) == 2
    assert "layer must be" in capsys.readouterr().err
