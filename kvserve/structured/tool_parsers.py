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

A call is (name, arguments as a JSON string). The arguments are the object's text exactly as
the model wrote it (re-encoded only when a model writes them as a JSON string holding an
object), so the fragments streamed while it is written (`partial_calls`) join up to the
arguments of the finished parse. Output that does not parse as the family's format is returned
as plain content with no calls: a malformed call is never half-reported (except while
streaming, where fragments already sent cannot be taken back).
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


@dataclass(frozen=True)
class PartialCall:
    """A call as far as it is written: its name once complete, its arguments' text so far."""

    name: str | None
    arguments: str


def _ws(s: str, i: int) -> int:
    while i < len(s) and s[i] in " \t\n\r":
        i += 1
    return i


def object_members(s: str, i: int) -> tuple[dict[str, tuple[int, int]], tuple[str, int] | None, int | None]:
    """Read the JSON object that starts at s[i] ('{'), complete or not: (spans of the members
    whose values are complete, {key: (start, end)}; (key, value start) of a member whose value
    is still being written, or None; the index after the closing brace, or None while the object
    is incomplete). Raises ValueError for text that cannot be (the start of) a JSON object."""
    if s[i:i + 1] != "{":
        raise ValueError("not a JSON object")
    spans: dict[str, tuple[int, int]] = {}
    i = _ws(s, i + 1)
    if s[i:i + 1] == "}":
        return spans, None, i + 1
    while True:
        if i >= len(s):
            return spans, None, None
        if s[i] != '"':
            raise ValueError("expected a key")
        try:
            key, i = _DECODER.raw_decode(s, i)
        except ValueError:
            return spans, None, None  # the key is still being written
        i = _ws(s, i)
        if i >= len(s):
            return spans, None, None
        if s[i] != ":":
            raise ValueError("expected ':'")
        start = _ws(s, i + 1)
        if start >= len(s):
            return spans, None, None
        try:
            _, end = _DECODER.raw_decode(s, start)
        except ValueError:  # unfinished (or malformed: then it never completes)
            return spans, (key, start), None
        if end == len(s) and s[start] not in '{["':  # a number may go on: 12 -> 123
            return spans, (key, start), None
        spans[key] = (start, end)
        i = _ws(s, end)
        if i >= len(s):
            return spans, None, None
        if s[i] == "}":
            return spans, None, i + 1
        if s[i] != ",":
            raise ValueError("expected ',' or '}'")
        i = _ws(s, i + 1)


def _call_at(s: str, i: int, args_keys: tuple[str, ...] = ("arguments", "parameters")) -> tuple[ToolCall, int]:
    """The complete call object {"name": ..., <args key>: {...}} at s[i]; (call, end)."""
    spans, _, end = object_members(s, i)
    if end is None:
        raise ValueError("an unfinished tool call")
    name = json.loads(s[slice(*spans["name"])]) if "name" in spans else None
    if not isinstance(name, str) or not name:
        raise ValueError("a tool call needs a name")
    key = next((k for k in args_keys if k in spans), None)
    return ToolCall(name, "{}" if key is None else _raw_args(s[slice(*spans[key])])), end


def _raw_args(text: str) -> str:
    if text.startswith("{"):
        return text  # as written (and as streamed)
    return _args_text(json.loads(text))


def partial_objects(s: str, i: int, args_keys: tuple[str, ...], skip: str) -> list[PartialCall]:
    """The calls written so far in a run of call objects starting at s[i], separated by any of
    the characters / markers matched by the regex `skip`; `name[ARGS]{...}` (Mistral) too.
    For streaming only: it reads as far as the text is well formed and stops there."""
    skip_re = re.compile(skip)
    out: list[PartialCall] = []
    while True:
        m = skip_re.match(s, i)
        i = m.end() if m else i
        if i >= len(s):
            return out
        named = re.compile(r"([A-Za-z0-9_.\-]+)\[ARGS\]\s*").match(s, i)
        if named is not None:
            i = named.end()
            if i >= len(s) or s[i] != "{":
                out.append(PartialCall(named.group(1), ""))
                return out
            end = _object_end(s, i)
            out.append(PartialCall(named.group(1), s[i:end]))
            if end is None:
                return out
            i = end
            continue
        if s[i] != "{":
            return out
        try:
            spans, pending, end = object_members(s, i)
        except ValueError:
            return out
        name = None
        if "name" in spans:
            name = json.loads(s[slice(*spans["name"])])
            if not isinstance(name, str):
                return out
        args = ""
        key = next((k for k in args_keys if k in spans), None)
        if key is not None:
            a, b = spans[key]
            args = s[a:b] if s[a] == "{" else ""
        elif pending is not None and pending[0] in args_keys and s[pending[1]] == "{":
            args = s[pending[1]:]
        out.append(PartialCall(name, args))
        if end is None:
            return out
        i = end


