"""gpt-oss's reply format (harmony, `kvserve/engine/harmony.py`): the analysis channel is split
from the answer whole and while streaming (multi-byte characters across tokens included), the
server's chat replies carry it as `reasoning_content` (non-streamed and streamed), `<|end|>`
between the analysis and the answer does not stop generation, and gpt-oss GGUF files stop on
`<|return|>` and `<|call|>` but not on `<|end|>`. With tools, `commentary to=functions.NAME`
messages are tool calls (parser, and the server's non-streamed and streamed `tool_calls`);
without tools or with tool_choice "none" the reply reads as before.

The model here is a tiny random gpt-oss whose sampler is scripted to write a harmony reply
token by token (a random model would not). Its chat template is a stand-in that renders the
documented harmony prompt shape (`<|start|>{role}<|message|>{content}<|end|>` per message, then
`<|start|>assistant`); real gpt-oss checkpoints ship their own, which kvserve renders as it is.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kvserve.engine.harmony import HarmonyParser, is_harmony_model
from kvserve.loader.tokenizer import Tokenizer
from tests.conftest import _TRAIN_TEXT, TINY_VOCAB

SPECIALS = ["<|endoftext|>", "<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|return|>", "<|call|>",
            "<|constrain|>"]
TEMPLATE = (
    "{% for m in messages %}<|start|>{{ m['role'] }}<|message|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|start|>assistant{% endif %}"
)
REPLY = ("<|channel|>analysis<|message|>The user greets; answer in French: café 😀.<|end|>"
         "<|start|>assistant<|channel|>final<|message|>Bonjour ! Un café 😀 ?<|return|>")


def _save_harmony_tokenizer(folder: Path) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB - 8, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_TRAIN_TEXT, trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<|return|>", "pad_token": "<|endoftext|>", "chat_template": TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }))
    return Tokenizer.from_folder(folder)


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    return _save_harmony_tokenizer(tmp_path_factory.mktemp("harmony-tok"))


def _ids(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def test_parse_splits_analysis_from_the_answer(tok):
    ids = _ids(tok, REPLY)
    assert tok.decode(ids) == "analysisThe user greets; answer in French: café 😀.assistantfinalBonjour ! Un café 😀 ?"
    reasoning, content = HarmonyParser(tok).parse(ids)
    assert reasoning == "The user greets; answer in French: café 😀."
    assert content == "Bonjour ! Un café 😀 ?"


def test_streamed_deltas_add_up_and_never_split_a_character(tok):
    ids = _ids(tok, REPLY)
    p = HarmonyParser(tok)
    reasoning, content = [], []
    for n in range(1, len(ids) + 1):
        r, c = p.feed(ids[:n], finished=n == len(ids))
        assert "\ufffd" not in r + c
        reasoning.append(r)
        content.append(c)
    assert "".join(reasoning) == "The user greets; answer in French: café 😀."
    assert "".join(content) == "Bonjour ! Un café 😀 ?"
    assert p.content == "Bonjour ! Un café 😀 ?"


def test_commentary_and_headers_without_channel_are_content(tok):
    ids = _ids(tok, "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{\"city\": \"Paris\"}<|call|>")
    assert HarmonyParser(tok).parse(ids) == ("", '{"city": "Paris"}')
    assert HarmonyParser(tok).parse(_ids(tok, "<|message|>plain<|end|>")) == ("", "plain")


def test_reply_that_ignores_the_format_is_content(tok):
    assert HarmonyParser(tok).parse(_ids(tok, "Hello there")) == ("", "Hello there")
    assert HarmonyParser(tok).parse([]) == ("", "")
    # ... also when it ends with a stop token (as engine output does), e.g. grammar-forced JSON
    # (tool_choice "required" / named on gpt-oss).
    forced = '[{"name": "f", "parameters": {}}]'
    assert HarmonyParser(tok).parse(_ids(tok, forced + "<|return|>")) == ("", forced)
    assert HarmonyParser(tok, tools=True).parse(_ids(tok, forced + "<|call|>")) == ("", forced)


def test_only_harmony_models_are_detected(tok, tiny_model_factory):
    assert is_harmony_model(tok, "GptOssForCausalLM")
    assert not is_harmony_model(tok, "LlamaForCausalLM")  # the stand-in template writes no channels
    channels = Tokenizer(tok.backend, chat_template=TEMPLATE + "{{ '<|channel|>final<|message|>' }}")
    assert is_harmony_model(channels, None)  # another architecture whose template writes them
    folder, _ = tiny_model_factory("llama")
    plain = Tokenizer.from_folder(folder)
    assert not is_harmony_model(plain, "GptOssForCausalLM") and not is_harmony_model(None, "GptOssForCausalLM")
    with pytest.raises(ValueError, match="harmony"):
        HarmonyParser(plain)


# -- through the engine and the server ------------------------------------------------------------
@pytest.fixture(scope="module")
def harmony_engine(tmp_path_factory):
    """A tiny gpt-oss whose greedy sampler is scripted to write REPLY (one token per step)."""
    import transformers as tf

    from kvserve.engine.arg_utils import EngineArgs
    from kvserve.engine.llm_engine import LLMEngine

    folder = tmp_path_factory.mktemp("harmony-model")
    tok = _save_harmony_tokenizer(folder)
    ret = tok.backend.token_to_id("<|return|>")
    cfg = tf.GptOssConfig(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                          num_experts_per_tok=2, sliding_window=8, max_position_embeddings=512,
                          eos_token_id=[ret, tok.backend.token_to_id("<|call|>")], pad_token_id=0)
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    engine = LLMEngine(EngineArgs(model=str(folder), device="cpu", dtype="float32"))
    _script(engine, _ids(tok, REPLY))
    return engine, tok, folder


def _script(engine, script: list[int], masked: bool = False) -> None:
    """Make greedy sampling write `script`, one token per generated position (masked: only
    where a grammar's mask allows it; elsewhere the lowest allowed id)."""
    sampler = engine.runner.sampler
    real = getattr(sampler, "_real_process_logits", sampler.process_logits)
    sampler._real_process_logits = real

    def scripted(logits, batch):
        out = real(logits, batch)
        forced = torch.full_like(out, -1e4)
        for i, (ids, n_prompt) in enumerate(zip(batch.token_ids, batch.num_prompt_tokens)):
            forced[i, script[min(len(ids) - n_prompt, len(script) - 1)]] = 0.0
        if masked:
            forced.masked_fill_(out == float("-inf"), float("-inf"))
        return forced

    sampler.process_logits = scripted


def test_end_does_not_stop_and_return_does(harmony_engine):
    from kvserve import SamplingParams

    engine, tok, _ = harmony_engine
    assert tok.backend.token_to_id("<|end|>") not in engine.eos_token_ids
    rid = "r"
    engine.add_request(rid, {"prompt_token_ids": _ids(tok, "<|start|>user<|message|>Hi<|end|><|start|>assistant")},
                       SamplingParams(max_tokens=200, temperature=0))
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final = out
    comp = final.outputs[0]
    assert comp.finish_reason == "stop" and comp.token_ids[-1] == tok.backend.token_to_id("<|return|>")
    assert HarmonyParser(tok).parse(comp.token_ids)[1] == "Bonjour ! Un café 😀 ?"


def test_server_chat_reply_carries_reasoning_apart(harmony_engine):
    from starlette.testclient import TestClient

    from kvserve.engine.async_engine import AsyncLLMEngine
    from kvserve.entrypoints.server import build_app

    engine, _, _ = harmony_engine
    msgs = [{"role": "system", "content": "Reasoning: low"}, {"role": "developer", "content": "Answer in French."},
            {"role": "user", "content": "Hi"}]
    with TestClient(build_app(AsyncLLMEngine(engine), served_model_name="gpt-oss-tiny")) as client:
        text = client.post("/detokenize", json={"tokens": client.post("/tokenize", json={"messages": msgs}).json()["tokens"]})
        assert text.json()["prompt"] == ("<|start|>system<|message|>Reasoning: low<|end|><|start|>developer<|message|>"
                                         "Answer in French.<|end|><|start|>user<|message|>Hi<|end|><|start|>assistant")
        r = client.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 200, "temperature": 0})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["message"]["content"] == "Bonjour ! Un café 😀 ?"
        assert choice["message"]["reasoning_content"] == "The user greets; answer in French: café 😀."
        assert choice["finish_reason"] == "stop"

        reasoning, content = "", ""
        with client.stream("POST", "/v1/chat/completions",
                           json={"messages": msgs, "max_tokens": 200, "temperature": 0, "stream": True}) as s:
            for line in s.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                for ch in json.loads(line[6:])["choices"]:
                    reasoning += ch["delta"].get("reasoning_content") or ""
                    content += ch["delta"].get("content") or ""
        assert (reasoning, content) == ("The user greets; answer in French: café 😀.", "Bonjour ! Un café 😀 ?")


