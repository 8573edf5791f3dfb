"""Structured output and tool calling against a real `kvserve serve` process (tiny random
Llama, --tool-call-parser hermes) through the installed `openai` client and raw HTTP."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import pydantic
import pytest

from tests.server.conftest import MODEL_NAME, ServerProcess

MSGS = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                                     "unit": {"enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                                                   "b": {"type": "integer", "minimum": 0, "maximum": 99}},
                                  "required": ["a", "b"]}}}
TOOLS = [WEATHER, ADD]
HERMES_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n</tool_call>'


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    log = tmp_path_factory.mktemp("structured-server") / "server.log"
    proc = ServerProcess(tiny_llama[0], log, "--tool-call-parser", "hermes")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


class Person(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=8)
    age: int = pydantic.Field(ge=0, le=120)
    pets: list[str] = pydantic.Field(max_length=2)


def test_openai_parse_with_pydantic_model(client):
    r = client.chat.completions.parse(model=MODEL_NAME, messages=MSGS, response_format=Person,
                                      max_tokens=200, temperature=0.7, seed=3)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(msg.parsed, Person)
    assert Person.model_validate_json(msg.content) == msg.parsed


def test_response_format_and_vllm_fields(client, http):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 1, "maximum": 9}},
              "required": ["ok", "n"]}
    r = client.chat.completions.create(model=MODEL_NAME, messages=MSGS, max_tokens=100, temperature=0, response_format={
        "type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}})
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    r = client.chat.completions.create(model=MODEL_NAME, messages=MSGS, max_tokens=200, temperature=0,
                                       response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    cases = [({"guided_choice": ["red", "green"]}, lambda t: t in ("red", "green")),
             ({"guided_regex": "[0-9]{3}-[a-z]{2}"}, lambda t: len(t) == 6 and t[3] == "-"),
             ({"guided_grammar": 'root ::= "x" | "y" "z"'}, lambda t: t in ("x", "yz")),
             ({"guided_grammar": 'start: "x" | "y" Z\nZ: "z"'}, lambda t: t in ("x", "yz")),  # Lark
             ({"guided_json": schema}, lambda t: jsonschema.validate(json.loads(t), schema) is None),
             ({"structured_outputs": {"regex": "(ab){1,3}"}}, lambda t: t in ("ab", "abab", "ababab"))]
    for extra, ok in cases:
        for endpoint in ("completions", "chat"):
            if endpoint == "completions":
                r = client.completions.create(model=MODEL_NAME, prompt="hi", max_tokens=200, temperature=0, extra_body=extra)
                text = r.choices[0].text
                streamed = "".join(c.choices[0].text for c in client.completions.create(
                    model=MODEL_NAME, prompt="hi", max_tokens=200, temperature=0, extra_body=extra, stream=True))
            else:
                r = client.chat.completions.create(model=MODEL_NAME, messages=MSGS, max_tokens=200, temperature=0,
                                                   extra_body=extra)
                text = r.choices[0].message.content
                streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
                    model=MODEL_NAME, messages=MSGS, max_tokens=200, temperature=0, extra_body=extra, stream=True)
                    if c.choices)
            assert ok(text), (extra, text)
            assert streamed == text
            assert r.choices[0].finish_reason == "stop"


TAG_SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 9}},
              "required": ["n"], "additionalProperties": False}
TAG_FORMAT = {"type": "structural_tag", "format": {"type": "sequence", "elements": [
    {"type": "const_string", "value": "<r>"},
    {"type": "json_schema", "json_schema": TAG_SCHEMA},
    {"type": "const_string", "value": "</r>"}]}}
# vLLM's legacy form: free text until the trigger "e", which must then open the tag e=<1|2>;
TAG_LEGACY = {"type": "structural_tag", "triggers": ["e"],
              "structures": [{"begin": "e=", "schema": {"enum": [1, 2]}, "end": ";"}]}


def _both_endpoints(client, extra):
    """[(text, streamed text, finish_reason)] from /v1/completions and /v1/chat/completions."""
    out = []
    r = client.completions.create(model=MODEL_NAME, prompt="hi", max_tokens=60, temperature=0, extra_body=extra)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL_NAME, prompt="hi", max_tokens=60, temperature=0, extra_body=extra, stream=True))
    out.append((r.choices[0].text, streamed, r.choices[0].finish_reason))
    r = client.chat.completions.create(model=MODEL_NAME, messages=MSGS, max_tokens=60, temperature=0, extra_body=extra)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=MODEL_NAME, messages=MSGS, max_tokens=60, temperature=0, extra_body=extra, stream=True) if c.choices)
    out.append((r.choices[0].message.content, streamed, r.choices[0].finish_reason))
    return out


def test_response_format_structural_tag(client):
    for text, streamed, finish in _both_endpoints(client, {"response_format": TAG_FORMAT}):
        assert streamed == text
        assert finish == "stop", text
        assert text.startswith("<r>") and text.endswith("</r>"), text
        jsonschema.validate(json.loads(text[3:-4]), TAG_SCHEMA)


def test_response_format_legacy_structural_tag(client):
    whole = re.compile(r"(?:[^e]|e=\s*[12]\s*;)*")
    for text, streamed, finish in _both_endpoints(client, {"response_format": TAG_LEGACY}):
        assert streamed == text
        # every "e" opens a complete tag; the last may be cut off by max_tokens
        assert whole.fullmatch(text) or (finish == "length" and re.fullmatch(whole.pattern + r"e(=\s*[12]?\s*)?", text)), text


def test_legacy_structural_tag_is_xgrammar_triggered_tags():
    from types import SimpleNamespace

    from kvserve.entrypoints.server.structured import structured_spec

    spec, param = structured_spec(SimpleNamespace(response_format=TAG_LEGACY))
    assert param == "response_format"
    assert spec.structural_tag == {"type": "structural_tag", "format": {"type": "triggered_tags", "triggers": ["e"], "tags": [
        {"type": "tag", "begin": "e=", "content": {"type": "json_schema", "json_schema": {"enum": [1, 2]}}, "end": ";"}]}}
    spec, _ = structured_spec(SimpleNamespace(response_format=TAG_FORMAT))
    assert spec.structural_tag == TAG_FORMAT


def _reassemble(stream) -> tuple[str | None, list[dict], str | None]:
    """Join a streamed chat completion's deltas; each call also records its first delta and how
    many argument fragments followed it."""
    content, calls, finish = None, {}, None
    for chunk in stream:
        for ch in chunk.choices:
            d = ch.delta
            if d.content:
                content = (content or "") + d.content
            for tc in d.tool_calls or []:
                if tc.index not in calls:
                    calls[tc.index] = {"id": None, "name": None, "arguments": "", "first": tc, "fragments": 0}
                call = calls[tc.index]
                if tc.id:
                    call["id"] = tc.id
                if tc.function and tc.function.name:
                    call["name"] = tc.function.name
                if tc.function and tc.function.arguments:
                    call["arguments"] += tc.function.arguments
                    call["fragments"] += 1
            if ch.finish_reason:
                finish = ch.finish_reason
    return content, [calls[i] for i in sorted(calls)], finish


@pytest.mark.parametrize("tool_choice, extra, finish", [
    ("required", {}, "tool_calls"),
    ({"type": "function", "function": {"name": "add"}}, {}, "stop"),
    ("auto", {"structured_outputs": {"choice": ["Let me check. " + HERMES_CALL]}}, "tool_calls"),
    ("required", {"parallel_tool_calls": False}, "tool_calls"),
])
def test_tool_calls_streamed_equal_non_streamed(client, tool_choice, extra, finish):
    kw = dict(model=MODEL_NAME, messages=MSGS, tools=TOOLS, tool_choice=tool_choice, max_tokens=200, temperature=0)
    r = client.chat.completions.create(**kw, extra_body=extra)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == finish
    assert msg.tool_calls and all(tc.id.startswith("call_") and tc.type == "function" for tc in msg.tool_calls)
    for tc in msg.tool_calls:
        tool = next(t for t in TOOLS if t["function"]["name"] == tc.function.name)
        jsonschema.validate(json.loads(tc.function.arguments), tool["function"]["parameters"])
    if extra.get("parallel_tool_calls") is False:
        assert len(msg.tool_calls) == 1
    if isinstance(tool_choice, dict):
        assert [tc.function.name for tc in msg.tool_calls] == ["add"]
    if tool_choice == "auto":
        assert msg.content == "Let me check. "
        assert msg.tool_calls[0].function.name == "get_weather"
        assert json.loads(msg.tool_calls[0].function.arguments) == {"city": "Paris", "unit": "C"}
    content, calls, stream_finish = _reassemble(client.chat.completions.create(**kw, extra_body=extra, stream=True))
    assert stream_finish == finish
    assert (content or None) == (msg.content or None)
    assert [(c["name"], c["arguments"]) for c in calls] == [(t.function.name, t.function.arguments) for t in msg.tool_calls]
    for c in calls:  # OpenAI's shape: a header delta, then the arguments as they are generated
        first = c["first"]
        assert first.id and first.type == "function" and first.function.name == c["name"]
        assert first.function.arguments == ""
        assert c["fragments"] > 1, c
    # The openai client's streaming helper accumulates the same message.
    with client.chat.completions.stream(**kw, extra_body=extra) as s:
        arg_events = sum(1 for e in s if e.type == "tool_calls.function.arguments.delta")
        final = s.get_final_completion()
    assert arg_events >= len(msg.tool_calls) * 2
    fmsg = final.choices[0].message
    assert final.choices[0].finish_reason == finish
    assert (fmsg.content or None) == (msg.content or None)
    assert [(t.function.name, t.function.arguments) for t in fmsg.tool_calls] == \
        [(t.function.name, t.function.arguments) for t in msg.tool_calls]


def test_auto_without_a_call_is_content_and_tool_messages_flow_back(client):
    r = client.chat.completions.create(model=MODEL_NAME, messages=MSGS, tools=TOOLS, max_tokens=30, temperature=0,
                                       extra_body={"structured_outputs": {"choice": ["It is sunny."]}})
    assert r.choices[0].message.content == "It is sunny." and not r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "stop"
    history = MSGS + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris", "unit": "C"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "22 C, sunny"},
    ]
    r = client.chat.completions.create(model=MODEL_NAME, messages=history, tools=TOOLS, tool_choice="none", max_tokens=4)
    assert r.choices[0].message.tool_calls is None


def test_openai_pydantic_function_tool(client):
    import openai

    class GetWeather(pydantic.BaseModel):
        city: str = pydantic.Field(max_length=8)
        unit: str = pydantic.Field(pattern="^(C|F)$")

    r = client.chat.completions.parse(model=MODEL_NAME, messages=MSGS, tools=[openai.pydantic_function_tool(GetWeather)],
                                      tool_choice={"type": "function", "function": {"name": "GetWeather"}},
                                      max_tokens=100, temperature=0)
    call = r.choices[0].message.tool_calls[0]
    assert isinstance(call.function.parsed_arguments, GetWeather)


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
    ({"response_format": {"type": "structural_tag"}}, "response_format"),
    ({"response_format": {"type": "structural_tag", "format": {"type": "nope"}}}, "response_format"),
    ({"response_format": {"type": "structural_tag", "format": {"type": "json_schema", "json_schema": {"type": "foo"}}}},
     "response_format"),
    ({"response_format": {**TAG_LEGACY, "triggers": ["<b"]}}, "response_format"),
    ({"response_format": {**TAG_LEGACY, "structures": [{"begin": "e=", "end": ";"}]}}, "response_format"),
    ({"response_format": TAG_FORMAT, "guided_regex": "a"}, "guided_regex"),
    ({"guided_regex": "[a-"}, "guided_regex"),
    ({"guided_json": "{"}, "guided_json"),
    ({"guided_grammar": "root ::= ("}, "guided_grammar"),
    ({"guided_grammar": "start: undefined_rule"}, "guided_grammar"),  # Lark
    ({"structured_outputs": {"grammar": "start: A\nA: /a(?=b)/"}}, "structured_outputs"),
    ({"guided_choice": []}, "guided_choice"),
    ({"structured_outputs": {"json": {"type": "array", "uniqueItems": True}}}, "structured_outputs"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"parameters": {}}}]}, "tools"),
    ({"tools": TOOLS, "tool_choice": "required", "guided_regex": "a"}, "guided_regex"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "bogus"}}}],
      "tool_choice": "required"}, "tools"),
])
def test_bad_structured_requests_are_400_naming_the_field(http, body, param):
    r = http.post("/v1/chat/completions", json={"messages": MSGS, "max_tokens": 5, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    r = http.post("/v1/chat/completions", json={"messages": MSGS, "max_tokens": 3})
    assert r.status_code == 200  # the server keeps serving


@pytest.mark.parametrize("path, body", [("/v1/chat/completions", {"messages": MSGS}), ("/v1/completions", {"prompt": "hi"})])
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("fmt, words", [
    ({"type": "structural_tag", "format": {"type": "sequence", "elements": [{"type": "bogus"}]}}, ["bogus"]),
    ({"type": "structural_tag", "format": "<r>"}, ["response_format.format"]),
    ({**TAG_LEGACY, "triggers": []}, ["response_format.triggers"]),
    ({**TAG_LEGACY, "triggers": ["x"]}, ["response_format.structures[0].begin", "triggers"]),
    ({**TAG_LEGACY, "structures": [{"begin": "e=", "end": ";"}]}, ["response_format.structures[0].schema"]),
    ({**TAG_LEGACY, "format": TAG_FORMAT["format"]}, ["response_format", "not both"]),
])
def test_bad_structural_tag_400_names_response_format(http, path, body, stream, fmt, words):
    r = http.post(path, json={**body, "max_tokens": 5, "stream": stream, "response_format": fmt})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "response_format" and err["type"] == "invalid_request_error", err
    assert "response_format" in err["message"] and all(w in err["message"] for w in words), err


def test_completions_bad_schema_400(http):
    r = http.post("/v1/completions", json={"prompt": "hi", "guided_json": {"type": "object", "properties": {"a": {"type": "nope"}}}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "guided_json"
    assert "nope" in r.json()["error"]["message"]
