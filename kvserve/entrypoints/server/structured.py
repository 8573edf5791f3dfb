"""Structured output and tool calling over HTTP: request fields -> StructuredOutputsParams,
grammar compilation before the request is queued (so a bad schema is a 400), and tool calls
out of the generated text (whole, or as OpenAI's streamed deltas).

Request fields (one structured-output source per request):
- OpenAI `response_format`: {"type": "text" | "json_object" | "json_schema", "json_schema":
  {"name", "schema", "strict"}}; the schema is enforced whether or not `strict` is set.
  vLLM's {"type": "structural_tag", "format": {...}} (an xgrammar structural tag) and its
  legacy {"type": "structural_tag", "structures": [{"begin", "schema", "end"}], "triggers":
  [...]} (free text until a trigger, then a begin/JSON/end tag; converted to "triggered_tags").
- vLLM `structured_outputs` ({"json" | "regex" | "choice" | "grammar" | "json_object" |
  "structural_tag"}) and the older `guided_json`, `guided_regex`, `guided_choice`,
  `guided_grammar`.
- chat `tools` / `tool_choice` / `parallel_tool_calls`: "required" and a named function are
  enforced by a grammar (a JSON array of {name, parameters} calls; the named function's
  parameters object), written as compact JSON (`, ` and `: ` separators, no newlines); "auto"
  is parsed from free output by `--tool-call-parser`, or, for a harmony model (gpt-oss), from
  its `commentary to=functions.NAME` messages (`engine/harmony.py`, no parser flag needed).
  On a harmony model "required" and a named function keep the format: a structural tag
  (`structured/harmony_tools.py`) lets the model reason in analysis messages first and then
  forces one `commentary to=functions.NAME <|constrain|>json<|message|>{...}<|call|>` message
  for an allowed NAME with arguments valid for its parameters, read like an "auto" call.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from dataclasses import dataclass, field
from typing import Any

from kvserve.core.sampling_params import StructuredOutputsParams
from kvserve.entrypoints.server.errors import bad_request
from kvserve.structured.tool_parsers import PartialCall, ToolCall, ToolParser, array_calls, get_tool_parser, partial_objects

logger = logging.getLogger(__name__)

_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


def structured_spec(req: Any) -> tuple[StructuredOutputsParams | None, str | None]:
    """(spec, the request field it came from) from response_format / structured_outputs /
    guided_*; a 400 naming the field for anything malformed or for two sources at once."""
    given = [name for name in ("response_format", "structured_outputs", *_GUIDED)
             if getattr(req, name, None) is not None]
    fmt = getattr(req, "response_format", None)
    if fmt is not None and fmt.get("type", "text") == "text" and set(fmt) <= {"type"}:
        given.remove("response_format")
    if not given:
        return None, None
    if len(given) > 1:
        raise bad_request(f"set only one of {', '.join(given)}", param=given[1])
    param = given[0]
    try:
        if param == "response_format":
            return _from_response_format(fmt), param
        if param == "structured_outputs":
            so = req.structured_outputs
            unknown = sorted(set(so) - set(StructuredOutputsParams.__dataclass_fields__))
            if unknown:
                raise ValueError(f"unknown fields {unknown}")
            return StructuredOutputsParams(**so), param
        value = getattr(req, param)
        return StructuredOutputsParams(**{_GUIDED[param]: value}), param
    except (ValueError, TypeError) as e:
        raise bad_request(_rename(str(e), param), param=param) from None


def _from_response_format(fmt: dict[str, Any]) -> StructuredOutputsParams:
    kind = fmt.get("type")
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if kind == "json_schema":
        js = fmt.get("json_schema")
        if not isinstance(js, dict):
            raise ValueError("response_format.json_schema must be an object with a 'schema'")
        schema = js.get("schema")
        if schema is None:
            raise ValueError("response_format.json_schema.schema is required")
        if not isinstance(schema, dict):
            raise ValueError("response_format.json_schema.schema must be a JSON schema object")
        return StructuredOutputsParams(json=schema)
    if kind == "structural_tag":
        return StructuredOutputsParams(structural_tag=_structural_tag(fmt))
    raise ValueError(
        "response_format.type must be 'text', 'json_object', 'json_schema' or 'structural_tag' "
        f"(got {kind!r})"
    )


def _structural_tag(fmt: dict[str, Any]) -> dict[str, Any]:
    """vLLM's structural_tag response formats -> xgrammar's JSON form. The legacy form (tags
    of begin, JSON schema, end, entered when a trigger is written) is xgrammar's
    "triggered_tags" format."""
    if "format" in fmt:
        if "structures" in fmt or "triggers" in fmt:
            raise ValueError("response_format: set either 'format' or the legacy 'structures' and 'triggers', not both")
        if not isinstance(fmt["format"], dict):
            raise ValueError("response_format.format must be an xgrammar structural tag format (a JSON object)")
        return {"type": "structural_tag", "format": fmt["format"]}
    if "structures" not in fmt:
        raise ValueError("response_format of type 'structural_tag' needs 'format' (an xgrammar structural tag "
                         "format) or the legacy 'structures' and 'triggers'")
    structures, triggers = fmt["structures"], fmt.get("triggers")
    if not isinstance(structures, list) or not structures:
        raise ValueError("response_format.structures must be a non-empty list of {begin, schema, end}")
    if (not isinstance(triggers, list) or not triggers
            or any(not isinstance(t, str) or not t for t in triggers)):
        raise ValueError("response_format.triggers must be a non-empty list of non-empty strings")
    tags = []
    for i, item in enumerate(structures):
        where = f"response_format.structures[{i}]"
        if not isinstance(item, dict):
            raise ValueError(f"{where} must be an object with 'begin', 'schema' and 'end'")
        begin, schema, end = item.get("begin"), item.get("schema"), item.get("end")
        if not isinstance(begin, str) or not begin:
            raise ValueError(f"{where}.begin must be a non-empty string")
        if not isinstance(end, str):
            raise ValueError(f"{where}.end must be a string")
        if not isinstance(schema, (dict, bool)):
            raise ValueError(f"{where}.schema must be a JSON schema object")
        if not any(begin.startswith(t) for t in triggers):
            raise ValueError(f"{where}.begin {begin!r} does not start with any of response_format.triggers")
        tags.append({"type": "tag", "begin": begin, "content": {"type": "json_schema", "json_schema": schema},
                     "end": end})
    return {"type": "structural_tag", "format": {"type": "triggered_tags", "triggers": triggers, "tags": tags}}


def _rename(msg: str, param: str) -> str:
    """Errors name the request field the user wrote (`guided_json`), not the engine's."""
    for kind in ("json_object", "json", "regex", "choice", "grammar", "structural_tag"):
        msg = msg.replace(f"structured_outputs.{kind}", param)
    if param != "structured_outputs":
        msg = msg.replace("structured_outputs", param)
    return msg


