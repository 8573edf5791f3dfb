"""The official `openai` client against a real server: completions, chat, streaming, n > 1,
logprobs, echo and scoring, models, tokenize/detokenize."""

from __future__ import annotations

import math

from tests.server.conftest import MODEL_NAME

GREEDY = dict(temperature=0.0)


def test_models(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]


def test_completion_basic(client):
    r = client.completions.create(model=MODEL_NAME, prompt="Hello world", max_tokens=8, **GREEDY)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert len(r.choices) == 1 and r.choices[0].index == 0
    assert r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.prompt_tokens > 0 and 0 < r.usage.completion_tokens <= 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_completion_prompt_forms(client, http):
    ids = http.post("/tokenize", json={"prompt": "The quick brown fox"}).json()["tokens"]
    by_text = client.completions.create(model=MODEL_NAME, prompt="The quick brown fox", max_tokens=6, **GREEDY)
    by_ids = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=6, **GREEDY)
    assert by_ids.choices[0].text == by_text.choices[0].text
    many = client.completions.create(model=MODEL_NAME, prompt=["Hello world", "The quick brown fox"],
                                     max_tokens=6, **GREEDY)
    assert [c.index for c in many.choices] == [0, 1]
    assert many.choices[1].text == by_text.choices[0].text
    many_ids = client.completions.create(model=MODEL_NAME, prompt=[ids, ids[:2]], max_tokens=6, **GREEDY)
    assert many_ids.choices[0].text == by_text.choices[0].text
    assert many_ids.usage.prompt_tokens == len(ids) + 2


def test_completion_n(client):
    r = client.completions.create(model=MODEL_NAME, prompt=["Hello", "world"], n=3, max_tokens=5,
                                  temperature=1.0, seed=7)
    assert sorted(c.index for c in r.choices) == list(range(6))
    greedy = client.completions.create(model=MODEL_NAME, prompt="Hello", n=2, max_tokens=5, **GREEDY)
    assert greedy.choices[0].text == greedy.choices[1].text


def test_streaming_equals_non_streaming(client):
    kwargs = dict(model=MODEL_NAME, prompt="Café, naïve — 日本語", max_tokens=40, **GREEDY)
    full = client.completions.create(**kwargs)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_streaming_n_one_finish_per_choice(client):
    chunks = list(client.completions.create(model=MODEL_NAME, prompt=["Hi", "Hello"], n=2, max_tokens=12,
                                            stream=True, **GREEDY))
    finishes = [ch.index for c in chunks for ch in c.choices if ch.finish_reason]
    assert sorted(finishes) == [0, 1, 2, 3]
    texts: dict[int, str] = {}
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] = texts.get(ch.index, "") + ch.text
    assert texts[0] == texts[1] and texts[2] == texts[3]


def test_chat(client):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    r = client.chat.completions.create(model=MODEL_NAME, messages=msgs, max_tokens=10, **GREEDY)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert 0 < r.usage.completion_tokens <= 10
    stream = list(client.chat.completions.create(model=MODEL_NAME, messages=msgs, max_tokens=10, stream=True, **GREEDY))
    assert stream[0].choices[0].delta.role == "assistant"
    joined = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert joined == r.choices[0].message.content
    assert [c.choices[0].finish_reason for c in stream if c.choices[0].finish_reason] == [r.choices[0].finish_reason]


def test_chat_n_and_max_completion_tokens(client):
    r = client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}], n=2, max_completion_tokens=4,
        temperature=0.9, seed=3, extra_body={"ignore_eos": True},
    )
    assert [c.index for c in r.choices] == [0, 1]
    assert r.usage.completion_tokens == 8


def test_completion_logprobs(client):
    r = client.completions.create(model=MODEL_NAME, prompt="Hello world", max_tokens=5, logprobs=3,
                                  extra_body={"ignore_eos": True}, **GREEDY)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    for tok, tlp, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert tlp <= 0 and 1 <= len(top) <= 4
        # greedy: the chosen token is the most likely one
        assert math.isclose(tlp, max(top.values()), abs_tol=1e-5)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0


