"""gpt-oss forced tool calls (tool_choice "required" / a named function) keep the harmony format:
the structural tag of `kvserve/structured/harmony_tools.py`, checked on xgrammar's matcher with a
harmony tokenizer. Correct replies (analysis first or not, either header form, a preamble) are
accepted and read by `HarmonyParser` as the call; a wrong or unlisted function name, arguments
that break the schema, a final answer, a reply that ends without a call and spelled-out special
tokens are rejected. Random walks through the masks (every allowed token equally likely) always
end in a call that parses and validates."""

from __future__ import annotations

import json
import random

import jsonschema
import pytest
import torch

from kvserve.core.sampling_params import StructuredOutputsParams as SO
from kvserve.engine.harmony import HarmonyParser
from kvserve.structured.grammar import GrammarCompiler, RequestGrammar, allocate_bitmask
from kvserve.structured.harmony_tools import harmony_call_tag, harmony_special_ids
from tests.engine.test_harmony import _save_harmony_tokenizer

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                            "unit": {"enum": ["C", "F"]}}, "required": ["city"]}
ADD = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                        "b": {"type": "integer", "minimum": 0, "maximum": 99}},
       "required": ["a", "b"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "parameters": ADD}}]
CALL = ('<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant<|channel|>commentary '
        'to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}<|call|>')


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return _save_harmony_tokenizer(tmp_path_factory.mktemp("harmony-tools"))


@pytest.fixture(scope="module", params=["call-is-eos", "return-only"])
def setup(request, tok):
    """The grammar compiled with <|call|> among the model's stop tokens (gpt-oss's
    generation_config) and without it (the server then adds it as a request stop token)."""
    ids = harmony_special_ids(tok)
    stops = [ids["<|return|>"]] + ([ids["<|call|>"]] if request.param == "call-is-eos" else [])
    comp = GrammarCompiler(tok, 512, stops)

    def compile(name=None):
        return comp.compile(SO(structural_tag=harmony_call_tag(TOOLS, ids, stops, name)))

    return comp, compile, stops, ids


def _feed(tok, setup, compiled, text_or_ids) -> tuple[bool, list[int]]:
    """(every token accepted and the grammar then complete, the ids)."""
    comp, _, stops, ids = setup
    toks = tok.encode(text_or_ids, add_special_tokens=False) if isinstance(text_or_ids, str) else text_or_ids
    g = RequestGrammar(compiled, stops, comp.guard)
    for t in toks:
        if not g.matcher.accept_token(t):
            return False, toks
    done = g.matcher.is_terminated() or g.matcher.accept_token(stops[0])
    return done, toks


@pytest.mark.parametrize("text, name, args", [
    (CALL, "get_weather", '{"city": "Paris"}'),
    # no analysis; the recipient before the channel, with and without <|constrain|>
    ('<|channel|>commentary to=functions.add<|constrain|>json<|message|>{"a":1,"b":2}<|call|>', "add", '{"a":1,"b":2}'),
    (' to=functions.add<|channel|>commentary <|constrain|>json<|message|>{"a": 1, "b": 2}<|call|>', "add",
     '{"a": 1, "b": 2}'),
    (' to=functions.get_weather<|channel|>commentary json<|message|>{"city": "Rome", "unit": "C"}<|call|>',
     "get_weather", '{"city": "Rome", "unit": "C"}'),
    # two analysis messages and a preamble to the user first
    ('<|channel|>analysis<|message|>Hm.<|end|><|start|>assistant<|channel|>analysis<|message|>Sum.<|end|>'
     '<|start|>assistant<|channel|>commentary<|message|>Adding.<|end|><|start|>assistant<|channel|>commentary '
     'to=functions.add <|constrain|>json<|message|>{"a": 40, "b": 2}<|call|>', "add", '{"a": 40, "b": 2}'),
])
def test_harmony_calls_are_accepted_and_parse(tok, setup, text, name, args):
    _, compile, _, _ = setup
    ok, ids = _feed(tok, setup, compile(), text)
    assert ok
    p = HarmonyParser(tok, tools=True)
    p.parse(ids)
    assert p.calls == [(name, args)]
    named_ok, _ = _feed(tok, setup, compile(name), text)
    other = "add" if name == "get_weather" else "get_weather"
    assert named_ok and not _feed(tok, setup, compile(other), text)[0]


@pytest.mark.parametrize("text", [
    CALL.replace("get_weather", "get_time"),  # not a tool
    CALL.replace('"Paris"', '"Paris, France"'),  # maxLength 8
    CALL.replace('{"city": "Paris"}', '{"unit": "C"}'),  # city is required
    CALL.replace('"Paris"', "7"),  # a number for a string
    '<|channel|>commentary to=functions.add <|constrain|>json<|message|>{"a": 1, "b": 2, "c": 3}<|call|>',
    '<|channel|>commentary to=functions.add <|constrain|>json<|message|>{"a": 100, "b": 2}<|call|>',
    '<|channel|>final<|message|>It is sunny.<|return|>',  # an answer instead of a call
    '<|channel|>analysis<|message|>Just answer.<|end|><|start|>assistant<|channel|>final<|message|>Hi<|return|>',
    '<|channel|>analysis<|message|>No call.<|return|>',
    CALL.replace("<|call|>", "<|end|>"),  # a call must end the turn
    '<|channel|>analysis<|message|>a <|channel|> inside<|end|>' + CALL,  # a special token in free text
])
def test_harmony_calls_that_break_the_format_are_rejected(tok, setup, text):
    _, compile, _, _ = setup
    assert not _feed(tok, setup, compile(), text)[0]


