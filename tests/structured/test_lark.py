"""Lark grammars in structured_outputs.grammar: detected (EBNF `::=` rules go to xgrammar as
they are), converted by kvserve.structured.lark_grammar, and enforced: a tiny random Llama's
seeded samples parse with `lark.Lark` on the same grammar (arithmetic with %ignore'd
whitespace and imported terminals; a small SQL subset; case-insensitive strings, ranges and
bounded repetition); constructs that cannot be converted are ValueErrors that say why."""

from __future__ import annotations

import pytest

from kvserve import LLM, SamplingParams
from kvserve.core.sampling_params import StructuredOutputsParams as SO
from kvserve.structured.lark_grammar import is_ebnf, lark_to_ebnf

lark = pytest.importorskip("lark")

ARITHMETIC = r"""
?start: sum
?sum: product | sum "+" product -> add | sum "-" product -> sub
?product: atom | product "*" atom -> mul | product "/" atom -> div
?atom: NUMBER -> number | "-" atom -> neg | NAME -> var | "(" sum ")"
NUMBER: /[1-9][0-9]{0,2}/ | "0"
NAME: /[a-z]/
%import common.WS_INLINE
%ignore WS_INLINE
"""

SQL = r"""
start: select ";"
select: "SELECT " columns " FROM " table [where] [limit]
columns: "*" | column ("," column)~0..3
column: NAME
table: NAME
where: " WHERE " column OP value
limit: " LIMIT " INT
value: INT | "'" /[a-z]{1,6}/ "'"
OP: "=" | "<" | ">" | "<=" | ">=" | "!="
NAME: /[a-z_]{1,8}/
INT: "0".."9" ~ 1..4
"""

MISC = r"""
start: greeting ":" DIGITS "."
greeting: "hello"i | "bye"i
DIGITS: ("0".."9")+
"""


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(str(tiny_llama[0]), dtype="float32", device="cpu", num_kv_blocks=256)


def test_detection_and_conversion_compile():
    assert is_ebnf('root ::= "a"') and is_ebnf('x ::= "b"\nroot ::= x')
    assert not is_ebnf(ARITHMETIC) and not is_ebnf(SQL)
    ebnf = lark_to_ebnf(ARITHMETIC)
    assert ebnf.startswith("root ::= start lark_ignore\n")
    import xgrammar as xgr

    for g in (ARITHMETIC, SQL, MISC):
        xgr.Grammar.from_ebnf(lark_to_ebnf(g))  # valid EBNF


@pytest.mark.parametrize("grammar", [ARITHMETIC, SQL, MISC], ids=["arithmetic", "sql", "misc"])
def test_outputs_parse_with_the_lark_grammar(llm, grammar):
    parser = lark.Lark(grammar)
    params = [SamplingParams(max_tokens=60, temperature=1.0, seed=s, structured_outputs=SO(grammar=grammar))
              for s in range(8)]
    params.append(SamplingParams(max_tokens=60, temperature=0, structured_outputs=SO(grammar=grammar)))
    outs = llm.generate([{"prompt_token_ids": [5, 17, 99, 23, 42 + i]} for i in range(len(params))], params,
                        use_tqdm=False)
    stopped = 0
    for o in outs:
        c = o.outputs[0]
        if c.finish_reason == "stop":
            parser.parse(c.text)  # raises if the output is not in the grammar's language
            stopped += 1
    assert stopped >= len(outs) // 2, [o.outputs[0].text for o in outs]


def test_ignored_whitespace_is_allowed_between_tokens(llm):
    g = 'start: "a" "b" "c"\n%ignore " "'
    ebnf = lark_to_ebnf(g)
    assert '(lark_ignore "a")' in ebnf and 'lark_ignore ::= ' in ebnf
    regex_of = SamplingParams(max_tokens=20, temperature=0, structured_outputs=SO(grammar=g))
    out = llm.generate([{"prompt_token_ids": [1, 2, 3]}], regex_of, use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.text.replace(" ", "") == "abc"
    lark.Lark(g).parse(out.text)


@pytest.mark.parametrize("grammar, match", [
    ("start: foo", "neither EBNF .* nor a valid Lark grammar.*foo"),
    ("start: A\nA: /a(?=b)/", "regex terminal .* cannot be converted"),
    ('start: A\nA: /ab/i', "regex flags 'i' are not supported"),
    ("start: x{\"a\"}\nx{p}: p p", "templates are not supported"),
    ("start: INDENT\n%declare INDENT", "%declare"),
    ("begin: \"a\"", "needs a 'start' rule"),
    ("hello world", "neither EBNF"),
])
def test_unsupported_or_invalid_lark_is_a_value_error_naming_the_field(llm, grammar, match):
    with pytest.raises(ValueError, match=match) as e:
        llm.engine.structured.get(SO(grammar=grammar))
    assert "structured_outputs.grammar" in str(e.value)


def test_dot_does_not_match_newline_without_the_s_flag():
    from kvserve.structured.lark_grammar import _dot_without_newline

    assert _dot_without_newline(r"a.b[.]\.") == r"a[^\n]b[.]\."
    assert _dot_without_newline(r"[]a.]x.") == r"[]a.]x[^\n]"
