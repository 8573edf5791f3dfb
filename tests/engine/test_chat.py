"""`LLM.chat` and `kvserve chat`: the model's own template, tokenized exactly as transformers'
`apply_chat_template(tokenize=True)`; bad templates and messages are clear errors."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvserve import LLM, SamplingParams
from kvserve.engine.chat_template import ChatTemplateError
from tests.conftest import requires_smollm2

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)

CONVERSATIONS = [
    [{"role": "user", "content": "Hello world! How are you today?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Café, naïve — déjà vu 😀"},
        {"role": "assistant", "content": "I am fine, thank you."},
        {"role": "user", "content": [{"type": "text", "text": "def fib(n):"}]},
    ],
]


def _hf_ids(hf_tok, messages, add_generation_prompt: bool = True) -> list[int]:
    out = hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.fixture(scope="module")
def tiny_dir(tiny_llama) -> Path:
    return tiny_llama[0]


@pytest.fixture(scope="module")
def llm(tiny_dir):
    return LLM(str(tiny_dir), dtype="float32", device="cpu", num_kv_blocks=128)


def test_chat_prompt_ids_match_transformers(llm, tiny_dir):
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(str(tiny_dir))
    flat = [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else "def fib(n):"}
            for m in CONVERSATIONS[1]]
    outs = llm.chat(CONVERSATIONS, GREEDY, use_tqdm=False)
    assert outs[0].prompt_token_ids == _hf_ids(hf_tok, CONVERSATIONS[0])
    assert outs[1].prompt_token_ids == _hf_ids(hf_tok, flat)
    assert outs[1].prompt.endswith("<|im_start|>assistant\n")
    # A list of conversations gives the same replies as one conversation at a time.
    (single,) = llm.chat(CONVERSATIONS[1], GREEDY, use_tqdm=False)
    assert single.outputs[0].token_ids == outs[1].outputs[0].token_ids
    no_gen = llm.chat_prompt(CONVERSATIONS[0], add_generation_prompt=False)
    assert no_gen["prompt_token_ids"] == _hf_ids(hf_tok, CONVERSATIONS[0], add_generation_prompt=False)


@pytest.mark.parametrize(
    "template",
    [
        "{{ messages.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__.os.system('touch SENTINEL') }}",
        "{% for m in messages %}{{ m.content",  # syntax error
        "{{ raise_exception('no system role') }}",
    ],
)
def test_bad_template_fails_safely(llm, template, tmp_path):
    sentinel = tmp_path / "pwned"
    with pytest.raises(ChatTemplateError):
        llm.chat(CONVERSATIONS[0], GREEDY, chat_template=template.replace("SENTINEL", str(sentinel)), use_tqdm=False)
    assert not sentinel.exists()
    assert not llm.engine.has_unfinished_requests()
    assert issubclass(ChatTemplateError, ValueError)


@pytest.mark.parametrize(
    "messages, field",
    [
        ([], "messages"),
        ([{"role": "wizard", "content": "hi"}], r"messages\[0\]\.role"),
        ([{"role": "user", "content": "a"}, {"role": "user"}], r"messages\[1\]\.content"),
        ([{"role": "user", "content": [{"type": "image_url"}]}], r"messages\[0\]\.content\[0\]\.type"),
        ([CONVERSATIONS[0], [{"role": "user", "content": 5}]], r"conversations\[1\]: messages\[0\]\.content"),
        (["hello"], r"messages\[0\]"),
    ],
)
def test_bad_messages_name_the_field(llm, messages, field):
    with pytest.raises(ValueError, match=field):
        llm.chat(messages, GREEDY, use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()


def test_cli_chat_streams_replies_and_resets(tiny_dir, llm):
    expected = [
        llm.chat([{"role": "user", "content": text}], SamplingParams(max_tokens=5, temperature=0), use_tqdm=False)[0]
        .outputs[0].text
        for text in ("hi", "hello")
    ]
    cmd = [
        sys.executable, "-m", "kvserve", "chat", "--model", str(tiny_dir), "--device", "cpu",
        "--dtype", "float32", "--temperature", "0", "--max-tokens", "5", "--kv-cache-memory-gib", "0.01",
    ]
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    proc = subprocess.run(
        cmd, input="hi\n/reset\nhello\n/nope\n/exit\nnever read\n", capture_output=True,
        text=True, encoding="utf-8", timeout=120, env=env,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    # The reply to "hello" after /reset is the reply to a fresh conversation.
    assert out.index(expected[0]) < out.index("(conversation cleared)") <= out.index(
        expected[1], out.index("(conversation cleared)")
    )
    assert "unknown command '/nope'" in out


def test_cli_chat_exits_cleanly_on_eof(tiny_dir, llm, monkeypatch, capsys):
    from kvserve.entrypoints.cli import main

    greedy = SamplingParams(max_tokens=5, temperature=0)
    (expected,) = llm.chat([{"role": "user", "content": "hi"}], greedy, use_tqdm=False)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))  # no /exit: the input just ends
    argv = ["chat", "--model", str(tiny_dir), "--device", "cpu", "--dtype", "float32", "--temperature", "0",
            "--max-tokens", "5", "--kv-cache-memory-gib", "0.01"]
    assert main(argv) == 0
    assert expected.outputs[0].text in capsys.readouterr().out


# -- the built-in model --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2():
    return LLM("smollm2", dtype="float32", device="cpu", quantization="none", max_model_len=512, num_kv_blocks=64)


@requires_smollm2
@pytest.mark.slow
def test_smollm2_chat_ids_match_transformers(smollm2):
    from transformers import AutoTokenizer

    from kvserve.loader.resolve import smollm2_path

    path = smollm2_path()
    hf_tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    convs = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [
            {"role": "system", "content": "You answer in one word."},
            {"role": "user", "content": "Café or tea? 日本"},
            {"role": "assistant", "content": "Tea."},
            {"role": "user", "content": "Why?"},
        ],
    ]
    for conv in convs:
        for gen_prompt in (True, False):
            got = smollm2.chat_prompt(conv, add_generation_prompt=gen_prompt)["prompt_token_ids"]
            assert got == _hf_ids(hf_tok, conv, add_generation_prompt=gen_prompt)
    # The template starts with <|im_start|> (SmolLM2's BOS) itself: no second one is added.
    (out,) = smollm2.chat(convs[0], SamplingParams(max_tokens=1, temperature=0), use_tqdm=False)
    assert out.prompt_token_ids == _hf_ids(hf_tok, convs[0])
    assert out.prompt_token_ids[:2] != [hf_tok.bos_token_id] * 2
    assert out.outputs[0].text == "The"  # "The capital of France is Paris."
