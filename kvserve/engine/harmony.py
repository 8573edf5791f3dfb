"""gpt-oss's output format (OpenAI's "harmony"): the reply split into its channels.

gpt-oss's chat template ends the prompt with `<|start|>assistant`; the model then writes one or
more messages, each a header and a body:

    <|channel|>analysis<|message|>We need to add...<|end|>
    <|start|>assistant<|channel|>final<|message|>2 + 2 = 4.<|return|>

`analysis` is the chain of thought (not meant for the user), `final` the answer, `commentary`
preambles and tool calls (`<|channel|>commentary to=functions.f <|constrain|>json<|message|>`).
`<|return|>` and `<|call|>` end the turn; `<|end|>` ends a message only, so it must not be a stop
token. Decoded with special tokens skipped, all of this would read
"analysisWe need to add...assistantfinal2 + 2 = 4."; `HarmonyParser` reads the token ids
instead and hands out the analysis as reasoning and everything else as content, whole
(`parse`) or as deltas while the reply streams (`feed`).

With `tools=True` (a chat request with tools and tool_choice "auto", or "required" / a named
function, whose grammar forces such a message: `structured/harmony_tools.py`), a message
addressed to a function (`to=functions.NAME` in its header, before or after `<|channel|>`) is a tool call
instead of content: `calls` holds (name, arguments text as written so far) per call, the name
as soon as the header is complete, the arguments growing with the body. Messages to other
recipients (gpt-oss's built-in `browser.*` / `python` tools) stay content.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

# The special tokens of the format (o200k_harmony); a tokenizer that lacks the first three is not
# a harmony tokenizer.
_START, _CHANNEL, _MESSAGE = "<|start|>", "<|channel|>", "<|message|>"
_END, _RETURN, _CALL = "<|end|>", "<|return|>", "<|call|>"
_REASONING_CHANNELS = frozenset({"analysis"})
_RECIPIENT = re.compile(r"\bto=(\S+)")
_FUNCTIONS = "functions."


def harmony_token_ids(tokenizer: Any) -> dict[str, int] | None:
    """The ids of the format's special tokens, or None if `tokenizer` is not gpt-oss's."""
    ids: dict[str, int] = {}
    for tok in (_START, _CHANNEL, _MESSAGE, _END, _RETURN, _CALL):
        i = tokenizer.backend.token_to_id(tok)
        if i is not None:
            ids[tok] = i
    return ids if all(t in ids for t in (_START, _CHANNEL, _MESSAGE)) else None


def is_harmony_model(tokenizer: Any, architecture: str | None) -> bool:
    """gpt-oss (by architecture, or any model whose chat template writes harmony headers) with
    a tokenizer that has the format's tokens."""
    if tokenizer is None or harmony_token_ids(tokenizer) is None:
        return False
    template = tokenizer.chat_template or ""
    return architecture == "GptOssForCausalLM" or (_CHANNEL in template and _MESSAGE in template)


@dataclass
class _Message:
    channel: str | None  # None until the header's <|message|> (or when the header names none)
    header: list[int] = field(default_factory=list)
    body: list[int] = field(default_factory=list)
    sent: str = ""  # body text handed out so far
    call: int | None = None  # index into HarmonyParser.calls when the message is a tool call


