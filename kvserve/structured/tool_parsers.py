"""Tool calls from model output text, one parser per model family (`--tool-call-parser`).

Each parser turns a finished completion into (content, calls) and, while streaming, says how
much of the text so far is certainly content (`content_prefix_len`): text that might still
become a tool call is held back until the model has written enough to tell.

- hermes (Hermes 2/3, Qwen 2.5/3): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`,
  repeated for parallel calls, after optional content.
- llama3_json (Llama 3.1+ JSON tool calling): the whole output is `{"name": ...,
  "parameters": {...}}` (optionally after `<|python_tag|>`), several separated by `;`.
- mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`, or the newer
  `[TOOL_CALLS]name[ARGS]{...}` form.

A call is (name, arguments as a JSON string). Output that does not parse as the family's
format is returned as plain content with no calls: a malformed call is never half-reported.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

_DECODER = json.JSONDecoder()


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object, as text


def _args_text(args: Any) -> str:
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            raise ValueError("arguments are not JSON") from None
    if not isinstance(args, dict):
        raise ValueError("arguments must be a JSON object")
    return json.dumps(args, ensure_ascii=False)


def _call(obj: Any, args_keys: tuple[str, ...] = ("arguments", "parameters")) -> ToolCall:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        raise ValueError("a tool call needs a name")
    args = next((obj[k] for k in args_keys if k in obj), {})
    return ToolCall(obj["name"], _args_text(args))


def _held_back(text: str, marker: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of marker."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class ToolParser:
    name = ""

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content or None, calls). No calls: the content is the whole text."""
        raise NotImplementedError

    def content_prefix_len(self, text: str) -> int:
        """How many leading characters of a partial output are certainly content."""
        raise NotImplementedError


class _MarkerParser(ToolParser):
    marker = ""

    def content_prefix_len(self, text: str) -> int:
        i = text.find(self.marker)
        if i >= 0:
            return i
        return len(text) - _held_back(text, self.marker)

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        i = text.find(self.marker)
        if i < 0:
            return text, []
        try:
            calls = self._calls(text[i:])
        except ValueError:
            return text, []
        if not calls:
            return text, []
        content = text[:i]
        return (content if content.strip() else None), calls

    def _calls(self, tail: str) -> list[ToolCall]:
        raise NotImplementedError


class HermesToolParser(_MarkerParser):
    name = "hermes"
    marker = "<tool_call>"
    _end = "</tool_call>"

    def _calls(self, tail: str) -> list[ToolCall]:
        calls = []
        parts = tail.split(self.marker)[1:]
        for j, part in enumerate(parts):
            body, closed, rest = part.partition(self._end)
            if rest.strip() or (not closed and j != len(parts) - 1):  # the last may be unclosed (EOS)
                raise ValueError("text between tool calls")
            obj, end = _DECODER.raw_decode(body.strip())
            if body.strip()[end:].strip():
                raise ValueError("trailing text in a tool call")
            calls.append(_call(obj))
        return calls


class MistralToolParser(_MarkerParser):
    name = "mistral"
    marker = "[TOOL_CALLS]"

    def _calls(self, tail: str) -> list[ToolCall]:
        calls = []
        for part in tail.split(self.marker)[1:]:
            part = part.strip()
            if not part:
                continue
            if part.startswith("[") or part.startswith("{"):
                obj, end = _DECODER.raw_decode(part)
                if part[end:].strip():
                    raise ValueError("trailing text after the tool calls")
                calls.extend(_call(o) for o in (obj if isinstance(obj, list) else [obj]))
            else:  # name[ARGS]{...}
                name, sep, args = part.partition("[ARGS]")
                if not sep:
                    raise ValueError("no [ARGS] in a tool call")
                obj, end = _DECODER.raw_decode(args.strip())
                if args.strip()[end:].strip():
                    raise ValueError("trailing text after the arguments")
                calls.append(_call({"name": name.strip(), "arguments": obj}))
        return calls


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"
    _tag = "<|python_tag|>"

    def content_prefix_len(self, text: str) -> int:
        s = text.lstrip()
        if not s:
            return 0
        if s.startswith("{") or s.startswith(self._tag) or self._tag.startswith(s):
            return 0  # may be a call: hold everything until the end
        return len(text)

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        s = text.strip()
        if s.startswith(self._tag):
            s = s[len(self._tag):].lstrip()
        if not s.startswith("{"):
            return text, []
        calls = []
        try:
            pos = 0
            while pos < len(s):
                obj, end = _DECODER.raw_decode(s, pos)
                calls.append(_call(obj, ("parameters", "arguments")))
                pos = end
                while pos < len(s) and (s[pos].isspace() or s[pos] == ";"):
                    pos += 1
                if pos < len(s) and s[pos] != "{":
                    raise ValueError("text after a tool call")
        except ValueError:
            return text, []
        return None, calls


PARSERS: dict[str, type[ToolParser]] = {
    p.name: p for p in (HermesToolParser, Llama3JsonToolParser, MistralToolParser)
}


def get_tool_parser(name: str) -> ToolParser:
    try:
        return PARSERS[name]()
    except KeyError:
        raise ValueError(f"tool_call_parser must be one of {sorted(PARSERS)} (got {name!r})") from None