def test_chat_logprobs(client):
    r = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=4, logprobs=True, top_logprobs=2,
                                       extra_body={"ignore_eos": True}, **GREEDY)
    content = r.choices[0].logprobs.content
    assert len(content) == 4
    for item in content:
        assert item.logprob <= 0 and isinstance(item.bytes, list)
        assert len(item.top_logprobs) == 2
        assert math.isclose(item.logprob, item.top_logprobs[0].logprob, abs_tol=1e-5)
    no_top = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=2, logprobs=True, **GREEDY)
    assert all(item.top_logprobs == [] for item in no_top.choices[0].logprobs.content)


def test_scoring_echo_logprobs_max_tokens_0(client, http):
    prompt = "The quick brown fox jumps"
    ids = http.post("/tokenize", json={"prompt": prompt}).json()["tokens"]
    r = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    c = r.choices[0]
    assert c.text == prompt and r.usage.completion_tokens == 0
    lp = c.logprobs
    assert len(lp.tokens) == len(ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(x is not None and x <= 0 for x in lp.token_logprobs[1:])
    assert "".join(lp.tokens) == prompt
    # Same scores from a request that also generates, and from the token-id form.
    gen = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=2, echo=True, logprobs=1, **GREEDY)
    glp = gen.choices[0].logprobs
    assert len(glp.tokens) == len(ids) + gen.usage.completion_tokens
    for a, b in zip(lp.token_logprobs[1:], glp.token_logprobs[1: len(ids)]):
        assert math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-4)
    assert gen.choices[0].text.startswith(prompt)
    stream = list(client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=0, echo=True,
                                            logprobs=1, stream=True))
    assert "".join(ch.choices[0].text for ch in stream) == prompt
    assert [ch.choices[0].finish_reason for ch in stream if ch.choices[0].finish_reason] == ["length"]


def test_stop_string(client):
    base = client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=20,
                                     extra_body={"ignore_eos": True}, **GREEDY).choices[0].text
    if len(base) < 6:
        return
    stop = base[3:5]
    r = client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=20, stop=[stop],
                                  extra_body={"ignore_eos": True}, **GREEDY)
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text == base[: base.index(stop)]
    assert r.choices[0].model_extra.get("stop_reason") == stop


def test_tokenize_detokenize_roundtrip(http):
    text = "Hello world! Café 日本語 😀"
    tok = http.post("/tokenize", json={"model": MODEL_NAME, "prompt": text, "return_token_strs": True}).json()
    assert tok["count"] == len(tok["tokens"]) and tok["max_model_len"] == 512
    assert len(tok["token_strs"]) == tok["count"]
    detok = http.post("/detokenize", json={"model": MODEL_NAME, "tokens": tok["tokens"]}).json()
    assert detok["prompt"] == text
    chat = http.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["count"] > 2
    assert "<|im_start|>assistant" in http.post("/detokenize", json={"tokens": chat["tokens"]}).json()["prompt"]


def test_unknown_fields_ignored(http):
    r = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "no_such_field": [1, 2],
                                           "spaces_between_special_tokens": False})
    assert r.status_code == 200, r.text


def test_health_and_metrics(server, http):
    assert http.get("/health").status_code == 200
    text = http.get("/metrics").text
    for name in ("kvserve:num_requests_running", "kvserve:num_requests_waiting", "kvserve:kv_cache_blocks_used",
                 "kvserve:kv_cache_blocks_total", "kvserve:prefix_cache_hit_rate", "kvserve:prompt_tokens_total",
                 "kvserve:generation_tokens_total", "kvserve:time_to_first_token_seconds_bucket",
                 "kvserve:inter_token_latency_seconds_bucket"):
        assert name in text, name