def test_cli_chat_prints_the_answer_only(harmony_engine, capsys):
    from kvserve import LLM, SamplingParams
    from kvserve.entrypoints.cli_chat import _stream_reply

    _, tok, folder = harmony_engine
    llm = LLM(str(folder), device="cpu", dtype="float32", num_kv_blocks=32)
    _script(llm.engine, _ids(tok, REPLY))
    reply = _stream_reply(llm, [{"role": "user", "content": "Hi"}], SamplingParams(max_tokens=200, temperature=0),
                          harmony=True)
    assert reply == "Bonjour ! Un café 😀 ?"
    assert capsys.readouterr().out == "Bonjour ! Un café 😀 ?\n"


def test_gpt_oss_gguf_stops_on_return_and_call_not_end(tmp_path):
    import gguf
    import numpy as np

    from kvserve.loader.gguf import load_gguf_config
    from tests.models.test_gguf import _finish

    tokens = ["a", "b", "<|return|>", "<|end|>", "<|call|>"]
    w = gguf.GGUFWriter(str(tmp_path / "oss.gguf"), "gpt-oss")
    for key, value in (("block_count", 1), ("embedding_length", 64), ("attention.head_count", 4),
                       ("expert_count", 4), ("expert_used_count", 2)):
        w.add_uint32(f"gpt-oss.{key}", value)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_eos_token_id(2)
    w.add_eot_token_id(3)  # a file that names <|end|> as end-of-turn: it must not stop generation
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 64), np.float32))
    w.add_tensor("blk.0.ffn_up.weight", np.zeros((32, 64), np.float32))
    _finish(w)
    assert load_gguf_config(tmp_path / "oss.gguf")["eos_token_id"] == [2, 4]