def test_spelled_out_special_tokens_are_rejected(tok, setup):
    """`<|channel|>` written as ordinary tokens would not be read as a header by HarmonyParser."""
    _, compile, _, _ = setup
    spelled = [t for ch in "<|channel|>" for t in tok.encode(ch, add_special_tokens=False)]
    rest = tok.encode(CALL[len("<|channel|>"):], add_special_tokens=False)
    assert not _feed(tok, setup, compile(), spelled + rest)[0]
    assert _feed(tok, setup, compile(), tok.encode("<|channel|>", add_special_tokens=False) + rest)[0]


@pytest.mark.parametrize("name", [None, "add"])
def test_random_walks_through_the_masks_end_in_valid_calls(tok, setup, name):
    """Sampling uniformly among the tokens each mask allows (the tightest test of the masks: no
    model preferences) always reaches a complete call; the ids parse into one call whose
    arguments validate. Free text ends early (<|end|> favoured) to keep the walks short."""
    comp, compile, stops, ids = setup
    compiled = compile(name)
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    vocab = comp.vocab_size
    for seed in range(12):
        rng = random.Random(seed)
        g = RequestGrammar(compiled, stops, comp.guard)
        out: list[int] = []
        for _ in range(400):
            mask = allocate_bitmask(1, vocab)
            g.fill_bitmask(mask, 0)
            bits = ((mask[0, :, None] >> torch.arange(32, dtype=torch.int32)) & 1).flatten()[:vocab]
            allowed = bits.nonzero().flatten().tolist()
            assert allowed, tok.decode(out)
            if ids["<|end|>"] in allowed and rng.random() < 0.3:
                t = ids["<|end|>"]
            elif ids["<|call|>"] in allowed:
                t = ids["<|call|>"]
            else:
                t = rng.choice(allowed)
            out.append(t)
            if t in stops or g.accept(t):
                break
        else:
            pytest.fail(f"no call after 400 tokens: {tok.decode(out)!r}")
        assert out[-1] == ids["<|call|>"] or (out[-1] in stops and out[-2] == ids["<|call|>"])
        p = HarmonyParser(tok, tools=True)
        p.parse(out)
        [(fn, args)] = p.calls
        assert name is None or fn == name
        jsonschema.validate(json.loads(args), schemas[fn])


def test_unenforceable_schema_and_bad_tags_are_value_errors(tok, setup):
    comp, _, stops, ids = setup
    bad = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "not": {}}}}]
    with pytest.raises(ValueError, match=r"'not' \(at tools\[0\].function.parameters\)"):
        harmony_call_tag(bad, ids, stops)
    tag = {"type": "structural_tag", "format": {"type": "json_schema", "json_schema": {"not": {}}}}
    with pytest.raises(ValueError, match="'not'"):
        comp.compile(SO(structural_tag=tag))
    with pytest.raises(ValueError, match="no tool named"):
        harmony_call_tag(TOOLS, ids, stops, "nope")
    with pytest.raises(ValueError, match="structural_tag"):
        comp.compile(SO(structural_tag={"type": "structural_tag", "format": {"type": "nonsense"}}))
    with pytest.raises(ValueError, match="not valid JSON"):
        SO(structural_tag="{")


def test_special_tokens_are_never_text(tok, setup):
    """xgrammar would take a control token as the characters of its name anywhere text may go
    (xgrammar issue #832): inside a JSON string, a regex's `.`, an EBNF negated class. There the
    masks allow no special token; a stop token only where the grammar may end."""
    comp, _, stops, ids = setup
    specials = sorted(tok.all_special_ids)
    quote = tok.encode('"', add_special_tokens=False)
    for spec, prefix in [(SO(json={"type": "string"}), quote), (SO(json={"type": "object"}), []),
                         (SO(regex=".*"), []), (SO(grammar="root ::= [^a]*"), [])]:
        g = RequestGrammar(comp.compile(spec), stops, comp.guard)
        for t in prefix:
            assert not g.accept(t)
        mask = allocate_bitmask(1, comp.vocab_size)
        g.fill_bitmask(mask, 0)
        bits = ((mask[0, :, None] >> torch.arange(32, dtype=torch.int32)) & 1).flatten()
        allowed = {i for i in specials if bits[i]}
        assert allowed <= set(stops), (spec, allowed)
        assert bits[tok.encode("{" if spec.json == {"type": "object"} else "b",
                               add_special_tokens=False)[0]]
