"""What comes back with the tokens: sample logprobs (chosen token + top-k, with rank and decoded
text) and prompt logprobs equal HF transformers' log-softmax in fp32, on several tiny
architectures; streamed text through the engine adds up to the final text, stop strings too."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from kvserve import LLM, SamplingParams
from tests.conftest import TINY_VOCAB

TOL = 1e-4
NEW = 8
TOP = 5
# Llama (GQA, untied), Qwen3 (q/k norm), GPT-2 (learned positions, LayerNorm), and the
# SmolLM2 shape (tied embeddings, 3:1 GQA).
ARCHS = ["llama", "qwen3", "gpt2", "smollm2"]


def _prompts() -> list[list[int]]:
    rng = random.Random(17)
    return [[rng.randrange(3, TINY_VOCAB) for _ in range(n)] for n in (6, 21)]


def hf_output_logprobs(model, prompt: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """HF greedy tokens and the log-softmax of `output_logits` at each step: [n, V]."""
    cfg = copy.deepcopy(model.generation_config)
    cfg.eos_token_id = []
    out = model.generate(
        torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        generation_config=cfg, max_new_tokens=n, do_sample=False, output_logits=True,
        return_dict_in_generate=True, pad_token_id=0,
    )
    lps = torch.stack([torch.log_softmax(step[0].float(), dim=-1) for step in out.logits])
    return out.sequences[0, len(prompt):].tolist(), lps


@torch.no_grad()
def hf_forward_logprobs(model, ids: list[int]) -> torch.Tensor:
    """Log-softmax of HF's logits at every position of `ids` (teacher forcing): [L, V]."""
    return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def assert_entry_matches(entry: dict, chosen: int, ref: torch.Tensor, k: int, where: str) -> None:
    """entry: {token: Logprob} at one position (the chosen token + the top k); ref: HF's
    logprobs [V] there."""
    assert chosen in entry, where
    for t, lp in entry.items():
        assert abs(lp.logprob - ref[t].item()) < TOL, f"{where}: token {t}"
        assert lp.decoded_token is not None
        # rank = 1 + the number of more likely tokens (a near-tie may count either way)
        lo, hi = (1 + int((ref > ref[t] + d).sum()) for d in (TOL, -TOL))
        assert lo <= lp.rank <= hi, f"{where}: rank of token {t}"
    best = ref.topk(k + 1)
    if k == 0:
        assert list(entry) == [chosen], where
    elif best.values[k - 1] - best.values[k] > TOL:  # HF's top k is unambiguous
        assert set(entry) == set(best.indices[:k].tolist()) | {chosen}, where


@pytest.mark.parametrize("arch", ARCHS)
def test_logprobs_match_hf(arch, tiny_model_factory):
    folder, hf_model = tiny_model_factory(arch)
    llm = LLM(str(folder), dtype="float32", device="cpu", num_kv_blocks=64)
    prompts = _prompts()
    greedy = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True, logprobs=TOP, prompt_logprobs=3)
    # Knobs change what is sampled, never the reported (raw-model) logprobs.
    sampled = SamplingParams(
        max_tokens=NEW, temperature=1.5, top_k=20, repetition_penalty=1.3, seed=5, ignore_eos=True, logprobs=2
    )
    outs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts * 2], [greedy] * len(prompts) + [sampled] * len(prompts),
        use_tqdm=False,
    )
    for i, (out, prompt) in enumerate(zip(outs, prompts * 2)):
        comp = out.outputs[0]
        k = TOP if i < len(prompts) else 2
        assert len(comp.logprobs) == len(comp.token_ids) == NEW
        assert comp.cumulative_logprob == pytest.approx(
            sum(d[t].logprob for d, t in zip(comp.logprobs, comp.token_ids)), abs=1e-5
        )
        full = hf_forward_logprobs(hf_model, prompt + comp.token_ids)  # [P + NEW, V]
        if i < len(prompts):  # greedy: also against generate()'s output_logits
            hf_tokens, hf_lps = hf_output_logprobs(hf_model, prompt, NEW)
            assert comp.token_ids == hf_tokens
            torch.testing.assert_close(hf_lps, full[len(prompt) - 1 : -1], rtol=0, atol=TOL)
        for step, (tok, entry) in enumerate(zip(comp.token_ids, comp.logprobs)):
            assert_entry_matches(entry, tok, full[len(prompt) - 1 + step], k, f"{arch} out {i} step {step}")

        if i < len(prompts):
            # prompt_logprobs: None for the first token, then HF's forward on the prompt alone.
            ref = hf_forward_logprobs(hf_model, prompt)
            plp = out.prompt_logprobs
            assert plp is not None and len(plp) == len(prompt) and plp[0] is None
            for j in range(1, len(prompt)):
                assert_entry_matches(plp[j], prompt[j], ref[j - 1], 3, f"{arch} prompt {i} pos {j}")
        else:
            assert out.prompt_logprobs is None