# -- tool calls (commentary messages to functions.NAME) ------------------------------------------
TOOL_REPLY = ("<|channel|>analysis<|message|>Need the weather in Paris.<|end|>"
              "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json"
              "<|message|>{\"city\": \"Paris\", \"unit\": \"°C\"}<|call|>")
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string"}}}}}]


def test_messages_to_functions_are_tool_calls(tok):
    p = HarmonyParser(tok, tools=True)
    assert p.parse(_ids(tok, TOOL_REPLY)) == ("Need the weather in Paris.", "")
    assert p.calls == [("get_weather", '{"city": "Paris", "unit": "°C"}')]
    # The recipient before the channel, no space before <|constrain|>, two calls, a preamble.
    two = ("<|channel|>commentary<|message|>Checking.<|end|>"
           "<|start|>assistant to=functions.get_time<|channel|>commentary<|constrain|>json<|message|>{}<|call|>"
           "<|start|>assistant<|channel|>commentary to=functions.get_weather<|message|>{\"city\": \"Oslo\"}<|call|>")
    p = HarmonyParser(tok, tools=True)
    assert p.parse(_ids(tok, two)) == ("", "Checking.")
    assert p.calls == [("get_time", "{}"), ("get_weather", '{"city": "Oslo"}')]
    # Other recipients (built-in tools) stay content; without tools nothing changes.
    p = HarmonyParser(tok, tools=True)
    assert p.parse(_ids(tok, "<|channel|>analysis to=browser.search<|message|>q<|call|>")) == ("q", "") and not p.calls
    p = HarmonyParser(tok)
    assert p.parse(_ids(tok, TOOL_REPLY)) == ("Need the weather in Paris.", '{"city": "Paris", "unit": "°C"}')
    assert p.calls == []


