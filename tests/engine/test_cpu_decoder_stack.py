"""End to end on CPU in bf16: decode steps of at most `cpu_kernels.MAX_ROWS` rows run the whole
decoder stack in one C call (models/cpu_decoder.py), and the engine's tokens and logprobs are
exactly those of the op-by-op forward, alone and in batches, on a tiny model and on SmolLM2."""

from __future__ import annotations

import random

import pytest

from kvserve import LLM, SamplingParams
from kvserve.models import cpu_kernels
from kvserve.models.cpu_decoder import DecoderStack
from tests.conftest import TINY_VOCAB, requires_smollm2

pytestmark = pytest.mark.skipif(cpu_kernels.library() is None, reason="no AVX512-BF16 CPU or C compiler")

GREEDY = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, logprobs=0)


def _run(llm: LLM, prompts: list[dict]) -> list[tuple[list[int], list[float]]]:
    outs = []
    for o in llm.generate(prompts, GREEDY, use_tqdm=False):
        c = o.outputs[0]
        outs.append((c.token_ids, [d[t].logprob for d, t in zip(c.logprobs, c.token_ids)]))
    return outs


def _fused_then_op_by_op(llm: LLM, prompts: list) -> None:
    """Prefix caching is off: a cache hit would change the prefill's numerics, not the stack's."""
    model = llm.engine.runner.model
    alone = [_run(llm, [p])[0] for p in prompts]
    batched = _run(llm, prompts)
    stack = model.cpu_decoder
    assert isinstance(stack, DecoderStack)
    # Alone: every decode step after the first token; batched: steps of <= MAX_ROWS rows.
    assert stack.num_steps >= len(prompts) * (GREEDY.max_tokens - 1)
    model.cpu_decoder = False
    assert [_run(llm, [p])[0] for p in prompts] == alone
    assert _run(llm, prompts) == batched


def test_tiny_model_fused_stack_gives_the_op_by_op_tokens(tiny_model_factory):
    folder, _ = tiny_model_factory("smollm2")
    rng = random.Random(3)
    prompts = [{"prompt_token_ids": [rng.randrange(3, TINY_VOCAB) for _ in range(n)]} for n in (2, 15, 16, 33)]
    _fused_then_op_by_op(LLM(str(folder), dtype="bfloat16", device="cpu", num_kv_blocks=64,
                             enable_prefix_caching=False), prompts)


@requires_smollm2
@pytest.mark.slow
def test_smollm2_fused_stack_gives_the_op_by_op_tokens():
    llm = LLM("smollm2", dtype="bfloat16", device="cpu", max_model_len=512, enable_prefix_caching=False)
    prompts = ["The capital of France is", "def fibonacci(n):",
               "<|im_start|>user\nWhat is a KV cache?<|im_end|>\n<|im_start|>assistant\n"]
    _fused_then_op_by_op(llm, prompts)
