"""Engine logprobs -> the two OpenAI formats: the legacy completions one (tokens,
token_logprobs, top_logprobs, text_offset) and the chat one (content[{token, logprob, bytes,
top_logprobs}])."""

from __future__ import annotations

import functools
import json
import math
from typing import Any

from kvserve.engine.outputs import Logprob
from kvserve.entrypoints.server.protocol import (
    ChatCompletionLogProb,
    ChatCompletionLogProbs,
    ChatCompletionLogProbsContent,
    CompletionLogProbs,
)

_FLOOR = -9999.0  # JSON has no -inf; a token with probability 0 reports this


def _clamp(lp: float) -> float:
    return lp if math.isfinite(lp) else _FLOOR


def _token_text(tokenizer: Any, token_id: int, entry: dict[int, Logprob] | None) -> str:
    if entry is not None and token_id in entry and entry[token_id].decoded_token is not None:
        return entry[token_id].decoded_token  # type: ignore[return-value]
    if tokenizer is None:
        return f"token_id:{token_id}"
    return tokenizer.decode([token_id], skip_special_tokens=False)


def completion_logprobs(
    entries: list[dict[int, Logprob] | None],
    token_ids: list[int],
    tokenizer: Any,
    initial_offset: int = 0,
) -> CompletionLogProbs:
    """One position per token; an entry of None (the first prompt token) gives null logprobs."""
    out = CompletionLogProbs()
    offset = initial_offset
    for tid, entry in zip(token_ids, entries):
        text = _token_text(tokenizer, tid, entry)
        out.tokens.append(text)
        out.text_offset.append(offset)
        offset += len(text)
        if entry is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        chosen = entry.get(tid)
        out.token_logprobs.append(_clamp(chosen.logprob) if chosen is not None else None)
        top: dict[str, float] = {}
        for t, lp in entry.items():
            key = lp.decoded_token if lp.decoded_token is not None else _token_text(tokenizer, t, None)
            top.setdefault(key, _clamp(lp.logprob))
        out.top_logprobs.append(top)
    return out


def chat_logprobs(
    entries: list[dict[int, Logprob]], token_ids: list[int], top_n: int, tokenizer: Any
) -> ChatCompletionLogProbs:
    content = []
    for tid, entry in zip(token_ids, entries):
        chosen = entry.get(tid)
        text = _token_text(tokenizer, tid, entry)
        ranked = sorted(
            ((lp.rank if lp.rank is not None else 1 << 30, t, lp) for t, lp in entry.items()), key=lambda x: x[0]
        )
        top = [
            ChatCompletionLogProb(
                token=_token_text(tokenizer, t, entry), logprob=_clamp(lp.logprob),
                bytes=token_bytes(tokenizer, t, _token_text(tokenizer, t, entry)),
            )
            for rank, t, lp in ranked[:top_n] if rank <= top_n
        ]
        content.append(ChatCompletionLogProbsContent(
            token=text, logprob=_clamp(chosen.logprob) if chosen is not None else _FLOOR,
            bytes=token_bytes(tokenizer, tid, text), top_logprobs=top,
        ))
    return ChatCompletionLogProbs(content=content)


# -- raw bytes of a token -------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: each byte is shown as one printable character."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


@functools.lru_cache(maxsize=8)
def _is_byte_level(tokenizer: Any) -> bool:
    try:
        decoder = json.loads(tokenizer.backend.to_str()).get("decoder") or {}
    except Exception:  # an unusual tokenizer: fall back to the decoded text
        return False
    kinds = {decoder.get("type")} | {d.get("type") for d in decoder.get("decoders") or []}
    return "ByteLevel" in kinds


def token_bytes(tokenizer: Any, token_id: int, text: str) -> list[int]:
    """The token's own bytes (a token may hold part of a UTF-8 character, which its decoded
    text shows as U+FFFD); the UTF-8 of its text when the tokenizer is not byte-level."""
    if tokenizer is not None and _is_byte_level(tokenizer) and token_id not in tokenizer.all_special_ids:
        piece = tokenizer.id_to_token(token_id)
        table = _byte_decoder()
        if piece is not None and all(ch in table for ch in piece):
            return [table[ch] for ch in piece]
    return list(text.encode("utf-8"))