async def compile_spec(state: Any, spec: StructuredOutputsParams, param: str) -> None:
    """Compile (or find cached) the grammar, in a worker thread: an invalid spec or one that
    does not compile within the limit (10 s) is a 400; the engine keeps serving meanwhile."""
    engine = state.engine.engine

    def work() -> None:
        engine.structured.get(spec)

    try:
        await asyncio.to_thread(work)
    except ValueError as e:
        raise bad_request(_rename(str(e), param), param=param) from None


# -- tools ---------------------------------------------------------------------------------------
@dataclass
class ToolPlan:
    mode: str  # "none" | "auto" | "required" | "named"
    tools: list[dict[str, Any]] = field(default_factory=list)
    named: str | None = None
    parser: ToolParser | None = None
    spec: StructuredOutputsParams | None = None  # the grammar of "required" / "named"
    harmony: bool = False  # "auto" calls read from gpt-oss's harmony messages, not from text

    @property
    def active(self) -> bool:
        return self.mode != "none"


def plan_tools(req: Any, state: Any) -> ToolPlan:
    """Check tools / tool_choice and decide how calls are made and read (400s name the field)."""
    tools = req.tools
    choice = req.tool_choice
    if tools is not None:
        if not isinstance(tools, list):
            raise bad_request("tools must be a list of function tools", param="tools")
        names = []
        for i, t in enumerate(tools):
            fn = t.get("function") if isinstance(t, dict) else None
            if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(fn, dict):
                raise bad_request(f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}", param="tools")
            name = fn.get("name")
            if not isinstance(name, str) or not name:
                raise bad_request(f"tools[{i}].function.name must be a non-empty string", param="tools")
            params = fn.get("parameters")
            if params is not None and not isinstance(params, dict):
                raise bad_request(f"tools[{i}].function.parameters must be a JSON schema object", param="tools")
            names.append(name)
        if len(set(names)) != len(names):
            raise bad_request("tools must have distinct function names", param="tools")
    if choice is None:
        choice = "auto" if tools else "none"
    if isinstance(choice, dict):
        fn = choice.get("function") if choice.get("type", "function") == "function" else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str):
            raise bad_request("tool_choice must be 'none', 'auto', 'required' or "
                              "{'type': 'function', 'function': {'name': ...}}", param="tool_choice")
        if not tools or name not in [t["function"]["name"] for t in tools]:
            raise bad_request(f"tool_choice names {name!r}, which is not in tools", param="tool_choice")
        if state.is_harmony():
            return _harmony_forced("named", tools, state, name)
        tool = next(t for t in tools if t["function"]["name"] == name)
        schema = tool["function"].get("parameters") or {"type": "object", "properties": {}}
        return ToolPlan("named", tools, named=name, spec=StructuredOutputsParams(json=schema, disable_any_whitespace=True))
    if choice not in ("none", "auto", "required"):
        raise bad_request(f"tool_choice must be 'none', 'auto', 'required' or a named function (got {choice!r})",
                          param="tool_choice")
    if choice != "none" and not tools:
        raise bad_request(f"tool_choice={choice!r} needs tools", param="tool_choice")
    if choice == "none":
        return ToolPlan("none", tools or [])
    if choice == "required" and state.is_harmony():
        return _harmony_forced("required", tools, state)
    if choice == "required":
        schema = _calls_schema(tools, req.parallel_tool_calls)
        return ToolPlan("required", tools, spec=StructuredOutputsParams(json=schema, disable_any_whitespace=True))
    if state.is_harmony():
        return ToolPlan("auto", tools, harmony=True)
    if state.tool_call_parser is None:
        raise bad_request(
            "tool_choice='auto' needs the server to be started with --tool-call-parser "
            "(hermes, llama3_json or mistral); 'required' or a named function work without it",
            param="tool_choice",
        )
    return ToolPlan("auto", tools, parser=get_tool_parser(state.tool_call_parser))


