"""Build a `tokenizers.Tokenizer` from the vocabulary a GGUF file embeds.

`tokenizer.ggml.model == "gpt2"` (byte-level BPE: GPT-2, Llama 3, Qwen, SmolLM, ...) is built
here directly from `tokenizer.ggml.tokens` and `tokenizer.ggml.merges`, with the pre-tokenizer
llama.cpp uses for the file's `tokenizer.ggml.pre` (the split regex the merges were learned on).
Sentencepiece vocabularies (`"llama"`) go through transformers' GGUF converter.

Token types (llama.cpp's `tokenizer.ggml.token_type`): 1 normal, 2 unknown, 3 control,
4 user-defined, 5 unused, 6 byte. Control tokens become special added tokens and user-defined
ones plain added tokens: llama.cpp matches both whole in the input text.
"""

from __future__ import annotations

import logging
import re
from itertools import repeat
from typing import TYPE_CHECKING, Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as _HFTokenizer

from kvserve.loader.tokenizer import Tokenizer

if TYPE_CHECKING:
    from kvserve.loader.gguf import GGUFFile

logger = logging.getLogger(__name__)

_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4

# llama.cpp's split regexes by `tokenizer.ggml.pre` (llama-vocab.cpp), in `tokenizers` syntax.
# llama.cpp spells the contractions as explicit [sS] classes rather than (?i:...): Unicode case
# folding would also let (?i:'s) match "'ſ".
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3_SPLIT = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# o200k (gpt-oss; llama.cpp's "gpt-4o"): case-aware word pieces with an optional contraction.
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+" + _CONTRACTIONS + "?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*" + _CONTRACTIONS + "?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_PRE = {"gpt-4o"}
# Llama-3-style vocabularies: llama.cpp takes a pre-token that is itself in the vocab as one
# token without running the merges (HF's tokenizer.json says the same: "ignore_merges": true),
# and adds BOS unless the file says otherwise.
_LLAMA3_PRE = {
    "llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
    "jina-v5-nano",
}
_LLAMA3_REGEX_PRE = _LLAMA3_PRE | {"dbrx", "smaug-bpe"}
_QWEN2_PRE = {"qwen2", "deepseek-r1-qwen", "stablelm2"}
# StarCoder-family vocabularies split every numeric character off first (llama.cpp: "\p{N}";
# their HF tokenizer.json: Digits(individual_digits=True)), then apply GPT-2's regex.
_DIGITS_PRE = {"starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva"}
# GPT-2's regex. ("default" is approximated by it: llama.cpp's own default adds punctuation and
# digit-run splits, but only old conversions without a `pre` name use it.)
_GPT2_PRE = {"default", "gpt-2", "gpt2", "phi-2", "olmo", "jais", "mpt", "trillion"}


# Chat templates for files that carry none (llama.cpp's conversion of a base model, e.g. the
# gemma-3-270m GGUF): the family's own template, as its instruction-tuned HF release ships it.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}"
    "{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}"
    "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}"
    "{{ message['content'] | trim }}"
    "{%- elif message['content'] is iterable -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- else -%}"
    "{{ raise_exception('Invalid content type') }}"
    "{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)
_DEFAULT_TEMPLATES = {"gemma3": GEMMA3_CHAT_TEMPLATE}


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table: printable Latin-1 bytes stand for
    themselves, the other 68 are shifted to U+0100 onwards (space -> 'Ġ', newline -> 'Ċ')."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]  # '!'..'~', '¡'..'¬', '®'..'ÿ'
    table = {b: chr(b) for b in keep}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


# A character outside GPT-2's byte alphabet (the 188 printable Latin-1 characters and U+0100..U+0143).
_OUTSIDE_ALPHABET = re.compile("[^!-~\u00a1-\u00ac\u00ae-\u00ff\u0100-\u0143]")


def _pre_tokenizer(pre: str | None) -> pre_tokenizers.PreTokenizer:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # GPT-2 regex
    if pre in _DIGITS_PRE:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    split = (_LLAMA3_SPLIT if pre in _LLAMA3_REGEX_PRE else _QWEN2_SPLIT if pre in _QWEN2_PRE
             else _GPT4O_SPLIT if pre in _GPT4O_PRE else None)
    if split is not None:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    if pre not in _GPT2_PRE and pre is not None:
        logger.warning("unknown tokenizer.ggml.pre %r: using GPT-2's pre-tokenizer", pre)
    return byte_level


