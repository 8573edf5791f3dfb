"""Structured output in the engine, on a tiny random Llama (which never writes JSON by itself)
and on the built-in SmolLM2: 54 JSON schemas in one batched run (greedy, seeded, n > 1) all
parse and validate; regex, choice and EBNF grammars; the grammar ends requests ("stop") or
max_tokens does ("length"); a constrained row leaves the unconstrained rows of its batch
unchanged; preemption, chunked prefill, prefix caching, speculative decoding, asynchronous
scheduling, logprobs and stop strings keep working; bad specs are ValueErrors."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from kvserve import LLM, SamplingParams
from kvserve.core.sampling_params import GuidedDecodingParams, StructuredOutputsParams as SO
from tests.conftest import requires_smollm2
from tests.structured.schemas import schemas

PROMPT = {"prompt_token_ids": [5, 17, 99, 23, 42, 7]}


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(str(tiny_llama[0]), dtype="float32", device="cpu", num_kv_blocks=256)


def _texts(outs):
    return [c.text for o in outs for c in o.outputs]


def test_many_schemas_validate_greedy_seeded_and_n(llm):
    all_schemas = schemas()
    assert len(all_schemas) >= 50
    params = []
    for i, s in enumerate(all_schemas):
        if i % 3 == 0:
            params.append(SamplingParams(max_tokens=256, temperature=0, structured_outputs=SO(json=s)))
        elif i % 3 == 1:
            params.append(SamplingParams(max_tokens=256, temperature=1.0, seed=i, structured_outputs=SO(json=s)))
        else:  # n > 1, random, the older field name, the schema as a string
            params.append(SamplingParams(max_tokens=256, temperature=0.8, top_p=0.9, n=2,
                                         guided_decoding=GuidedDecodingParams(json=json.dumps(s))))
    outs = llm.generate([PROMPT] * len(all_schemas), params, use_tqdm=False)
    checked = 0
    for s, o in zip(all_schemas, outs):
        for c in o.outputs:
            assert c.finish_reason == "stop", (s, c.text)
            jsonschema.validate(json.loads(c.text), s)
            checked += 1
    assert checked == len(all_schemas) + len(all_schemas) // 3
    # Seeded constrained sampling is reproducible, whatever else is in the batch.
    seeded = [(i, p) for i, p in enumerate(params) if p.seed is not None][:4]
    again = llm.generate([PROMPT] * len(seeded), [p for _, p in seeded], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in again] == [outs[i].outputs[0].token_ids for i, _ in seeded]


def test_regex_choice_grammar_json_object(llm):
    grammar = 'root ::= "(" num ("+" num)* ")"\nnum ::= [1-9] [0-9]?'
    params = [
        SamplingParams(max_tokens=40, temperature=0.7, seed=1, structured_outputs=SO(regex=r"[A-Z]{2}-\d{3}")),
        SamplingParams(max_tokens=40, temperature=0, structured_outputs=SO(choice=["apple", "banana split", "ch\"erry"])),
        SamplingParams(max_tokens=60, temperature=0.9, seed=2, structured_outputs=SO(grammar=grammar)),
        SamplingParams(max_tokens=200, temperature=0, structured_outputs=SO(json_object=True)),
        SamplingParams(max_tokens=200, temperature=0.9, seed=4, structured_outputs=SO(
            json={"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}},
                  "required": ["a"]}, disable_any_whitespace=True)),
    ]
    a, b, c, d, e = _texts(llm.generate([PROMPT] * 5, params, use_tqdm=False))
    assert re.fullmatch(r"[A-Z]{2}-\d{3}", a)
    assert b in ("apple", "banana split", "ch\"erry")
    assert re.fullmatch(r"\([1-9][0-9]?(\+[1-9][0-9]?)*\)", c)
    assert isinstance(json.loads(d), dict)
    assert re.fullmatch(r'\{"a": [0-9]\}', e)  # xgrammar's separators: ', ' and ': '


def test_structural_tag(llm):
    """An xgrammar structural tag (vLLM's structured_outputs.structural_tag): literal text, then a
    JSON-schema part (its strings length-bounded as for plain schemas), then a choice."""
    tag = {"type": "structural_tag", "format": {"type": "sequence", "elements": [
        {"type": "const_string", "value": "ANSWER "},
        {"type": "json_schema", "json_schema": {"type": "object", "properties": {"n": {"type": "string", "maxLength": 4}},
                                                "required": ["n"]}},
        {"type": "or", "elements": [{"type": "const_string", "value": " ok"}, {"type": "const_string", "value": " no"}]},
    ]}}
    params = [SamplingParams(max_tokens=120, temperature=1.0, seed=s, structured_outputs=SO(structural_tag=tag))
              for s in range(6)]
    params.append(SamplingParams(max_tokens=120, temperature=0, structured_outputs=SO(structural_tag=json.dumps(tag))))
    for o in llm.generate([PROMPT] * len(params), params, use_tqdm=False):
        c = o.outputs[0]
        assert c.finish_reason == "stop" and c.text.startswith("ANSWER ") and c.text[-3:] in (" ok", " no"), c.text
        assert len(json.loads(c.text[len("ANSWER "):-3])["n"]) <= 4


def test_length_when_grammar_cannot_finish_and_stop_when_it_does(llm):
    # Ten digits cannot fit in 4 tokens of a vocabulary whose digits are single tokens.
    long = SamplingParams(max_tokens=4, temperature=0, structured_outputs=SO(regex=r"[0-9]{10}"))
    out = llm.generate([PROMPT], long, use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 4 and out.text.isdigit()
    # ignore_eos would run on forever; the grammar's end stops the request (EOS not in the text).
    short = SamplingParams(max_tokens=50, temperature=0, ignore_eos=True, structured_outputs=SO(choice=["ok"]))
    out = llm.generate([PROMPT], short, use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.text == "ok"


def test_constrained_row_leaves_others_unchanged(llm):
    prompts = [{"prompt_token_ids": [3 + i, 40, 41 + 2 * i, 9]} for i in range(4)]
    plain = [SamplingParams(max_tokens=20, temperature=0, ignore_eos=True),
             SamplingParams(max_tokens=20, temperature=1.0, seed=7, ignore_eos=True),
             SamplingParams(max_tokens=20, temperature=0.8, top_k=20, seed=8, logprobs=2, ignore_eos=True)]
    alone = llm.generate(prompts[:3], plain, use_tqdm=False)
    constrained = SamplingParams(max_tokens=20, temperature=0, structured_outputs=SO(regex=r"[a-z]{5,30}"))
    mixed = llm.generate(prompts[:2] + [prompts[3]] + prompts[2:3], plain[:2] + [constrained] + plain[2:], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in alone] == [mixed[i].outputs[0].token_ids for i in (0, 1, 3)]
    assert [x.keys() for x in alone[2].outputs[0].logprobs] == [x.keys() for x in mixed[3].outputs[0].logprobs]
    assert re.fullmatch(r"[a-z]{5,30}", mixed[2].outputs[0].text)


def test_preemption_chunked_prefill_and_prefix_cache(tiny_llama, llm):
    schema = {"type": "object", "properties": {"a": {"type": "array", "items": {"type": "integer", "minimum": 0,
              "maximum": 999}, "minItems": 3, "maxItems": 6}}, "required": ["a"]}
    shared = list(range(3, 60))
    prompts = [{"prompt_token_ids": shared + [100 + i]} for i in range(5)]
    params = SamplingParams(max_tokens=120, temperature=0, structured_outputs=SO(json=schema))
    ref = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    small = LLM(str(tiny_llama[0]), dtype="float32", device="cpu", num_kv_blocks=14, max_model_len=200,
                max_num_batched_tokens=32)  # chunked prefill + preemption, prefix cache on
    outs = small.generate(prompts, params, use_tqdm=False)
    assert small.engine.scheduler.num_preemptions > 0
    assert small.engine.scheduler.kv.prefix_hits > 0
    assert [o.outputs[0].token_ids for o in outs] == ref
    for o in outs:
        jsonschema.validate(json.loads(o.outputs[0].text), schema)
    small.engine.step()  # the runner hears of the last finished requests at the next step
    assert not small.engine.runner.grammars  # matchers dropped with their requests


def test_logprobs_and_stop_strings(llm):
    params = SamplingParams(max_tokens=30, temperature=0, logprobs=3, stop=["c"],
                            structured_outputs=SO(regex=r"ab*c[a-z]*"))
    out = llm.generate([PROMPT], params, use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == "c"
    assert re.fullmatch(r"ab*", out.text)
    assert len(out.logprobs) == len(out.token_ids)


def test_grammar_cache(llm):
    mgr = llm.engine.structured
    spec = SO(json={"type": "object", "properties": {"zz": {"type": "integer"}}})
    before = mgr.misses
    llm.generate([PROMPT] * 2, SamplingParams(max_tokens=30, temperature=0, structured_outputs=spec), use_tqdm=False)
    same = SO(json=json.dumps({"properties": {"zz": {"type": "integer"}}, "type": "object"}))
    llm.generate([PROMPT], SamplingParams(max_tokens=30, temperature=0, guided_decoding=same), use_tqdm=False)
    assert mgr.misses == before + 1


@pytest.mark.parametrize("spec, match", [
    (dict(json='{"type": "object",'), "structured_outputs.json is not valid JSON"),
    (dict(json={"type": "foo"}), "invalid structured_outputs.json"),
    (dict(json={"type": "array", "uniqueItems": True}), "'uniqueItems'.*not supported"),
    (dict(regex="[a-"), "invalid structured_outputs.regex"),
    (dict(grammar="root ::= "), "invalid structured_outputs.grammar"),
    (dict(choice=[]), "structured_outputs.choice"),
    (dict(json={"type": "object"}, regex="a"), "exactly one of"),
])
def test_bad_specs_are_value_errors(llm, spec, match):
    with pytest.raises(ValueError, match=match):
        llm.generate([PROMPT], SamplingParams(max_tokens=5, structured_outputs=SO(**spec)), use_tqdm=False)


def test_slow_compile_does_not_stall_other_requests(llm):
    """A request waits for its grammar off the step loop; a timeout ends it, others run."""
    import threading

    engine = llm.engine
    mgr = engine.structured
    gate = threading.Event()
    real = mgr.compiler.compile
    mgr.compiler.compile = lambda spec: (gate.wait(5), real(spec))[1]
    old_timeout, mgr.compile_timeout = mgr.compile_timeout, 0.5
    try:
        spec = SO(regex=r"slow[0-9]")
        engine.add_request("slow", PROMPT, SamplingParams(max_tokens=5, structured_outputs=spec))
        engine.add_request("fast", PROMPT, SamplingParams(max_tokens=5, temperature=0))
        done = {}
        while engine.has_unfinished_requests():
            for o in engine.step():
                if o.finished:
                    done[o.request_id] = o
        assert done["fast"].outputs[0].finish_reason == "length"
        assert done["slow"].outputs[0].finish_reason == "abort"
        assert "could not be compiled within" in done["slow"].outputs[0].stop_reason
        # What LLM.generate and the server do: wait at most the limit, then a ValueError (a 400).
        with pytest.raises(ValueError, match="structured_outputs.regex could not be compiled within"):
            mgr.get(SO(regex=r"slower[0-9]"))
    finally:
        gate.set()
        mgr.compiler.compile = real
        mgr.compile_timeout = old_timeout


@requires_smollm2
@pytest.mark.slow
def test_smollm2_schemas_validate():
    """The built-in SmolLM2 (a real instruct model), greedy, seeded and n > 1, in one run."""
    llm = LLM("smollm2", device="cpu", max_model_len=512, num_kv_blocks=64)
    person = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
              "age": {"type": "integer", "minimum": 0, "maximum": 120},
              "hobbies": {"type": "array", "items": {"enum": ["chess", "music", "hiking", "cooking"]}, "maxItems": 3}},
              "required": ["name", "age", "hobbies"]}
    city = {"$defs": {"loc": {"type": "object", "properties": {"lat": {"type": "number", "minimum": -90, "maximum": 90},
                                                            "lon": {"type": "number", "minimum": -180, "maximum": 180}},
                              "required": ["lat", "lon"]}},
            "type": "object", "properties": {"city": {"type": "string", "maxLength": 24}, "where": {"$ref": "#/$defs/loc"},
                                             "capital": {"type": "boolean"}}, "required": ["city", "where", "capital"]}
    code = {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
                                             "status": {"enum": ["open", "closed"]}}, "required": ["code", "status"]}
    prompts = ["Describe a person as JSON.", "Give the location of Paris as JSON.", "Make up a ticket as JSON."]
    params = [SamplingParams(max_tokens=120, temperature=0, structured_outputs=SO(json=person)),
              SamplingParams(max_tokens=120, temperature=0.8, seed=5, structured_outputs=SO(json=city)),
              SamplingParams(max_tokens=120, temperature=0.7, n=2, seed=9, structured_outputs=SO(json=code))]
    outs = llm.generate(prompts, params, use_tqdm=False)
    for schema, o in zip((person, city, code), outs):
        for c in o.outputs:
            assert c.finish_reason == "stop", c.text
            jsonschema.validate(json.loads(c.text), schema)


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_speculative_decoding_keeps_the_grammar(tiny_llama, llm, method):
    """Verify steps mask every draft position with the grammar after the drafts before it: greedy
    output is token-identical to plain constrained decoding, sampled output still validates, and
    drafts were both accepted and rejected."""
    cfg = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3,
           "backoff": False}
    if method == "draft_model":  # the target as its own (unconstrained) draft: masks reject many drafts
        cfg = {"method": "draft_model", "model": str(tiny_llama[0]), "num_speculative_tokens": 3, "backoff": False}
    spec_llm = LLM(str(tiny_llama[0]), dtype="float32", device="cpu", num_kv_blocks=256, speculative_config=cfg)
    all_schemas = schemas()[:12]
    prompts = [{"prompt_token_ids": [5, 17, 99, 23, 42, 7] * 2 + [i]} for i in range(len(all_schemas))]
    greedy = [SamplingParams(max_tokens=150, temperature=0, structured_outputs=SO(json=s)) for s in all_schemas]
    want = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
    got = spec_llm.generate(prompts, greedy, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == want
    sampled = [SamplingParams(max_tokens=150, temperature=0.9, seed=i, structured_outputs=SO(json=s))
               for i, s in enumerate(all_schemas)]
    sampled_out = spec_llm.generate(prompts, sampled, use_tqdm=False)
    for s, o in zip(all_schemas * 2, got + sampled_out):
        assert o.outputs[0].finish_reason == "stop", o.outputs[0].text
        jsonschema.validate(json.loads(o.outputs[0].text), s)
    st = spec_llm.engine.stats()
    assert st["spec_draft_tokens"] > st["spec_accepted_tokens"] > 0


def test_constrained_rows_run_ahead_with_asynchronous_scheduling(tiny_llama, llm):
    """With asynchronous scheduling constrained requests take ahead steps too (the runner waits
    for the in-flight tokens only before sampling): same tokens and finish reasons as without,
    grammar ends with ignore_eos included."""
    ahead = LLM(str(tiny_llama[0]), dtype="float32", device="cpu", num_kv_blocks=256, async_scheduling=True)
    ss = schemas()[:10]
    prompts = [{"prompt_token_ids": [5, 17, 99, 23, 42, i]} for i in range(len(ss) + 3)]
    params = [SamplingParams(max_tokens=120, temperature=0, structured_outputs=SO(json=s)) for s in ss]
    params += [SamplingParams(max_tokens=60, temperature=0, ignore_eos=True),
               SamplingParams(max_tokens=30, temperature=0.8, seed=3, ignore_eos=True,
                              structured_outputs=SO(regex="[a-z]{3,12}")),
               SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, structured_outputs=SO(choice=["ok"]))]
    only = ahead.generate(prompts[:4], params[:4], use_tqdm=False)  # constrained rows only
    assert ahead.engine.num_ahead_steps > 0
    assert [o.outputs[0].token_ids for o in only] == [o.outputs[0].token_ids
                                                      for o in llm.generate(prompts[:4], params[:4], use_tqdm=False)]
    got = ahead.generate(prompts, params, use_tqdm=False)
    want = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    assert [o.outputs[0].finish_reason for o in got] == [o.outputs[0].finish_reason for o in want]
    for s, o in zip(ss, got):
        jsonschema.validate(json.loads(o.outputs[0].text), s)
    assert re.fullmatch("[a-z]{3,12}", got[-2].outputs[0].text) and got[-1].outputs[0].text == "ok"


@requires_smollm2
@pytest.mark.slow
def test_smollm2_all_schemas_validate():
    """Every schema of tests/structured/schemas.py on the built-in SmolLM2 in one batched run:
    greedy, seeded and n > 1. Every greedy output stops, parses and validates; so does every
    sampled output that stops. A sampled one may instead ramble inside an unbounded part of a
    format until max_tokens (seen once: date-time's fractional seconds at temperature 0.7, seed
    26, with the AVX-512 VNNI build's prefill numerics) — then it must have run to exactly
    max_tokens, and such runs stay rare."""
    llm = LLM("smollm2", device="cpu", max_model_len=512, num_kv_blocks=1024, max_num_seqs=64)
    all_schemas = schemas()
    params = []
    for i, s in enumerate(all_schemas):
        so = SO(json=s)
        if i % 3 == 0:
            params.append(SamplingParams(max_tokens=300, temperature=0, structured_outputs=so))
        elif i % 3 == 1:
            params.append(SamplingParams(max_tokens=300, temperature=0.7, seed=i, structured_outputs=so))
        else:
            params.append(SamplingParams(max_tokens=300, temperature=0.7, n=2, seed=i, structured_outputs=so))
    prompts = [f"Write one JSON value for this schema: {json.dumps(s)}" for s in all_schemas]
    outs = llm.generate(prompts, params, use_tqdm=False)
    cut = 0
    for s, o, p in zip(all_schemas, outs, params):
        for c in o.outputs:
            if c.finish_reason == "length" and p.temperature > 0:
                assert len(c.token_ids) == p.max_tokens, (s, c.text)
                cut += 1
                continue
            assert c.finish_reason == "stop", (s, c.text)
            jsonschema.validate(json.loads(c.text), s)
    assert cut <= max(1, sum(len(o.outputs) for o in outs) // 20), f"{cut} sampled outputs ran to max_tokens"
