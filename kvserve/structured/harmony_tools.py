"""The grammar of a forced gpt-oss tool call (`tool_choice` "required" or a named function).

gpt-oss writes its reply in harmony messages (`kvserve/engine/harmony.py`); a tool call is a
commentary message addressed to the function, its body the JSON arguments, ending the turn:

    <|channel|>analysis<|message|>The user wants the weather in Paris.<|end|>
    <|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}<|call|>

A plain JSON grammar would force the model off that format (no analysis, no header) and its
output would not be read as a call. `harmony_call_tag` builds an xgrammar structural tag that
keeps the format and forces the call:

- any number of free analysis messages (and commentary preambles without a recipient) first,
  each ending `<|end|><|start|>assistant`; their text may hold no harmony special token;
- then exactly one call message: a header addressed `to=functions.NAME` for an allowed NAME
  (every tool for "required", the named one otherwise), in either place gpt-oss puts the
  recipient (`<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>` or
  ` to=functions.NAME<|channel|>commentary <|constrain|>json<|message|>` / `... json<|message|>`),
  a body that validates against that function's `parameters` schema, and `<|call|>`.

Every harmony special token is matched as its own token id (xgrammar's `token` format), never
as the same characters spelled out in ordinary tokens: `HarmonyParser` reads messages by token
id. One call per reply: `<|call|>` ends gpt-oss's turn (parallel calls come in later turns).
"""

from __future__ import annotations

from typing import Any

_SPECIALS = ("<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|return|>", "<|call|>", "<|constrain|>",
             "<|endoftext|>")
_NEEDED = ("<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|call|>")


def _const(text: str) -> dict[str, Any]:
    return {"type": "const_string", "value": text}


def _token(i: int) -> dict[str, Any]:
    return {"type": "token", "token": i}


def _seq(*elements: dict[str, Any]) -> dict[str, Any]:
    return {"type": "sequence", "elements": list(elements)}


def _or(*elements: dict[str, Any]) -> dict[str, Any]:
    return elements[0] if len(elements) == 1 else {"type": "or", "elements": list(elements)}


def harmony_special_ids(tokenizer: Any) -> dict[str, int]:
    """The harmony special tokens the tokenizer has (name -> id)."""
    ids = {}
    for name in _SPECIALS:
        i = tokenizer.backend.token_to_id(name)
        if i is not None:
            ids[name] = i
    return ids


def harmony_call_tag(tools: list[dict[str, Any]], ids: dict[str, int], stop_token_ids: list[int] | tuple[int, ...] = (),
                     name: str | None = None) -> dict[str, Any]:
    """The structural tag (JSON form, for `StructuredOutputsParams(structural_tag=...)`) of a
    gpt-oss reply that ends in one call of a function of `tools` (OpenAI's
    `{"type": "function", "function": {"name", "parameters"}}`), or of `name` only.
    ids: `harmony_special_ids`; stop_token_ids: the model's (kept out of free text too)."""
    missing = [t for t in _NEEDED if t not in ids]
    if missing:
        raise ValueError(f"the tokenizer lacks the harmony tokens {missing}")
    ch, msg, end, start, call = (ids[t] for t in ("<|channel|>", "<|message|>", "<|end|>", "<|start|>", "<|call|>"))
    constrain = ids.get("<|constrain|>")
    free = {"type": "any_tokens", "exclude_tokens": sorted(set(ids.values()) | set(stop_token_ids))}
    # Messages before the call: analysis (reasoning) or a commentary preamble (content).
    before = _seq(_token(ch), _or(_const("analysis"), _const("commentary")), _token(msg), free,
                  _token(end), _token(start), _const("assistant"))
    json_tail = [_const(" json")]  # "commentary json<|message|>" (no <|constrain|>)
    if constrain is not None:
        json_tail.insert(0, _seq({"type": "optional", "content": _const(" ")}, _token(constrain), _const("json")))
    from kvserve.structured.grammar import prepare_schema

    calls = []
    for i, tool in enumerate(tools):
        fn = tool["function"]
        if name is not None and fn["name"] != name:
            continue
        recipient = f"to=functions.{fn['name']}"
        # checked here so that an unenforceable keyword is reported against the tool
        params = prepare_schema(fn.get("parameters") or {"type": "object", "properties": {}},
                                f"tools[{i}].function.parameters")
        body = {"type": "json_schema", "json_schema": params}
        headers = [_seq(_const(f" {recipient}"), _token(ch), _const("commentary"), _or(*json_tail), _token(msg))]
        if constrain is not None:
            headers.insert(0, _seq(_token(ch), _const(f"commentary {recipient}"),
                                   {"type": "optional", "content": _const(" ")}, _token(constrain),
                                   _const("json"), _token(msg)))
        else:
            headers.insert(0, _seq(_token(ch), _const(f"commentary {recipient} json"), _token(msg)))
        calls.append(_seq(_or(*headers), body, _token(call)))
    if not calls:
        raise ValueError(f"no tool named {name!r}")
    return {"type": "structural_tag", "format": _seq({"type": "star", "content": before}, _or(*calls))}