def _byte_level_bpe(gf: GGUFFile, tokens: list[str], types: list[int]) -> _HFTokenizer:
    # Whole-vocabulary passes (str.join, one regex search, dict(zip)) rather than a Python loop
    # per token: this runs on every model load, over ~50k-150k tokens and merges.
    if _OUTSIDE_ALPHABET.search("".join(tokens)):
        # Normal tokens are stored in the byte alphabet; a few converters wrote raw text instead.
        spell = _byte_alphabet()
        tokens = [
            "".join(spell[b] for b in tok.encode("utf-8"))
            if ttype not in (_CONTROL, _USER_DEFINED) and _OUTSIDE_ALPHABET.search(tok) else tok
            for tok, ttype in zip(tokens, types)
        ]
    # Reversed, so that a duplicated token keeps its first id.
    vocab = dict(zip(reversed(tokens), range(len(tokens) - 1, -1, -1)))
    if len(vocab) != len(tokens):
        for i, tok in enumerate(tokens):
            if vocab[tok] != i:
                logger.debug("%s: duplicate token %r at id %d (keeping id %d)", gf.path, tok, i, vocab[tok])
    merges = _merge_pairs(gf, gf.get("tokenizer.ggml.merges") or [])
    pre = gf.get("tokenizer.ggml.pre")
    try:
        bpe = models.BPE(
            vocab, merges, fuse_unk=False, byte_fallback=False,
            ignore_merges=pre in _LLAMA3_PRE or pre in _GPT4O_PRE
        )
    except Exception as e:  # tokenizers raises on merges that reference unknown tokens
        raise ValueError(f"{gf.path}: inconsistent BPE vocab/merges: {e}") from e
    backend = _HFTokenizer(bpe)
    backend.pre_tokenizer = _pre_tokenizer(pre)
    backend.decoder = decoders.ByteLevel()
    return backend


def _merge_pairs(gf: GGUFFile, merges: list[str]) -> list[tuple[str, str]]:
    """'a b' strings -> ('a', 'b') pairs; each merge must hold exactly one space."""
    if set(map(str.count, merges, repeat(" "))) == {1}:
        parts = " ".join(merges).split(" ")
        return list(zip(parts[0::2], parts[1::2]))
    for m in merges:
        if m.count(" ") != 1:
            raise ValueError(f"{gf.path}: malformed merge {m!r} in tokenizer.ggml.merges")
    return []


