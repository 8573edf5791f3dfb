"""Tool-call parsers (hermes, llama3_json, mistral), tool planning without a parser, and tool
calls / tool messages reaching chat templates. Pure Python."""

from __future__ import annotations

import pytest

from kvserve.engine.chat_template import render_chat, validate_messages
from kvserve.structured.tool_parsers import ToolCall, get_tool_parser


@pytest.mark.parametrize("name, text, content, calls", [
    ("hermes", 'Sure.\n<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>\n'
               '<tool_call>{"name": "g", "arguments": {}}</tool_call>',
     "Sure.\n", [ToolCall("f", '{"a": 1}'), ToolCall("g", "{}")]),
    ("hermes", '<tool_call>{"name": "f", "arguments": {"x": "é"}}', None, [ToolCall("f", '{"x": "é"}')]),
    ("hermes", "no calls here", "no calls here", []),
    ("hermes", '<tool_call>{"name": "f", "arguments": {"a": 1</tool_call>', '<tool_call>{"name": "f", "arguments": {"a": 1</tool_call>', []),
    ("llama3_json", '<|python_tag|>{"name": "f", "parameters": {"q": "x"}}; {"name": "g", "parameters": {}}',
     None, [ToolCall("f", '{"q": "x"}'), ToolCall("g", "{}")]),
    ("llama3_json", '{"name": "f", "arguments": {"q": 1}}', None, [ToolCall("f", '{"q": 1}')]),
    ("llama3_json", "Hello {there}", "Hello {there}", []),
    ("llama3_json", '{"name": "f", "parameters": {}} trailing', '{"name": "f", "parameters": {}} trailing', []),
    ("mistral", '[TOOL_CALLS][{"name": "f", "arguments": {"a": 1}}, {"name": "g", "arguments": {"b": 2}}]',
     None, [ToolCall("f", '{"a": 1}'), ToolCall("g", '{"b": 2}')]),
    ("mistral", 'ok [TOOL_CALLS]f[ARGS]{"a": 1}[TOOL_CALLS]g[ARGS]{}', "ok ", [ToolCall("f", '{"a": 1}'), ToolCall("g", "{}")]),
    ("mistral", '[TOOL_CALLS][{"arguments": {}}]', '[TOOL_CALLS][{"arguments": {}}]', []),
])
def test_parsers(name, text, content, calls):
    assert get_tool_parser(name).parse(text) == (content, calls)


def test_streaming_holds_back_possible_markers():
    h = get_tool_parser("hermes")
    assert h.content_prefix_len("Hello <tool") == 6
    assert h.content_prefix_len("Hello <b>") == 9
    assert h.content_prefix_len('Hi <tool_call>{"na') == 3
    l3 = get_tool_parser("llama3_json")
    assert l3.content_prefix_len("  ") == 0 and l3.content_prefix_len(' {"name"') == 0
    assert l3.content_prefix_len("<|pyth") == 0 and l3.content_prefix_len("Sure") == 4
    with pytest.raises(ValueError, match="tool_call_parser"):
        get_tool_parser("nope")


def test_auto_needs_a_parser():
    from types import SimpleNamespace

    from kvserve.entrypoints.server.errors import APIError
    from kvserve.entrypoints.server.structured import plan_tools

    tools = [{"type": "function", "function": {"name": "f"}}]
    req = SimpleNamespace(tools=tools, tool_choice=None, parallel_tool_calls=None)
    with pytest.raises(APIError) as e:
        plan_tools(req, SimpleNamespace(tool_call_parser=None, is_harmony=lambda: False))
    assert e.value.param == "tool_choice" and "--tool-call-parser" in str(e.value)
    assert plan_tools(req, SimpleNamespace(tool_call_parser="hermes", is_harmony=lambda: False)).mode == "auto"
    req.tool_choice = "none"
    assert not plan_tools(req, SimpleNamespace(tool_call_parser=None, is_harmony=lambda: False)).active


