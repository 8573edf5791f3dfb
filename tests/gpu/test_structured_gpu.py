"""Structured output on CUDA (tiny random fp32 Llama): the bitmask goes to the device through
pinned memory and is applied there; constrained rows take ahead steps (asynchronous
scheduling, the default) with the same tokens as the synchronous engine, with CUDA graphs and
eagerly; a constrained row leaves its unconstrained neighbours' tokens unchanged; speculative
verify steps keep the grammar.

    python -m pytest tests/gpu/test_structured_gpu.py -q
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("triton")
pytest.importorskip("xgrammar")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from kvserve import LLM, SamplingParams  # noqa: E402
from kvserve.core.sampling_params import StructuredOutputsParams as SO  # noqa: E402

COMMON = dict(device="cuda", dtype="float32", max_model_len=512, max_num_seqs=16, gpu_memory_utilization=0.3)
SCHEMA = {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
                                           "ok": {"type": "boolean"}},
          "required": ["id", "tags", "ok"]}


def _check(obj) -> None:
    assert set(obj) == {"id", "tags", "ok"} and 0 <= obj["id"] <= 999 and isinstance(obj["ok"], bool)
    assert len(obj["tags"]) <= 3 and set(obj["tags"]) <= {"a", "b", "c"}


@pytest.fixture(scope="module")
def folder(tiny_model_factory):
    return str(tiny_model_factory("llama")[0])


def _run(llm):
    prompts = [{"prompt_token_ids": [5, 17, 99, 23, 42, i]} for i in range(8)]
    params = [SamplingParams(max_tokens=150, temperature=0, structured_outputs=SO(json=SCHEMA)) for _ in range(5)]
    params += [SamplingParams(max_tokens=40, temperature=0, ignore_eos=True),
               SamplingParams(max_tokens=40, temperature=0.9, seed=4, structured_outputs=SO(regex="[a-z]{4,20}")),
               SamplingParams(max_tokens=40, temperature=0.9, seed=5, ignore_eos=True)]
    return [(o.outputs[0].token_ids, o.outputs[0].finish_reason, o.outputs[0].text)
            for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.mark.parametrize("graphs", [True, False], ids=["graphs", "eager"])
def test_constrained_async_equals_sync_and_validates(folder, graphs):
    sync = LLM(folder, enforce_eager=not graphs, async_scheduling=False, **COMMON)
    want = _run(sync)
    llm = LLM(folder, enforce_eager=not graphs, **COMMON)
    got = _run(llm)
    assert llm.engine.num_ahead_steps > 0
    assert got == want
    for toks, reason, text in got[:5]:
        assert reason == "stop"
        _check(json.loads(text))
    # Unconstrained neighbours: the same tokens as alone.
    alone = llm.generate([{"prompt_token_ids": [5, 17, 99, 23, 42, i]} for i in (5, 7)],
                         [SamplingParams(max_tokens=40, temperature=0, ignore_eos=True),
                          SamplingParams(max_tokens=40, temperature=0.9, seed=5, ignore_eos=True)], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in alone] == [got[5][0], got[7][0]]


def test_speculative_verify_keeps_the_grammar(folder):
    cfg = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3,
           "backoff": False}
    llm = LLM(folder, speculative_config=cfg, **COMMON)
    prompts = [{"prompt_token_ids": [5, 17, 99, 23, 42, 7] * 3 + [i]} for i in range(6)]
    params = [SamplingParams(max_tokens=150, temperature=0, structured_outputs=SO(json=SCHEMA)),
              SamplingParams(max_tokens=150, temperature=0.9, seed=1, structured_outputs=SO(json=SCHEMA))] * 3
    for o in llm.generate(prompts, params, use_tqdm=False):
        assert o.outputs[0].finish_reason == "stop"
        _check(json.loads(o.outputs[0].text))
    st = llm.engine.stats()  # (token identity with plain decoding is checked on the CPU)
    assert st["spec_draft_tokens"] > 0