def _harmony_forced(mode: str, tools: list[dict[str, Any]], state: Any, name: str | None = None) -> ToolPlan:
    """A forced call on a harmony model (gpt-oss): its own message format under a structural
    tag, the call read from the token ids like an "auto" one (one call: <|call|> ends the turn)."""
    from kvserve.structured.harmony_tools import harmony_call_tag, harmony_special_ids

    tok = state.engine.tokenizer
    eos = getattr(getattr(state.engine, "engine", None), "eos_token_ids", ())
    try:
        tag = harmony_call_tag(tools, harmony_special_ids(tok), sorted(eos), name)
    except ValueError as e:
        raise bad_request(str(e), param="tools") from None
    return ToolPlan(mode, tools, named=name, spec=StructuredOutputsParams(structural_tag=tag), harmony=True)


def _calls_schema(tools: list[dict[str, Any]], parallel: bool | None) -> dict[str, Any]:
    """A JSON array of one or more {"name": <a tool>, "parameters": <its arguments>} (one only
    when parallel_tool_calls is false)."""
    variants = [
        {
            "type": "object",
            "properties": {
                "name": {"const": t["function"]["name"]},
                "parameters": t["function"].get("parameters") or {"type": "object", "properties": {}},
            },
            "required": ["name", "parameters"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    schema: dict[str, Any] = {"type": "array", "minItems": 1,
                              "items": variants[0] if len(variants) == 1 else {"anyOf": variants}}
    if parallel is False:
        schema["maxItems"] = 1
    return schema


def new_call_id(plan: ToolPlan) -> str:
    if plan.parser is not None and plan.parser.name == "mistral":
        return uuid.uuid4().hex[:9]  # Mistral's templates require 9 alphanumerics
    return f"call_{uuid.uuid4().hex[:24]}"


def extract_calls(plan: ToolPlan, text: str) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of a finished output. Output that does not hold complete calls (cut
    off by max_tokens, or auto output without calls) is all content."""
    if plan.mode == "named":
        try:
            args = json.loads(text)
        except ValueError:
            return text, []
        # The arguments as generated (and as streamed), once they are known to be an object.
        return (None, [ToolCall(plan.named, text)]) if isinstance(args, dict) else (text, [])
    if plan.mode == "required":
        try:  # the arguments as generated (and as streamed)
            return None, array_calls(text, ("parameters",))
        except ValueError:
            return text, []
    if plan.mode == "auto" and plan.parser is not None:
        return plan.parser.parse(text)
    return text, []  # (harmony calls come from the token ids: HarmonyParser.calls)


def tool_calls_json(calls: list[ToolCall], ids: list[str]) -> list[dict[str, Any]]:
    return [{"id": i, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c, i in zip(calls, ids)]


def finish_reason(plan: ToolPlan, calls: list[ToolCall], engine_reason: str | None) -> str | None:
    """OpenAI's: "tool_calls" when the model chose to call (auto / required); a forced named
    function ends with "stop"; output cut by max_tokens stays "length"."""
    if calls and plan.mode in ("auto", "required") and engine_reason == "stop":
        return "tool_calls"
    return engine_reason


class ToolStream:
    """One choice's streamed output -> OpenAI deltas, as it is generated: content as soon as it
    is certain to be content; each tool call's first delta (index, id, type, function.name and
    empty arguments) as soon as its name is complete, then its arguments' text in fragments as
    they are written. "required" output is read as the grammar writes it (a JSON array of
    {"name", "parameters"} objects), "auto" output by the plan's parser once its marker is seen.
    At the end the finished parse (`extract_calls`, the non-streamed result) is the reference:
    what was not sent yet is sent, so the deltas join up to the non-streamed message."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.text = ""
        self.sent = 0  # characters of text already sent as content
        self.ids: list[str] = []  # ids of the calls announced so far
        self.args_sent: list[str] = []  # arguments text sent so far, per call
        self.calls: list[ToolCall] = []

    def feed(self, delta: str) -> list[dict[str, Any]]:
        """Deltas (dicts with 'content' or 'tool_calls') for new text."""
        self.text += delta
        plan = self.plan
        if plan.mode == "named":
            return self._call_deltas([PartialCall(plan.named, self.text)])
        if plan.mode == "required":
            return self._call_deltas(partial_objects(self.text, 0, ("parameters",), r"[\s,\[\]]*"))
        if plan.mode == "auto":
            out = []
            partial = plan.parser.partial_calls(self.text)
            upto = plan.parser.content_prefix_len(self.text)
            if not partial:  # trailing blanks are content only if more content follows
                upto = len(self.text[:upto].rstrip())
            elif not self.text[:upto].strip():
                upto = 0  # only blanks before the calls: no content (as in the parse)
            if upto > self.sent:
                out.append({"content": self.text[self.sent:upto]})
                self.sent = upto
            return out + self._call_deltas(partial)
        return [{"content": delta}] if delta else []

    def feed_harmony(self, content: str, partial: list[PartialCall]) -> list[dict[str, Any]]:
        """Deltas of a harmony reply (plan.harmony): the parser has already told content from
        calls, so content goes out as it comes and each call as its message is written."""
        return ([{"content": content}] if content else []) + self._call_deltas(partial)

    def _call_deltas(self, partial: list[PartialCall]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for i, pc in enumerate(partial):
            if pc.name is None:
                break  # later calls are announced after this one
            if i == len(self.ids):
                self.ids.append(new_call_id(self.plan))
                self.args_sent.append("")
                out.append({"tool_calls": [{"index": i, "id": self.ids[i], "type": "function",
                                            "function": {"name": pc.name, "arguments": ""}}]})
            sent = self.args_sent[i]
            if len(pc.arguments) > len(sent) and pc.arguments.startswith(sent):
                out.append({"tool_calls": [{"index": i, "function": {"arguments": pc.arguments[len(sent):]}}]})
                self.args_sent[i] = pc.arguments
        return out

    def finish(self, engine_reason: str | None,
               harmony_calls: list[ToolCall] | None = None) -> tuple[list[dict[str, Any]], str | None]:
        """The last deltas and the choice's finish_reason (for a harmony reply, its parser's
        finished calls are the reference; its content was all sent by `feed_harmony`)."""
        plan = self.plan
        if plan.mode not in ("named", "auto", "required"):
            return [], engine_reason
        out: list[dict[str, Any]] = []
        if plan.harmony:
            self.calls = harmony_calls or []
            return out + self._rest_of_calls(), finish_reason(plan, self.calls, engine_reason)
        content, self.calls = extract_calls(plan, self.text)
        if not self.calls:
            if not self.ids:  # no call was sent: the rest is content
                rest = self.text[self.sent:]
                if rest:
                    out.append({"content": rest})
            return out, engine_reason
        if content and len(content) > self.sent:
            out.append({"content": content[self.sent:]})
        return out + self._rest_of_calls(), finish_reason(plan, self.calls, engine_reason)

    def _rest_of_calls(self) -> list[dict[str, Any]]:
        """Deltas for what the streamed calls still lack against the finished ones."""
        out: list[dict[str, Any]] = []
        for i, c in enumerate(self.calls):
            if i < len(self.ids):
                sent = self.args_sent[i]
                if not c.arguments.startswith(sent):
                    logger.warning("tool-call stream: call %d's streamed arguments differ from the final parse", i)
                elif len(c.arguments) > len(sent):
                    out.append({"tool_calls": [{"index": i, "function": {"arguments": c.arguments[len(sent):]}}]})
                continue
            self.ids.append(new_call_id(self.plan))
            self.args_sent.append(c.arguments)
            out.append({"tool_calls": [{"index": i, "id": self.ids[i], "type": "function",
                                        "function": {"name": c.name, "arguments": ""}}]})
            if c.arguments:
                out.append({"tool_calls": [{"index": i, "function": {"arguments": c.arguments}}]})
        return out
