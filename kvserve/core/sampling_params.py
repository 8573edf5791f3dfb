"""Per-request sampling settings (vLLM's names and defaults). Pure Python.

Every field is validated at construction; a bad value raises `ValueError` naming the field and
its allowed range.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

_GREEDY_EPS = 1e-5
_STRUCTURED_KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


@dataclass
class StructuredOutputsParams:
    """Constrain the output to a formal language (vLLM's shape; exactly one field set).

    json: a JSON schema (a dict, or a string holding one): the output is a JSON value that
        validates against it.
    regex: the output matches this regular expression (fully).
    choice: the output is exactly one of these strings.
    grammar: an EBNF grammar (GBNF syntax, rule `root` is the start symbol), or a Lark grammar
        (rule `start`; converted by kvserve.structured.lark_grammar).
    json_object: True: the output is any JSON object.
    structural_tag: an xgrammar structural tag (a dict, or a string holding one as JSON:
        `{"type": "structural_tag", "format": {...}}`, or the format alone): sequences of
        literal text, single tokens by id, JSON-schema content, free text and alternatives.
        kvserve builds one for gpt-oss's forced tool calls (kvserve.structured.harmony_tools).
    disable_any_whitespace: JSON without optional whitespace between tokens (compact output).

    The grammar is compiled once per distinct spec (`key`) and cached by the engine; the output
    ends ("stop") when the grammar is complete, or with "length" if max_tokens comes first.
    """

    json: dict[str, Any] | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: dict[str, Any] | str | None = None
    disable_any_whitespace: bool = False

    def __post_init__(self) -> None:
        set_fields = [k for k in _STRUCTURED_KINDS if getattr(self, k) not in (None, False)]
        if len(set_fields) != 1:
            raise ValueError(
                "structured_outputs must set exactly one of json, regex, choice, grammar, "
                f"json_object, structural_tag (got {set_fields or 'none'})"
            )
        if self.json is not None:
            if isinstance(self.json, str):
                try:
                    parsed = json.loads(self.json)
                except ValueError as e:
                    raise ValueError(f"structured_outputs.json is not valid JSON: {e}") from None
            else:
                parsed = self.json
            if not isinstance(parsed, (dict, bool)):
                raise ValueError(
                    f"structured_outputs.json must be a JSON schema object (got {type(parsed).__name__})"
                )
        if self.regex is not None and (not isinstance(self.regex, str) or not self.regex):
            raise ValueError("structured_outputs.regex must be a non-empty string")
        if self.grammar is not None and (not isinstance(self.grammar, str) or not self.grammar.strip()):
            raise ValueError("structured_outputs.grammar must be a non-empty string")
        if self.choice is not None:
            if isinstance(self.choice, (str, bytes)) or not isinstance(self.choice, (list, tuple)):
                raise ValueError("structured_outputs.choice must be a list of strings")
            if not self.choice or any(not isinstance(c, str) or not c for c in self.choice):
                raise ValueError("structured_outputs.choice must be a non-empty list of non-empty strings")
            self.choice = list(self.choice)
        if self.structural_tag is not None:
            tag = self.structural_tag
            if isinstance(tag, str):
                try:
                    tag = json.loads(tag)
                except ValueError as e:
                    raise ValueError(f"structured_outputs.structural_tag is not valid JSON: {e}") from None
            if not isinstance(tag, dict):
                raise ValueError("structured_outputs.structural_tag must be a JSON object")
        if self.json_object not in (None, True, False):
            raise ValueError(f"structured_outputs.json_object must be a boolean (got {self.json_object!r})")

    @property
    def kind(self) -> str:
        return next(k for k in _STRUCTURED_KINDS if getattr(self, k) not in (None, False))

    @property
    def field_name(self) -> str:
        """The user-facing name of the set field, for error messages."""
        return f"structured_outputs.{self.kind}"

    @property
    def key(self) -> tuple[str, str, bool]:
        """Identifies the compiled grammar: equal keys share one compilation."""
        kind = self.kind
        value = getattr(self, kind)
        if kind in ("json", "structural_tag"):
            value = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        elif kind == "choice":
            value = json.dumps(value)
        elif kind == "json_object":
            value = ""
        return (kind, value, self.disable_any_whitespace)


class GuidedDecodingParams(StructuredOutputsParams):
    """The older name of `StructuredOutputsParams` (vLLM < 0.11): same fields."""


@dataclass
class SamplingParams:
    """How to pick each next token and when to stop.

    n: number of independent completions for the prompt (they share the prompt's KV blocks).
    temperature: 0 means greedy (argmax); higher flattens the distribution. >= 0.
    top_p: keep the smallest set of tokens whose probability reaches top_p (the token that
        crosses the threshold is kept). In (0, 1].
    top_k: keep the k most likely tokens; -1 or 0 disables.
    min_p: drop tokens whose probability is below min_p times the top token's. In [0, 1].
    repetition_penalty: divide positive (multiply negative) logits of tokens seen in the prompt
        or output by this. > 0; 1 disables.
    presence_penalty: subtract this from logits of tokens already generated. In [-2, 2].
    frequency_penalty: subtract this times the count of each generated token. In [-2, 2].
    logit_bias: {token_id: bias} added to logits before sampling; bias in [-100, 100].
    seed: per-request RNG seed: the same seeded request yields the same tokens whatever else
        is in the batch.
    max_tokens: maximum number of generated tokens (>= 1; None = up to the context window).
    min_tokens: EOS and stop_token_ids are suppressed, and stop strings not matched, until this
        many tokens are generated.
    stop: strings that end generation; the match is trimmed from the text unless
        include_stop_str_in_output.
    stop_token_ids: token ids that end generation (in addition to EOS).
    ignore_eos: keep generating past EOS (benchmarks).
    skip_special_tokens: drop special tokens from the returned text.
    include_stop_str_in_output: keep the matched stop string in the text.
    logprobs: number of top alternatives (besides the chosen token) to return per generated
        token; None = no logprobs.
    prompt_logprobs: like logprobs, for every prompt token after the first.
    structured_outputs: constrain the output to a JSON schema, regex, choice list or grammar
        (`StructuredOutputsParams`); `guided_decoding` is its older name (either may be set).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    structured_outputs: StructuredOutputsParams | None = None
    guided_decoding: StructuredOutputsParams | None = None
    # Filled by the engine from the tokenizer/generation config; not user settings.
    all_stop_token_ids: set[int] = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.logit_bias:
            try:
                self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
            except (TypeError, ValueError) as e:
                raise ValueError(f"logit_bias must map token ids to numbers ({e})") from e
        self._validate()
        self._merge_structured()
        if self.top_k == 0:
            self.top_k = -1
        self.all_stop_token_ids = set(self.stop_token_ids)

    def _validate(self) -> None:
        def bad(field_name: str, rule: str) -> ValueError:
            return ValueError(f"{field_name} must be {rule} (got {getattr(self, field_name)!r})")

        if not isinstance(self.n, int) or self.n < 1:
            raise bad("n", "an integer >= 1")
        if not _is_number(self.temperature) or self.temperature < 0:
            raise bad("temperature", ">= 0")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", "in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise bad("top_k", "-1 or 0 (disabled) or a positive integer")
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            raise bad("min_p", "in [0, 1]")
        if not _is_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "> 0")
        if not _is_number(self.presence_penalty) or not -2 <= self.presence_penalty <= 2:
            raise bad("presence_penalty", "in [-2, 2]")
        if not _is_number(self.frequency_penalty) or not -2 <= self.frequency_penalty <= 2:
            raise bad("frequency_penalty", "in [-2, 2]")
        if self.logit_bias:
            for tok, b in self.logit_bias.items():
                if tok < 0 or not -100 <= b <= 100:
                    raise ValueError(
                        "logit_bias must map token ids >= 0 to biases in [-100, 100] "
                        f"(got {tok}: {b})"
                    )
        if self.seed is not None and (
            not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**63
        ):
            raise bad("seed", "None or an integer in [0, 2**63)")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise bad("max_tokens", "an integer >= 1 or None")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise bad("min_tokens", "an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be <= max_tokens (got {self.min_tokens} > {self.max_tokens})"
            )
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be a list of non-empty strings (got {self.stop!r})")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "a list of token ids >= 0")
        for name in ("logprobs", "prompt_logprobs"):
            val = getattr(self, name)
            if val is not None and (not isinstance(val, int) or not 0 <= val <= 20):
                raise bad(name, "None or an integer in [0, 20]")

    def _merge_structured(self) -> None:
        so, gd = self.structured_outputs, self.guided_decoding
        for name, val in (("structured_outputs", so), ("guided_decoding", gd)):
            if val is not None and not isinstance(val, StructuredOutputsParams):
                if isinstance(val, dict):
                    unknown = sorted(set(val) - set(StructuredOutputsParams.__dataclass_fields__))
                    if unknown:
                        raise ValueError(f"{name} has unknown fields {unknown}")
                    val = StructuredOutputsParams(**val)
                    setattr(self, name, val)
                else:
                    raise ValueError(f"{name} must be a StructuredOutputsParams (got {type(val).__name__})")
        if so is not None and gd is not None and self.structured_outputs.key != self.guided_decoding.key:
            raise ValueError("set structured_outputs or guided_decoding, not both")
        if self.structured_outputs is None:
            self.structured_outputs = self.guided_decoding
        self.guided_decoding = None

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def modifies_logits(self) -> bool:
        """Whether the sampler may change this request's logits before it picks a token
        (penalties, logit_bias, the min_tokens ban, a grammar's token mask:
        `Sampler.process_logits`). A new knob that
        does must be added here: tensor-parallel ranks skip the token broadcast of a greedy
        step only when no row's logits are modified."""
        return bool(
            self.repetition_penalty != 1.0
            or self.presence_penalty
            or self.frequency_penalty
            or self.logit_bias
            or self.min_tokens
            or self.structured_outputs is not None
        )

    def clone(self, **changes: Any) -> SamplingParams:
        kwargs = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "all_stop_token_ids"}
        kwargs.update(changes)
        sp = SamplingParams(**kwargs)
        sp.all_stop_token_ids = set(self.all_stop_token_ids) | sp.all_stop_token_ids
        return sp


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x  # rejects NaN