def _object_end(s: str, i: int) -> int | None:
    """Index after the object starting at s[i] (None while it is not closed)."""
    depth, in_str, esc = 0, False, False
    for j in range(i, len(s)):
        ch = s[j]
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return j + 1
    return None


def _args_text(args: Any) -> str:
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            raise ValueError("arguments are not JSON") from None
    if not isinstance(args, dict):
        raise ValueError("arguments must be a JSON object")
    return json.dumps(args, ensure_ascii=False)


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

    def partial_calls(self, text: str) -> list[PartialCall]:
        """The calls of a partial output as far as they are written (see `partial_objects`)."""
        raise NotImplementedError


class _MarkerParser(ToolParser):
    marker = ""
    _skip = ""

    def partial_calls(self, text: str) -> list[PartialCall]:
        i = text.find(self.marker)
        if i < 0:
            return []
        return partial_objects(text, i, ("arguments", "parameters"), self._skip)

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
    _skip = r"(?:\s|<tool_call>|</tool_call>)*"

    def _calls(self, tail: str) -> list[ToolCall]:
        calls = []
        parts = tail.split(self.marker)[1:]
        for j, part in enumerate(parts):
            body, closed, rest = part.partition(self._end)
            if rest.strip() or (not closed and j != len(parts) - 1):  # the last may be unclosed (EOS)
                raise ValueError("text between tool calls")
            body = body.strip()
            call, end = _call_at(body, 0)
            if body[end:].strip():
                raise ValueError("trailing text in a tool call")
            calls.append(call)
        return calls


class MistralToolParser(_MarkerParser):
    name = "mistral"
    marker = "[TOOL_CALLS]"
    _skip = r"(?:\s|,|\[TOOL_CALLS\]|\[(?!ARGS\])|\])*"

    def _calls(self, tail: str) -> list[ToolCall]:
        calls = []
        for part in tail.split(self.marker)[1:]:
            part = part.strip()
            if not part:
                continue
            if part.startswith("{"):
                call, end = _call_at(part, 0)
                if part[end:].strip():
                    raise ValueError("trailing text after the tool calls")
                calls.append(call)
            elif part.startswith("["):
                calls.extend(_array_calls(part))
            else:  # name[ARGS]{...}
                name, sep, args = part.partition("[ARGS]")
                if not sep:
                    raise ValueError("no [ARGS] in a tool call")
                args = args.strip()
                obj, end = _DECODER.raw_decode(args)
                if args[end:].strip():
                    raise ValueError("trailing text after the arguments")
                if not isinstance(obj, dict) or not name.strip():
                    raise ValueError("a tool call needs a name and an arguments object")
                calls.append(ToolCall(name.strip(), args[:end]))
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

    def partial_calls(self, text: str) -> list[PartialCall]:
        s = text.lstrip()
        if s.startswith(self._tag):
            s = s[len(self._tag):]
        return partial_objects(s, 0, ("parameters", "arguments"), r"[\s;]*")

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
                call, end = _call_at(s, pos, ("parameters", "arguments"))
                calls.append(call)
                pos = end
                while pos < len(s) and (s[pos].isspace() or s[pos] == ";"):
                    pos += 1
                if pos < len(s) and s[pos] != "{":
                    raise ValueError("text after a tool call")
        except ValueError:
            return text, []
        return None, calls


def _array_calls(s: str, args_keys: tuple[str, ...] = ("arguments", "parameters")) -> list[ToolCall]:
    """A complete JSON array of call objects, s = '[{...}, ...]' (nothing after it)."""
    i = _ws(s, 1)
    calls = []
    if s[i:i + 1] == "]":
        i += 1
    else:
        while True:
            call, i = _call_at(s, i, args_keys)
            calls.append(call)
            i = _ws(s, i)
            if s[i:i + 1] == "]":
                i += 1
                break
            if s[i:i + 1] != ",":
                raise ValueError("expected ',' or ']' between tool calls")
            i = _ws(s, i + 1)
    if s[i:].strip():
        raise ValueError("trailing text after the tool calls")
    return calls


def array_calls(text: str, args_keys: tuple[str, ...]) -> list[ToolCall]:
    """Calls of a JSON array of call objects (tool_choice='required'); ValueError if malformed."""
    s = text.strip()
    if not s.startswith("["):
        raise ValueError("not a JSON array")
    return _array_calls(s, args_keys)


PARSERS: dict[str, type[ToolParser]] = {
    p.name: p for p in (HermesToolParser, Llama3JsonToolParser, MistralToolParser)
}


def get_tool_parser(name: str) -> ToolParser:
    try:
        return PARSERS[name]()
    except KeyError:
        raise ValueError(f"tool_call_parser must be one of {sorted(PARSERS)} (got {name!r})") from None
