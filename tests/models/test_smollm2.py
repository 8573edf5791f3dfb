"""The real built-in model: SmolLM2-135M-Instruct from its GGUF file, against HF transformers
loading the same file with `gguf_file=` (both fp32, greedy)."""

from __future__ import annotations

import pytest
import torch

from kvserve import LLM, SamplingParams
from tests.conftest import requires_smollm2
from tests.models.test_parity import assert_matches_hf, hf_greedy

pytestmark = [requires_smollm2, pytest.mark.slow]

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "<|im_start|>user\nWhat is a KV cache?<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.fixture(scope="module")
def hf_smollm2():
    from transformers import AutoModelForCausalLM

    from kvserve.loader.resolve import smollm2_path

    path = smollm2_path()
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, torch_dtype=torch.float32).eval()


def test_smollm2_greedy_matches_hf(hf_smollm2):
    llm = LLM("smollm2", dtype="float32", device="cpu", quantization="none", max_model_len=512)
    tok = llm.get_tokenizer()
    ids = [tok.encode(p) for p in PROMPTS]
    refs = [hf_greedy(hf_smollm2, p, 32) for p in ids]
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True, logprobs=0)
    outs = llm.generate([{"prompt_token_ids": p} for p in ids], params, use_tqdm=False)
    for out, ref in zip(outs, refs):
        comp = out.outputs[0]
        lps = [d[t].logprob for d, t in zip(comp.logprobs, comp.token_ids)]
        assert_matches_hf(comp.token_ids, lps, ref)
    # Text round-trips through our tokenizer like HF's decode of the same ids.
    assert "Paris" in outs[0].outputs[0].text
