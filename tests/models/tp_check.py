"""Shared check of the model-family tests: tensor parallelism on CPU processes (gloo) gives the
same greedy tokens and logprobs as one process."""

from __future__ import annotations

from kvserve import LLM, SamplingParams


def assert_tp2_matches_tp1(model_dir: str, prompts: list[list[int]], tol: float = 1e-4) -> None:
    reqs = [{"prompt_token_ids": p} for p in prompts]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=2)
    common = dict(dtype="float32", device="cpu", num_kv_blocks=48, max_model_len=128)
    want = LLM(model_dir, **common).generate(reqs, params, use_tqdm=False)
    llm = LLM(model_dir, tensor_parallel_size=2, **common)
    try:
        got = llm.generate(reqs, params, use_tqdm=False)
    finally:
        llm.engine.shutdown()
    for g, w in zip(got, want):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        for gd, wd in zip(g.outputs[0].logprobs, w.outputs[0].logprobs):
            for t in wd:
                assert abs(gd[t].logprob - wd[t].logprob) < tol
