"""End to end on the GPU: greedy tokens in fp32 equal the CPU reference engine's.

Covers CUDA-graph decode (ladder padding included) and eager decode, prefix caching on and
off, and forced preemption (a KV pool barely larger than one request). The CPU engine (PyTorch
reference attention, unfused layers) is the oracle; the tiny models' logits are decisive, so
fp32 reduction-order differences do not flip a greedy choice.
"""

from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from kvserve import LLM, SamplingParams  # noqa: E402

MAX_TOKENS = 24
COMMON = dict(dtype="float32", max_model_len=256, max_num_seqs=16)


def _prompts(n: int, seed: int = 0, shared_prefix: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    head = [rng.randrange(3, 500) for _ in range(shared_prefix)]
    return [head + [rng.randrange(3, 500) for _ in range(rng.randrange(4, 70))] for _ in range(n)]


def _generate(llm: LLM, prompts: list[list[int]], max_tokens: int = MAX_TOKENS) -> list[list[int]]:
    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


_REFERENCE: dict[tuple, list[list[int]]] = {}


def _reference(folder, prompts: list[list[int]], key: tuple) -> list[list[int]]:
    if key not in _REFERENCE:
        cpu = LLM(str(folder), device="cpu", num_kv_blocks=256, **COMMON)
        _REFERENCE[key] = _generate(cpu, prompts)
    return _REFERENCE[key]


@pytest.mark.parametrize("arch", ["llama", "qwen3", "smollm2"])
@pytest.mark.parametrize("graphs", [True, False], ids=["graphs", "eager"])
@pytest.mark.parametrize("prefix", [True, False], ids=["prefix", "noprefix"])
def test_greedy_matches_cpu(tiny_model_factory, arch, graphs, prefix):
    folder, _ = tiny_model_factory(arch)
    prompts = _prompts(12, seed=1, shared_prefix=40)  # shared 40-token head: prefix-cache hits
    want = _reference(folder, prompts, (arch, "shared"))
    llm = LLM(str(folder), device="cuda", enforce_eager=not graphs, enable_prefix_caching=prefix, **COMMON)
    assert llm.engine.runner.device.type == "cuda"
    assert (llm.engine.runner.graphs is not None) == graphs
    assert _generate(llm, prompts) == want
    runner = llm.engine.runner
    assert (runner.num_graph_steps > 0) == graphs
    if prefix:
        assert llm.engine.stats()["prefix_hits"] > 0
    kv = llm.engine.scheduler.kv
    assert kv.num_free_blocks == kv.num_blocks


@pytest.mark.parametrize("graphs", [True, False], ids=["graphs", "eager"])
def test_preemption_matches_cpu(tiny_model_factory, graphs):
    folder, _ = tiny_model_factory("llama")
    prompts = _prompts(10, seed=2)
    want = _reference(folder, prompts, ("llama", "plain"))
    # 20 blocks of 16 = 320 tokens for 10 requests of up to ~94 tokens: preemption is certain.
    llm = LLM(str(folder), device="cuda", enforce_eager=not graphs, num_kv_blocks=20, **COMMON)
    assert _generate(llm, prompts) == want
    assert llm.engine.stats()["num_preemptions"] > 0


@pytest.mark.parametrize("batch", [3, 5, 7, 13])
def test_ladder_padding(tiny_model_factory, batch):
    """Batch sizes between ladder sizes run the next larger graph with padded rows."""
    folder, _ = tiny_model_factory("llama")
    prompts = _prompts(batch, seed=10 + batch)
    cpu = LLM(str(folder), device="cpu", num_kv_blocks=256, **COMMON)
    want = _generate(cpu, prompts)
    llm = LLM(str(folder), device="cuda", **COMMON)
    graphs = llm.engine.runner.graphs
    assert graphs.padded_size(batch) > batch
    assert _generate(llm, prompts) == want
    assert llm.engine.runner.num_graph_steps >= MAX_TOKENS - 2


def test_auto_device_bf16_and_kv_sizing(tiny_model_factory):
    """device='auto' takes the GPU, dtype='auto' is bf16 there; the KV cache is sized from
    gpu_memory_utilization after a profiled forward; graphs and eager agree on shapes."""
    folder, _ = tiny_model_factory("qwen3")
    llm = LLM(str(folder), max_model_len=256, max_num_seqs=16, gpu_memory_utilization=0.2)
    eng = llm.engine
    assert eng.runner.device.type == "cuda"
    assert eng.runner.dtype == torch.bfloat16
    total = torch.cuda.mem_get_info()[1]
    kv_bytes = sum(c.numel() * c.element_size() for c in eng.runner.kv_caches)
    assert 0 < kv_bytes < 0.2 * total
    outs = _generate(llm, _prompts(6, seed=3))
    assert all(len(o) == MAX_TOKENS and all(0 <= t < 512 for t in o) for o in outs)
    assert eng.runner.num_graph_steps > 0


def test_sampling_seeded_is_reproducible(tiny_model_factory):
    """Random sampling on the GPU (no host sync in the step): a seeded request gives the same
    tokens alone and inside a batch, in graph and eager mode."""
    folder, _ = tiny_model_factory("llama")
    sp = SamplingParams(max_tokens=16, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True)
    prompt = {"prompt_token_ids": _prompts(1, seed=4)[0]}
    others = [{"prompt_token_ids": p} for p in _prompts(5, seed=5)]
    results = []
    for eager in (False, True):
        llm = LLM(str(folder), device="cuda", enforce_eager=eager, **COMMON)
        alone = llm.generate([prompt], sp, use_tqdm=False)[0].outputs[0].token_ids
        mixed = llm.generate([prompt] + others, [sp] + [SamplingParams(max_tokens=16, temperature=1.0)] * 5,
                             use_tqdm=False)[0].outputs[0].token_ids
        assert alone == mixed
        results.append(alone)
    assert results[0] == results[1]