def test_streamed_tool_call_grows_and_ends_complete(tok):
    ids = _ids(tok, TOOL_REPLY)
    p = HarmonyParser(tok, tools=True)
    seen = []
    for n in range(1, len(ids) + 1):
        p.feed(ids[:n], finished=n == len(ids))
        seen.append(list(p.calls))
        assert all("\ufffd" not in a for _, a in p.calls)
    named = [c for c in seen if c]
    assert named[0] == [("get_weather", "")]  # announced once the header is complete
    assert seen[-1] == [("get_weather", '{"city": "Paris", "unit": "°C"}')]
    assert p.content == ""


def _sse(client, body) -> list[dict]:
    out = []
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as s:
        for line in s.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                out.extend(json.loads(line[6:])["choices"])
    return out


def test_server_returns_harmony_tool_calls(harmony_engine):
    from starlette.testclient import TestClient

    from kvserve.engine.async_engine import AsyncLLMEngine
    from kvserve.entrypoints.server import build_app

    engine, tok, _ = harmony_engine
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    body = {"messages": msgs, "max_tokens": 200, "temperature": 0, "tools": TOOLS}
    args = '{"city": "Paris", "unit": "°C"}'
    _script(engine, _ids(tok, TOOL_REPLY))
    try:
        # No --tool-call-parser: a harmony model's calls are read from its messages.
        with TestClient(build_app(AsyncLLMEngine(engine), served_model_name="gpt-oss-tiny")) as client:
            r = client.post("/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text
            choice = r.json()["choices"][0]
            assert choice["finish_reason"] == "tool_calls"
            msg = choice["message"]
            assert msg["content"] is None and msg["reasoning_content"] == "Need the weather in Paris."
            [call] = msg["tool_calls"]
            assert call["type"] == "function" and call["id"].startswith("call_")
            assert call["function"] == {"name": "get_weather", "arguments": args}

            chunks = _sse(client, body)
            calls = [tc for ch in chunks for tc in ch["delta"].get("tool_calls") or []]
            assert calls[0]["id"].startswith("call_") and calls[0]["function"] == {"name": "get_weather", "arguments": ""}
            assert all("id" not in tc and tc["index"] == 0 for tc in calls[1:]) and len(calls) > 2
            assert "".join(tc["function"]["arguments"] for tc in calls) == args
            assert "".join(ch["delta"].get("reasoning_content") or "" for ch in chunks) == "Need the weather in Paris."
            assert not "".join(ch["delta"].get("content") or "" for ch in chunks)
            assert [ch["finish_reason"] for ch in chunks if ch["finish_reason"]] == ["tool_calls"]

            # <|call|> ends the turn even for a checkpoint whose stop set lacks it.
            eos = engine.eos_token_ids
            engine.eos_token_ids = eos - {tok.backend.token_to_id("<|call|>")}
            try:
                r = client.post("/v1/chat/completions", json=body)
            finally:
                engine.eos_token_ids = eos
            assert r.json()["choices"][0]["finish_reason"] == "tool_calls"
            assert r.json()["usage"]["completion_tokens"] == len(_ids(tok, TOOL_REPLY))

            # tool_choice "none": the call's arguments stay content, as without tools.
            r = client.post("/v1/chat/completions", json={**body, "tool_choice": "none"})
            choice = r.json()["choices"][0]
            assert choice["message"]["content"] == args and not choice["message"].get("tool_calls")
            assert choice["finish_reason"] == "stop"

            # A reply without a call, with tools on: content and reasoning as before.
            _script(engine, _ids(tok, REPLY))
            r = client.post("/v1/chat/completions", json=body)
            choice = r.json()["choices"][0]
            assert choice["message"]["content"] == "Bonjour ! Un café 😀 ?" and not choice["message"].get("tool_calls")
            assert choice["finish_reason"] == "stop"
            chunks = _sse(client, body)
            assert "".join(ch["delta"].get("content") or "" for ch in chunks) == "Bonjour ! Un café 😀 ?"
            assert not any(ch["delta"].get("tool_calls") for ch in chunks)
    finally:
        _script(engine, _ids(tok, REPLY))


def test_server_forced_tool_choice_keeps_harmony(harmony_engine):
    """tool_choice "required" and a named function on gpt-oss: the structural tag
    (structured/harmony_tools.py) lets the model reason first and write its call as a harmony
    message; the mask lets the scripted call through unchanged and it comes back as
    tool_calls with the analysis as reasoning_content, streamed and not. A reply that would
    answer instead is steered into a call, and an unenforceable parameters schema is a 400."""
    from starlette.testclient import TestClient

    from kvserve.engine.async_engine import AsyncLLMEngine
    from kvserve.entrypoints.server import build_app

    engine, tok, _ = harmony_engine
    args = '{"city": "Paris", "unit": "°C"}'
    other = {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}}}
    base = {"messages": [{"role": "user", "content": "Weather?"}], "max_tokens": 200, "temperature": 0,
            "tools": [other, *TOOLS]}
    try:
        with TestClient(build_app(AsyncLLMEngine(engine), served_model_name="gpt-oss-tiny")) as client:
            _script(engine, _ids(tok, TOOL_REPLY), masked=True)
            for choice_, reason in [("required", "tool_calls"),
                                    ({"type": "function", "function": {"name": "get_weather"}}, "stop")]:
                body = {**base, "tool_choice": choice_}
                r = client.post("/v1/chat/completions", json=body)
                assert r.status_code == 200, r.text
                choice = r.json()["choices"][0]
                assert choice["finish_reason"] == reason, choice
                msg = choice["message"]
                assert msg["content"] is None and msg["reasoning_content"] == "Need the weather in Paris."
                [call] = msg["tool_calls"]
                assert call["function"] == {"name": "get_weather", "arguments": args}
                assert r.json()["usage"]["completion_tokens"] == len(_ids(tok, TOOL_REPLY))
                chunks = _sse(client, body)
                calls = [tc for ch in chunks for tc in ch["delta"].get("tool_calls") or []]
                assert calls[0]["function"] == {"name": "get_weather", "arguments": ""}
                assert "".join(tc["function"]["arguments"] for tc in calls) == args
                assert "".join(ch["delta"].get("reasoning_content") or "" for ch in chunks) == "Need the weather in Paris."
                assert [ch["finish_reason"] for ch in chunks if ch["finish_reason"]] == [reason]

            # The model would answer in the final channel: the grammar allows only a call, and
            # the named function's at that.
            _script(engine, _ids(tok, REPLY), masked=True)
            body = {**base, "tool_choice": {"type": "function", "function": {"name": "get_time"}}}
            r = client.post("/v1/chat/completions", json=body)
            choice = r.json()["choices"][0]
            assert "Bonjour" not in (choice["message"]["content"] or "")
            if choice["finish_reason"] != "length":
                [call] = choice["message"]["tool_calls"]
                assert call["function"]["name"] == "get_time"
                assert json.loads(call["function"]["arguments"])["zone"] in ("UTC", "CET")

            bad = {**base, "tool_choice": "required",
                   "tools": [{"type": "function", "function": {"name": "f", "parameters": {"not": {}}}}]}
            r = client.post("/v1/chat/completions", json=bad)
            assert r.status_code == 400 and r.json()["error"]["param"] == "tools", r.text
    finally:
        _script(engine, _ids(tok, REPLY))