class HarmonyParser:
    """Splits one reply's token ids into reasoning (the analysis channel) and content (final,
    commentary, or text outside any header). Feed it the reply's ids so far, each call with the
    whole list (as `CompletionOutput.token_ids` grows); `feed` returns the new text of each kind."""

    def __init__(self, tokenizer: Any, tools: bool = False) -> None:
        ids = harmony_token_ids(tokenizer)
        if ids is None:
            raise ValueError("the tokenizer has no harmony tokens (<|start|>, <|channel|>, <|message|>)")
        self._tok = tokenizer
        self._start, self._channel, self._message = ids[_START], ids[_CHANNEL], ids[_MESSAGE]
        self._closers = {ids[t] for t in (_END, _RETURN, _CALL) if t in ids}
        self._seen = 0
        # The prompt ends with `<|start|>assistant`: the reply opens inside a header.
        self._msg = _Message(channel=None)
        self._in_header = True
        self._any_body = False
        self.tools = tools
        # Header tokens that separate words even when no space is written around them.
        constrain = tokenizer.backend.token_to_id("<|constrain|>")
        self._separators = {self._channel} | ({constrain} if constrain is not None else set())
        self.reasoning = ""
        self.content = ""
        self.calls: list[tuple[str, str]] = []  # (function name, arguments text so far)

    def feed(self, token_ids: list[int], finished: bool = False) -> tuple[str, str]:
        """(new reasoning text, new content text) since the last call."""
        reasoning, content = [], []
        for t in token_ids[self._seen:]:
            if t == self._start:
                self._flush(reasoning, content, final=True)
                self._msg, self._in_header = _Message(channel=None), True
            elif t == self._channel and self._in_header:
                self._msg.header.append(t)
            elif t == self._message and self._in_header:
                self._msg.channel = self._channel_name(self._msg.header)
                self._in_header, self._any_body = False, True
                name = self._function_name(self._msg.header) if self.tools else None
                if name is not None:
                    self._msg.call = len(self.calls)
                    self.calls.append((name, ""))
            elif t in self._closers and self._in_header and not self._any_body:
                continue  # no header was ever closed: the text so far is the answer (see below)
            elif t in self._closers:
                self._flush(reasoning, content, final=True)
                self._msg, self._in_header = _Message(channel=None), False
            elif self._in_header:
                self._msg.header.append(t)
            else:
                self._msg.body.append(t)
        self._seen = len(token_ids)
        self._flush(reasoning, content, final=finished)
        if finished and not self._any_body and self._msg.header:
            # No header was ever closed: the model ignored the format; its text is the answer.
            text = self._tok.decode(self._msg.header)
            content.append(text)
            self._msg.header = []
        r, c = "".join(reasoning), "".join(content)
        self.reasoning += r
        self.content += c
        return r, c

    def parse(self, token_ids: list[int]) -> tuple[str, str]:
        """(reasoning, content) of a finished reply."""
        self.feed(token_ids, finished=True)
        return self.reasoning, self.content

    def _channel_name(self, header: list[int]) -> str | None:
        """The word after <|channel|> in a header ("final", "analysis", "commentary")."""
        if self._channel not in header:
            return None
        words = self._tok.decode(header[header.index(self._channel) + 1:]).split()
        return words[0] if words else None

    def _function_name(self, header: list[int]) -> str | None:
        """NAME of a header addressed `to=functions.NAME` (anywhere in it), else None."""
        words, run = [], []
        for t in [*header, self._channel]:
            if t in self._separators:
                words.append(self._tok.decode(run))
                run = []
            else:
                run.append(t)
        m = _RECIPIENT.search(" ".join(words))
        if m is None or not m.group(1).startswith(_FUNCTIONS) or len(m.group(1)) == len(_FUNCTIONS):
            return None
        return m.group(1)[len(_FUNCTIONS):]

    def _flush(self, reasoning: list[str], content: list[str], final: bool) -> None:
        """Hand out the current body's new text; a trailing partial UTF-8 character waits for
        its next token unless the message is over."""
        msg = self._msg
        if not msg.body:
            return
        text = self._tok.decode(msg.body)
        if not final:
            text = text.rstrip("\ufffd")
        if len(text) <= len(msg.sent) or not text.startswith(msg.sent):
            return
        new, msg.sent = text[len(msg.sent):], text
        if msg.call is not None:
            name, args = self.calls[msg.call]
            self.calls[msg.call] = (name, args + new)
            return
        (reasoning if msg.channel in _REASONING_CHANNELS else content).append(new)