@pytest.mark.parametrize("variant", ["chunked", "preempted"])
def test_prompt_logprobs_survive_chunking_and_preemption(tiny_model_factory, variant):
    folder, hf_model = tiny_model_factory("llama")
    if variant == "chunked":  # 7-token chunks: every chunk's last row predicts the next chunk
        llm = LLM(str(folder), dtype="float32", device="cpu", num_kv_blocks=64, max_num_batched_tokens=7)
    else:  # 6 blocks of 16 cannot hold four 40-token prompts growing by 24 tokens each
        llm = LLM(str(folder), dtype="float32", device="cpu", num_kv_blocks=6, max_model_len=96)
    rng = random.Random(4)
    prompts = [[rng.randrange(3, TINY_VOCAB) for _ in range(40)] for _ in range(4 if variant == "preempted" else 2)]
    new = 24 if variant == "preempted" else 2
    params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True, prompt_logprobs=0)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        plp = out.prompt_logprobs
        assert len(plp) == len(prompt) and plp[0] is None
        got = torch.tensor([plp[j][prompt[j]].logprob for j in range(1, len(prompt))])
        ref = hf_forward_logprobs(hf_model, prompt)
        want = ref[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
        torch.testing.assert_close(got, want, rtol=0, atol=TOL)
    if variant == "preempted":
        assert llm.engine.scheduler.num_preemptions > 0


# -- streaming detokenization through the engine -------------------------------------------------
@pytest.fixture(scope="module")
def llama_llm(tiny_llama):
    return LLM(str(tiny_llama[0]), dtype="float32", device="cpu", num_kv_blocks=64)


def _stop_across_tokens(llm, prompt: str, params: SamplingParams) -> tuple[str, str]:
    """Full greedy text and a stop string that starts inside one token and ends in the next."""
    (out,) = llm.generate(prompt, params, use_tqdm=False)
    tok = llm.get_tokenizer()
    ids = out.outputs[0].token_ids
    pieces = [tok.decode(ids[: j + 1]) for j in range(len(ids))]
    for j in range(4, len(ids) - 1):
        a, b, c = pieces[j - 1], pieces[j], pieces[j + 1]
        if not (b.startswith(a) and c.startswith(b)) or len(b) - len(a) < 2 or len(c) - len(b) < 1:
            continue
        stop = b[-2:] + c[len(b)]  # last 2 chars of token j + first char of token j + 1
        if stop.isprintable() and stop.strip() and "\ufffd" not in stop:
            return out.outputs[0].text, stop
    pytest.skip("no printable token boundary in the greedy text")


@pytest.mark.parametrize("include", [False, True])
def test_stream_deltas_add_up_with_stop_string(llama_llm, include):
    prompt = "The quick brown fox"
    base = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    full, stop = _stop_across_tokens(llama_llm, prompt, base)
    expected = full[: full.index(stop)] + (stop if include else "")
    params = base.clone(stop=[stop], include_stop_str_in_output=include)
    chunks, last = [], None
    for last in llama_llm.generate_stream(prompt, params):
        chunks.append(last.outputs[0].delta_text)
    comp = last.outputs[0]
    assert last.finished and comp.finish_reason == "stop" and comp.stop_reason == stop
    assert "".join(chunks) == comp.text == expected
    if not include:
        assert not any(stop in c for c in chunks)
    assert not any("\ufffd" in c for c in chunks if "\ufffd" not in full)
    assert not llama_llm.engine.has_unfinished_requests()
