"""Lark grammars -> xgrammar's EBNF (GBNF), so `structured_outputs.grammar` takes either syntax.

A grammar holding a `name ::= ...` rule is EBNF and goes to xgrammar as it is; any other is read
as Lark by the `lark` package's own grammar loader (`%import` of its bundled grammars such as
`common.NUMBER`, `%override`, `%extend` and `%ignore` included), then written out rule by rule:

- rules and terminals become EBNF rules of the same name (`start` is the start symbol: EBNF's
  `root ::= start`); alternatives, groups, `?` `*` `+`, `[optional]`, `x ~ n` / `x ~ n..m`,
  `"a".."z"` ranges and aliases (`-> name`, dropped: they only name tree nodes) carry over;
  rule prefixes `?` `!` `_` and priorities (`.2`) change the parse tree or its disambiguation,
  not the language, so they are dropped too;
- string literals become EBNF strings (`"abc"i`: each letter as `[aA]`);
- regex terminals (`/[a-z]+/`) go through xgrammar's regex-to-EBNF converter; as in Python's
  `re`, `.` does not match a newline unless the `s` flag is set; other flags (`i`, `m`, `x`,
  `l`) and regex features the converter lacks (look-arounds, back-references) are refused;
- `%ignore`d terminals (typically whitespace) may appear before every token of a rule and at
  the end, as Lark's lexer allows them there: at most one per gap (up to three when several
  terminals are ignored), so a model cannot stall in blanks.

Refused with a ValueError that says why: templates, `%declare`d terminals (they come from a
post-lexer, e.g. Python's indentation), and anything Lark itself rejects.

The output is a string of the grammar's terminals. Lark's lexer may split two adjacent
terminals differently (a keyword run into a name, `SELECTx`), so a grammar whose terminals can
merge should write the separator it needs (a literal space, or a required whitespace terminal).
"""

from __future__ import annotations

import json
import re
from typing import Any

_EBNF_RULE = re.compile(r"^\s*[A-Za-z_][A-Za-z0-9_.\-]*\s*::=", re.MULTILINE)
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_IGNORE = "lark_ignore"


def is_ebnf(grammar: str) -> bool:
    """True for xgrammar's EBNF (it has `name ::=` rules); False for a Lark grammar."""
    return _EBNF_RULE.search(grammar) is not None


def lark_to_ebnf(grammar: str) -> str:
    """The EBNF of a Lark grammar; ValueError for what Lark rejects or what cannot be converted."""
    try:
        from lark.exceptions import LarkError
        from lark.load_grammar import GrammarBuilder
    except ImportError:  # pragma: no cover - lark is a dependency
        raise ValueError("Lark grammars need the `lark` package (pip install lark)") from None
    builder = GrammarBuilder()
    try:
        builder.load_grammar(grammar, "<grammar>")
        lark = builder.build()
    except LarkError as e:
        raise ValueError(f"neither EBNF (no `name ::= ...` rule) nor a valid Lark grammar: "
                         f"{_first_line(e)}") from None
    except (ValueError, AssertionError, IndexError) as e:
        raise ValueError(f"not a valid Lark grammar: {_first_line(e) or type(e).__name__}") from None
    return _Converter(lark).ebnf()


def _first_line(e: BaseException) -> str:
    return next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")


