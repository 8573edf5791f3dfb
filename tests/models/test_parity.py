"""Greedy parity with HF transformers (the oracle) in fp32 on CPU, for every model family."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from kvserve import LLM, SamplingParams
from tests.conftest import TINY_ARCHS, TINY_VOCAB

NEW_TOKENS = 32
LOGPROB_TOL = 1e-4
NEAR_TIE = 1e-3


def _prompts() -> list[list[int]]:
    rng = random.Random(7)
    # Lengths straddle block boundaries (block size 16) and include a 1-token prompt.
    return [[rng.randrange(3, TINY_VOCAB) for _ in range(n)] for n in (1, 5, 16, 17, 40)]


def hf_greedy(model, prompt: list[int], n: int) -> tuple[list[int], list[float], list[float]]:
    """HF's greedy tokens, their logprobs, and the top-two logprob margin at each step."""
    # No EOS at all (rather than min_new_tokens, whose processor would mask EOS and change
    # HF's choice where ours, with ignore_eos, may legitimately pick it).
    cfg = copy.deepcopy(model.generation_config)
    cfg.eos_token_id = []
    out = model.generate(
        torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        generation_config=cfg, max_new_tokens=n, do_sample=False, output_logits=True,
        return_dict_in_generate=True, pad_token_id=0,
    )
    tokens = out.sequences[0, len(prompt):].tolist()
    lps, margins = [], []
    for step, logits in enumerate(out.logits):
        lp = torch.log_softmax(logits[0].float(), dim=-1)
        top2 = lp.topk(2).values
        lps.append(lp[tokens[step]].item())
        margins.append((top2[0] - top2[1]).item())
    return tokens, lps, margins


def assert_matches_hf(ours_tokens, ours_lps, ref) -> None:
    ref_tokens, ref_lps, margins = ref
    for i, (a, b) in enumerate(zip(ours_tokens, ref_tokens)):
        if margins[i] < NEAR_TIE:
            return  # a true near-tie: the two continuations may legitimately diverge here
        assert a == b, f"token {i}: ours {a} vs HF {b} (margin {margins[i]:.2e})"
        assert abs(ours_lps[i] - ref_lps[i]) < LOGPROB_TOL, (
            f"logprob {i}: ours {ours_lps[i]:.6f} vs HF {ref_lps[i]:.6f}"
        )
    assert len(ours_tokens) == len(ref_tokens) == NEW_TOKENS


def assert_batched_and_alone_match_hf(llm, prompts, refs, alone: int | None = None) -> None:
    """Greedy ids and logprobs of `prompts` run together and then one at a time (the first
    `alone` of them; all by default) equal HF's `refs`; `llm` must sample with logprobs=0."""
    from kvserve import SamplingParams

    sp = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True, logprobs=0)
    batched = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    single = [llm.generate({"prompt_token_ids": p}, sp, use_tqdm=False)[0] for p in prompts[:alone]]
    for outs in (batched, single):
        for out, ref in zip(outs, refs):
            comp = out.outputs[0]
            assert_matches_hf(comp.token_ids, [d[t].logprob for d, t in zip(comp.logprobs, comp.token_ids)], ref)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_greedy_matches_hf_batched_and_alone(arch, tiny_model_factory):
    folder, hf_model = tiny_model_factory(arch)
    prompts = _prompts()
    refs = [hf_greedy(hf_model, p, NEW_TOKENS) for p in prompts]
    llm = LLM(str(folder), dtype="float32", device="cpu", num_kv_blocks=128)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True, logprobs=0)

    batched = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for out, ref in zip(batched, refs):
        comp = out.outputs[0]
        lps = [d[t].logprob for d, t in zip(comp.logprobs, comp.token_ids)]
        assert_matches_hf(comp.token_ids, lps, ref)
        assert comp.finish_reason == "length"

    for prompt, ref in zip(prompts, refs):
        (out,) = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)
        comp = out.outputs[0]
        lps = [d[t].logprob for d, t in zip(comp.logprobs, comp.token_ids)]
        assert_matches_hf(comp.token_ids, lps, ref)
    # Every block is back in the pool once all requests ended.
    kv = llm.engine.scheduler.kv
    assert kv.num_free_blocks == kv.num_blocks


def test_fused_weights_are_loaded_exactly(tiny_model_factory):
    """q/k/v and gate/up land in the right rows of the fused parameters."""
    folder, hf_model = tiny_model_factory("qwen2")
    llm = LLM(str(folder), dtype="float32", device="cpu", num_kv_blocks=64)
    ours = llm.engine.runner.model.layers[0]
    ref = hf_model.model.layers[0]
    q = ref.self_attn.q_proj.weight
    k = ref.self_attn.k_proj.weight
    v = ref.self_attn.v_proj.weight
    torch.testing.assert_close(ours.self_attn.qkv_proj.weight, torch.cat([q, k, v]), rtol=0, atol=0)
    torch.testing.assert_close(ours.self_attn.qkv_proj.bias, torch.cat(
        [ref.self_attn.q_proj.bias, ref.self_attn.k_proj.bias, ref.self_attn.v_proj.bias]), rtol=0, atol=0)
    gu = torch.cat([ref.mlp.gate_proj.weight, ref.mlp.up_proj.weight])
    torch.testing.assert_close(ours.mlp.gate_up_proj.weight, gu, rtol=0, atol=0)