def _sentencepiece_via_transformers(gf: GGUFFile, tokens: list[str], types: list[int]) -> _HFTokenizer:
    try:
        from transformers.integrations.gguf import convert_gguf_tokenizer
    except ImportError:  # transformers 4.x kept it in integrations/ggml.py
        from transformers.integrations.ggml import convert_gguf_tokenizer
    spec: dict[str, Any] = {"tokenizer_type": "llama", "tokens": tokens, "token_type": types}
    for key, name in (
        ("pre", "pre_tokenizer_type"), ("scores", "scores"), ("merges", "merges"),
        ("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
        ("unknown_token_id", "unk_token_id"), ("padding_token_id", "pad_token_id"),
        ("add_space_prefix", "add_prefix_space"),
    ):
        value = gf.get(f"tokenizer.ggml.{key}")
        if value is not None:
            spec[name] = value
    backend, _ = convert_gguf_tokenizer(gf.architecture, spec)
    backend.post_processor = None  # BOS comes from Tokenizer.add_bos_token, as the file says
    return backend


def _build_backend(gf: GGUFFile, kind: str) -> _HFTokenizer:
    tokens = gf.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ValueError(f"{gf.path} has no embedded tokenizer (tokenizer.ggml.model/tokens)")
    types = gf.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise ValueError(f"{gf.path}: {len(types)} token types for {len(tokens)} tokens")
    if kind == "gpt2":
        backend = _byte_level_bpe(gf, tokens, types)
    else:
        backend = _sentencepiece_via_transformers(gf, tokens, types)
    control = [t for t, ty in zip(tokens, types) if ty == _CONTROL]
    user = [t for t, ty in zip(tokens, types) if ty == _USER_DEFINED]
    if control:
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    if user:
        backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    if backend.get_vocab_size(with_added_tokens=True) != len(tokens):
        logger.warning(
            "%s: tokenizer has %d entries for %d GGUF tokens", gf.path,
            backend.get_vocab_size(with_added_tokens=True), len(tokens),
        )
    return backend


# -- cache ------------------------------------------------------------------------------------
# Building the tokenizer turns every vocabulary entry and merge into Python strings (~0.7 s for
# a 49k vocabulary on a 2-core machine, a third of the built-in model's load). The result is
# saved as tokenizer.json under $KVSERVE_CACHE_DIR/tokenizers, keyed by the file's path, size and
# modification time, and read back by the Rust `tokenizers` parser (~0.1 s) on later loads.
# Vocabularies under 4096 tokens are not cached; KVSERVE_TOKENIZER_CACHE=0 turns this off.
_CACHE_VERSION = 1
_CACHE_MIN_TOKENS = 4096


def _cache_path(gf: GGUFFile):
    import hashlib
    import os

    import tokenizers

    from kvserve.kernels.cbuild import cache_dir

    if os.environ.get("KVSERVE_TOKENIZER_CACHE", "1") == "0":
        return None
    if (gf.array_len("tokenizer.ggml.tokens") or 0) < _CACHE_MIN_TOKENS:
        return None  # built in milliseconds: not worth a file
    try:
        st = gf.path.stat()
    except OSError:
        return None
    key = f"{gf.path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{_CACHE_VERSION}|{tokenizers.__version__}"
    return cache_dir() / "tokenizers" / (hashlib.sha256(key.encode()).hexdigest()[:24] + ".json")


def _read_cached(path) -> _HFTokenizer | None:
    if path is None or not path.is_file():
        return None
    try:
        return _HFTokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - a damaged cache entry is rebuilt, never fatal
        logger.debug("ignoring the cached tokenizer %s: %s", path, e)
        return None


def _write_cached(path, backend: _HFTokenizer) -> None:
    import os
    import tempfile

    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".json", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(backend.to_str())
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old state or the whole file
    except OSError as e:
        logger.debug("could not cache the tokenizer at %s: %s", path, e)


def build_gguf_tokenizer(gf: GGUFFile) -> Tokenizer:
    kind = gf.get("tokenizer.ggml.model")
    pre = gf.get("tokenizer.ggml.pre")
    if kind not in ("gpt2", "llama"):
        if kind is None:
            raise ValueError(f"{gf.path} has no embedded tokenizer (tokenizer.ggml.model/tokens)")
        raise ValueError(
            f"{gf.path}: unsupported tokenizer.ggml.model {kind!r}; supported: 'gpt2', 'llama'"
        )
    # llama.cpp adds BOS to sentencepiece vocabularies unless told not to
    default_bos = pre in _LLAMA3_PRE if kind == "gpt2" else True
    path = _cache_path(gf)
    backend = _read_cached(path)
    if backend is None:
        backend = _build_backend(gf, kind)
        _write_cached(path, backend)

    def special(key: str) -> str | None:
        token_id = gf.get(f"tokenizer.ggml.{key}")
        return None if token_id is None else backend.id_to_token(int(token_id))

    extra_eos = [gf.get(f"tokenizer.ggml.{k}") for k in ("eot_token_id", "eom_token_id")]
    extra_eos += list(gf.get("tokenizer.ggml.eos_token_ids") or [])
    add_bos = gf.get("tokenizer.ggml.add_bos_token")
    return Tokenizer(
        backend,
        bos_token=special("bos_token_id"),
        eos_token=special("eos_token_id"),
        pad_token=special("padding_token_id"),
        chat_template=gf.get("tokenizer.chat_template") or _DEFAULT_TEMPLATES.get(gf.architecture),
        add_bos_token=default_bos if add_bos is None else bool(add_bos),
        extra_eos_token_ids=[int(e) for e in extra_eos if e is not None],
    )