class _Converter:
    def __init__(self, lark: Any) -> None:
        self.lark = lark
        self.rules: list[str] = []
        self.names: dict[str, str] = {}
        self.n_regex = 0
        defined = [r[0] for r in lark.rule_defs] + [t[0] for t in lark.term_defs]
        taken = {"root", _IGNORE}
        for name in defined:
            safe = re.sub(r"[^A-Za-z0-9_]", "_", name)
            while safe in taken or safe.startswith("lark_re_"):
                safe += "_"
            taken.add(safe)
            self.names[name] = safe
        self.ignore = list(lark.ignore)

    def ebnf(self) -> str:
        lark = self.lark
        if "start" not in {r[0] for r in lark.rule_defs}:
            raise ValueError("a Lark grammar needs a 'start' rule (the start symbol)")
        for name, params, tree, _options in lark.rule_defs:
            if params:
                raise ValueError(f"Lark templates are not supported (rule {name!r})")
            self.rules.append(f"{self.names[name]} ::= {self._node(tree, in_rule=True)}")
        for name, (tree, _priority) in lark.term_defs:
            if tree is None:
                raise ValueError(f"terminal {name!r} is %declare'd without a definition (a post-lexer's "
                                 "terminal, e.g. indentation), which a grammar alone cannot produce")
            self.rules.append(f"{self.names[name]} ::= {self._node(tree, in_rule=False)}")
        root = self.names["start"]
        if self.ignore:
            alts = " | ".join(self.names[t] for t in self.ignore)
            count = "?" if len(self.ignore) == 1 else "{0,3}"
            self.rules.append(f"{_IGNORE} ::= ({alts}){count}")
            root = f"{root} {_IGNORE}"
        return "\n".join([f"root ::= {root}", *self.rules]) + "\n"

    # -- trees ---------------------------------------------------------------------------------
    def _node(self, node: Any, in_rule: bool) -> str:
        from lark import Token, Tree
        from lark.grammar import NonTerminal, Terminal

        if isinstance(node, NonTerminal):
            return self.names[node.name]
        if isinstance(node, Terminal):
            return self._token(self.names[node.name], in_rule)
        if isinstance(node, Token):
            if node.type in ("STRING", "REGEXP"):
                return self._token(self._literal(node), in_rule)
            raise ValueError(f"unexpected Lark token {node!r}")
        if not isinstance(node, Tree):
            raise ValueError(f"unexpected Lark grammar node {node!r}")
        kind, kids = node.data, node.children
        if kind == "expansions":
            alts = [self._node(k, in_rule) for k in kids]
            return alts[0] if len(alts) == 1 else "(" + " | ".join(alts) + ")"
        if kind == "expansion":
            items = [self._node(k, in_rule) for k in kids]
            return "(" + " ".join(items) + ")" if items else '""'
        if kind == "alias":  # `-> name`: names the tree node only
            return self._node(kids[0], in_rule)
        if kind == "value" or kind == "literal":
            if len(kids) != 1:
                raise ValueError(f"unexpected Lark {kind} node {node!r}")
            return self._node(kids[0], in_rule)
        if kind == "maybe":  # [x]
            return f"({self._node(kids[0], in_rule)})?"
        if kind == "range":  # "a".."z"
            lo, hi = (self._range_end(k) for k in kids)
            if len(lo) != 1 or len(hi) != 1 or lo > hi:
                raise ValueError(f"a Lark range needs two single characters in order (got {node!r})")
            return self._token(f"[{_class_char(lo)}-{_class_char(hi)}]", in_rule)
        if kind == "expr":
            item = self._node(kids[0], in_rule)
            op = str(kids[1])
            if op in ("?", "*", "+"):
                return f"({item}){op}"
            if op == "~":
                lo = int(kids[2])
                hi = int(kids[3]) if len(kids) > 3 else lo
                if hi < lo:
                    raise ValueError(f"a Lark repetition ~ {lo}..{hi} has its bounds reversed")
                return f"({item}){{{lo},{hi}}}"
            raise ValueError(f"unsupported Lark operator {op!r}")
        if kind == "template_usage":
            raise ValueError("Lark templates are not supported")
        raise ValueError(f"unsupported Lark construct {kind!r}")

    def _token(self, ebnf: str, in_rule: bool) -> str:
        """A token of a rule may follow ignored terminals (none inside a terminal)."""
        if in_rule and self.ignore:
            return f"({_IGNORE} {ebnf})"
        return ebnf

    @staticmethod
    def _range_end(tok: Any) -> str:
        from lark.load_grammar import _literal_to_pattern

        return _literal_to_pattern(tok).value

    def _literal(self, tok: Any) -> str:
        from lark.lexer import PatternRE
        from lark.load_grammar import _literal_to_pattern

        pattern = _literal_to_pattern(tok)
        flags = set(pattern.flags)
        if not isinstance(pattern, PatternRE):
            if flags - {"i"}:
                raise ValueError(f"string flags {''.join(sorted(flags - {'i'}))!r} are not supported ({tok})")
            if "i" in flags:  # case-insensitive: each cased letter either way
                parts = [f"[{_class_char(c.lower())}{_class_char(c.upper())}]" if c.lower() != c.upper()
                         else _string(c) for c in pattern.value]
                return "(" + " ".join(parts) + ")"
            return _string(pattern.value)
        unsupported = flags - {"s", "u"}
        if unsupported:
            raise ValueError(f"regex flags {''.join(sorted(unsupported))!r} are not supported ({tok})")
        return self._regex(pattern.value, dotall="s" in flags, where=str(tok))

    def _regex(self, regex: str, dotall: bool, where: str) -> str:
        import xgrammar as xgr

        if not dotall:
            regex = _dot_without_newline(regex)
        try:
            ebnf = str(xgr.Grammar.from_regex(regex))
        except (RuntimeError, ValueError) as e:
            from kvserve.structured.grammar import _clean

            raise ValueError(f"regex terminal {where} cannot be converted: {_clean(e)}") from None
        self.n_regex += 1
        prefix = f"lark_re_{self.n_regex}"
        lines = [ln for ln in ebnf.splitlines() if ln.strip()]
        defined = {ln.split("::=", 1)[0].strip() for ln in lines}
        for ln in lines:
            lhs, rhs = ln.split("::=", 1)
            self.rules.append(f"{_rename(lhs.strip(), defined, prefix)} ::= {_rename_refs(rhs, defined, prefix)}")
        return prefix


def _rename(name: str, defined: set[str], prefix: str) -> str:
    return prefix + name[len("root"):] if name in defined and name.startswith("root") else name


def _rename_refs(rhs: str, defined: set[str], prefix: str) -> str:
    """Rename rule references in an EBNF right-hand side, skipping strings and classes."""
    out, i, n = [], 0, len(rhs)
    while i < n:
        ch = rhs[i]
        if ch in "\"[":
            close = '"' if ch == '"' else "]"
            j = i + 1
            while j < n and rhs[j] != close:
                j += 2 if rhs[j] == "\\" else 1
            out.append(rhs[i:j + 1])
            i = j + 1
            continue
        m = _IDENT.match(rhs, i)
        if m:
            out.append(_rename(m.group(0), defined, prefix))
            i = m.end()
            continue
        out.append(ch)
        i += 1
    return "".join(out)


def _dot_without_newline(regex: str) -> str:
    """Python's `.` (no DOTALL) is any character but a newline; xgrammar's is any character."""
    out, i, in_class = [], 0, False
    while i < len(regex):
        ch = regex[i]
        if ch == "\\":
            out.append(regex[i:i + 2])
            i += 2
            continue
        if in_class:
            in_class = ch != "]"
        elif ch == "[":
            in_class = True
            if regex[i + 1:i + 2] == "]":  # a ']' first in a class is literal
                out.append("[]")
                i += 2
                continue
        elif ch == ".":
            ch = r"[^\n]"
        out.append(ch)
        i += 1
    return "".join(out)


def _string(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)  # JSON string escapes are EBNF's


def _class_char(c: str) -> str:
    if c.isalnum() and c.isascii():
        return c
    cp = ord(c)
    return f"\\u{cp:04x}" if cp <= 0xFFFF else f"\\U{cp:08x}"