def test_tools_and_tool_messages_reach_the_template():
    template = (
        "{% for t in tools %}[tool {{ t.function.name }}]{% endfor %}"
        "{% for m in messages %}{{ m.role }}:"
        "{% if m.tool_calls %}{% for c in m.tool_calls %}call {{ c.function.name }}"
        "({{ c.function.arguments.city }}){% endfor %}{% endif %}"
        "{% if m.role == 'tool' %}{{ m.tool_call_id }}={% endif %}{{ m.content }};{% endfor %}"
    )
    msgs = validate_messages([
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ])
    text = render_chat(template, msgs, tools=[{"type": "function", "function": {"name": "get_weather"}}])
    assert text == "[tool get_weather]user:weather?;assistant:call get_weather(Paris);tool:call_1=sunny;"


def _stream(plan, text: str, step: int):
    """Feed text in pieces of `step` characters; (deltas, finish_reason)."""
    from kvserve.entrypoints.server.structured import ToolStream

    ts = ToolStream(plan)
    deltas = []
    for i in range(0, len(text), step):
        deltas += ts.feed(text[i:i + step])
    more, reason = ts.finish("stop")
    return deltas + more, reason


def _join(deltas):
    content, calls = None, {}
    for d in deltas:
        if d.get("content"):
            content = (content or "") + d["content"]
        for tc in d.get("tool_calls", []):
            call = calls.setdefault(tc["index"], {"id": None, "name": None, "arguments": "", "first": tc})
            call["id"] = tc.get("id") or call["id"]
            call["name"] = tc.get("function", {}).get("name") or call["name"]
            call["arguments"] += tc.get("function", {}).get("arguments", "")
    return content, [calls[i] for i in sorted(calls)]


@pytest.mark.parametrize("mode, parser, text", [
    ("auto", "hermes", 'Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Par\\"is}", '
                       '"unit": "C"}}\n</tool_call>\n<tool_call>{"name": "add", "arguments": {"a": 12, "b": [3]}}</tool_call>'),
    ("auto", "hermes", '\n<tool_call>{"arguments": {"a": 1}, "name": "f"}</tool_call>'),  # name after the arguments
    ("auto", "hermes", 'Plain text, <b>no</b> call.'),
    ("auto", "llama3_json", '<|python_tag|>{"name": "f", "parameters": {"q": "x y z"}}; {"name": "g", "parameters": {}}'),
    ("auto", "mistral", 'ok [TOOL_CALLS][{"name": "f", "arguments": {"a": 1}}, {"name": "g", "arguments": {"b": "é"}}]'),
    ("auto", "mistral", '[TOOL_CALLS]f[ARGS]{"a": {"b": 1}}[TOOL_CALLS]g[ARGS]{}'),
    ("auto", "hermes", '<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>'),  # arguments as a string
    ("required", None, '[{"name": "add", "parameters": {"a": 1, "b": 22}}, {"name": "get_weather", '
                       '"parameters": {"city": "Oslo", "unit": "F"}}]'),
    ("named", None, '{"a": 4, "b": 5}'),
])
@pytest.mark.parametrize("step", [1, 3, 1000])
def test_streamed_tool_calls_are_incremental_and_join_to_the_parse(mode, parser, text, step):
    from kvserve.entrypoints.server.structured import ToolPlan, extract_calls

    plan = ToolPlan(mode, [], named="add" if mode == "named" else None,
                    parser=get_tool_parser(parser) if parser else None)
    content, calls = extract_calls(plan, text)
    deltas, reason = _stream(plan, text, step)
    got_content, got_calls = _join(deltas)
    assert (got_content or None) == (content or None)
    assert [(c["name"], c["arguments"]) for c in got_calls] == [(c.name, c.arguments) for c in calls]
    for c in got_calls:  # the first delta of a call: index, id, type, name, empty arguments
        assert c["first"]["id"] and c["first"]["type"] == "function"
        assert c["first"]["function"] == {"name": c["name"], "arguments": ""}
    assert reason == ("tool_calls" if calls and mode != "named" else "stop")
    if step == 1 and calls and '"{' not in text and '{"arguments"' not in text:
        # Arguments arrive in many fragments while they are written, not whole at the end.
        pieces = [d for d in deltas if d.get("tool_calls") and "id" not in d["tool_calls"][0]]
        assert len(pieces) >= sum(len(c.arguments) for c in calls) // 2
