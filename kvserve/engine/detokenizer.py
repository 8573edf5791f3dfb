"""Incremental detokenization with stop strings, safe to stream.

Token-by-token decoding is not string concatenation: BPE/sentencepiece decoders drop or add the
leading space of a word depending on what precedes it, and byte-level tokens can each carry a
fraction of one UTF-8 character. The usual fix (vLLM, TGI) keeps two offsets into the token list:

    ids:  ... [prefix_offset ............ read_offset ............ end]
               '-- already emitted text --'-- not yet emitted ---'

and each step decodes ``ids[prefix_offset:read_offset]`` and ``ids[prefix_offset:end]``; the new
text is the second minus the first. The context window makes leading spaces come out as they
would in a full decode. If the new text ends with U+FFFD the last character is still incomplete,
so nothing is emitted and the offsets stay put until more tokens complete it.

Semantics worth knowing:

* The offsets start on the last few prompt tokens, so the first generated token is decoded as a
  continuation of the prompt and nothing of the prompt is ever emitted. For byte-level BPE
  (GPT-2, Llama 3, Qwen, SmolLM) the result equals ``tokenizer.decode(generated_ids)``. For
  decoders that strip the first token's leading space (sentencepiece Metaspace, Llama's Strip,
  WordPiece) it equals the prompt's continuation, i.e. it may start with one space that
  ``decode(generated_ids)`` lacks, as in vLLM.
* With ``skip_special_tokens`` special ids are filtered out before decoding (the same set the
  tokenizer skips), so a run of them never grows the decode window.
* Stop strings are searched in the new text plus the ``len(stop) - 1`` characters before it, so
  a stop string split across tokens is found; the text is cut at the earliest match (ties: the
  shorter match). ``get_delta`` holds back only a suffix that is a prefix of some stop string,
  which guarantees that no streamed chunk is ever taken back.
"""

from __future__ import annotations

import logging
from typing import Protocol, Sequence

logger = logging.getLogger(__name__)

_REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens decoded as context before the first generated token (enough for any decoder's
# leading-space rule; vLLM and TGI use 5).
_PROMPT_CONTEXT_TOKENS = 5
# A UTF-8 character spans at most 4 bytes, hence at most 3 extra byte tokens to back up over
# when the prompt context would otherwise start in the middle of a character.
_MAX_CONTEXT_BACKUP = 3
# Drop decode-window ids that lie this far before prefix_offset (amortised O(1) trimming).
_TRIM_THRESHOLD = 256


class _Decoder(Protocol):
    all_special_ids: set[int]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """Turns a stream of generated token ids into text deltas for one sequence.

    Call ``add_tokens`` with each step's new ids (it returns the stop string that matched, if
    any), ``get_delta`` whenever text should be streamed, and ``finish`` when generation ends
    for another reason (EOS, length, abort) to release held-back text.
    """

    def __init__(
        self,
        tokenizer: _Decoder,
        prompt_token_ids: Sequence[int],
        *,
        skip_special_tokens: bool = True,
        stop: list[str] | None = None,
        include_stop_str_in_output: bool = False,
    ) -> None:
        stop = list(stop or [])
        for i, s in enumerate(stop):
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop[{i}] must be a non-empty string (got {s!r})")
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = stop
        self.include_stop_str_in_output = include_stop_str_in_output
        self.token_ids: list[int] = []
        self.stop_str: str | None = None  # the stop string that ended the text, if any
        self.finished = False

        self._special = set(tokenizer.all_special_ids) if skip_special_tokens else set()
        self._max_stop_len = max((len(s) for s in stop), default=0)
        # Text is kept as parts so that appending is O(new text); output_text joins lazily.
        self._parts: list[str] = []
        self._len = 0
        self._tail = ""  # last (max_stop_len - 1) characters of the text
        self._unsent = ""  # text not yet returned by get_delta

        context: list[int] = []  # the last few prompt ids that decode to text, in order
        for t in reversed(prompt_token_ids):
            if t not in self._special:
                context.append(t)
                if len(context) == _PROMPT_CONTEXT_TOKENS + _MAX_CONTEXT_BACKUP:
                    break
        context.reverse()
        start = max(0, len(context) - _PROMPT_CONTEXT_TOKENS)
        for _ in range(_MAX_CONTEXT_BACKUP):
            if start == 0 or not self._decode(context[start:]).startswith(_REPLACEMENT_CHAR):
                break
            start -= 1
        self._ids: list[int] = context[start:]  # decode window: prompt context + generated ids
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._prefix_text = self._decode(self._ids)

    # -- public API ---------------------------------------------------------------------------
    @property
    def output_text(self) -> str:
        """The text so far (stop string trimmed unless include_stop_str_in_output)."""
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    def add_tokens(self, token_ids: Sequence[int], check_stop: bool = True) -> str | None:
        """Append generated ids; return the stop string they completed, or None.
        `check_stop=False` (before `min_tokens` are reached) appends without looking for stop
        strings; a later check still finds a match that ends in its new text."""
        if self.finished:
            why = f"stop string {self.stop_str!r} matched" if self.stop_str else "finish() called"
            raise RuntimeError(f"add_tokens() on a finished detokenizer ({why})")
        self.token_ids.extend(token_ids)
        self._ids.extend(t for t in token_ids if t not in self._special)
        return self._append_text(self._decode_new(final=False), check_stop)

    def finish(self) -> None:
        """Generation ended: decode anything pending and release held-back text."""
        if self.finished:
            return
        # A trailing incomplete character stays U+FFFD, exactly as a one-shot decode shows it.
        self._append_text(self._decode_new(final=True))
        self.finished = True

    def get_delta(self) -> str:
        """Text that is safe to stream since the previous call ('' if none)."""
        if self.finished or not self._unsent:
            delta, self._unsent = self._unsent, ""
            return delta
        hold = 0 if self.include_stop_str_in_output else self._stop_prefix_len(self._unsent)
        cut = len(self._unsent) - hold
        delta, self._unsent = self._unsent[:cut], self._unsent[cut:]
        return delta

    # -- decoding -----------------------------------------------------------------------------
    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _decode_new(self, *, final: bool) -> str:
        """Text of ids[read_offset:] in the context of ids[prefix_offset:read_offset]."""
        if self._read_offset >= len(self._ids):
            return ""
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) <= len(self._prefix_text) and not final:
            return ""  # nothing visible yet (e.g. a token that decodes to '')
        if new_text.endswith(_REPLACEMENT_CHAR) and not final:
            return ""  # the last character is incomplete: wait for its remaining bytes
        if not new_text.startswith(self._prefix_text):
            logger.debug(
                "decoder rewrote earlier text (%r -> %r); emitting the length difference",
                self._prefix_text,
                new_text,
            )
        delta = new_text[len(self._prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        if self._prefix_offset > _TRIM_THRESHOLD:
            del self._ids[: self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0
        return delta

    # -- text and stop strings ----------------------------------------------------------------
    def _append_text(self, new_text: str, check_stop: bool = True) -> str | None:
        if not new_text:
            return None
        tail = self._tail
        self._parts.append(new_text)
        self._len += len(new_text)
        self._unsent += new_text
        if not self.stop:
            return None
        window = tail + new_text
        self._tail = window[-(self._max_stop_len - 1) :] if self._max_stop_len > 1 else ""
        if not check_stop:
            return None
        match = self._find_stop(window, len(tail))
        if match is None:
            return None
        start, s = match
        end_in_window = start + (len(s) if self.include_stop_str_in_output else 0)
        self._truncate(self._len - len(window) + end_in_window)
        self.stop_str = s
        self.finished = True
        return s

    def _find_stop(self, window: str, old_len: int) -> tuple[int, str] | None:
        """Earliest stop string in window that ends inside its last len(window)-old_len chars."""
        best: tuple[int, int, str] | None = None
        for s in self.stop:
            # A match must include new text; anything wholly older was checked last time.
            i = window.find(s, max(0, old_len - len(s) + 1))
            if i != -1 and (best is None or (i, len(s)) < best[:2]):
                best = (i, len(s), s)
        return None if best is None else (best[0], best[2])

    def _truncate(self, length: int) -> None:
        drop = self._len - length
        if drop <= 0:
            return
        if drop > len(self._unsent):
            # Cannot happen with the stop-prefix hold-back; keep going rather than crash.
            logger.warning("stop string trimmed %d characters that were already streamed", drop)
        self._unsent = self._unsent[: max(0, len(self._unsent) - drop)]
        while drop and self._parts:
            last = self._parts[-1]
            if len(last) <= drop:
                self._parts.pop()
                drop -= len(last)
            else:
                self._parts[-1] = last[: len(last) - drop]
                drop = 0
        self._len = length

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best
