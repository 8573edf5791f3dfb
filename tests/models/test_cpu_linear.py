"""oneDNN-prepacked bf16 linears on CPU: used when supported, and bit-identical to nn.Linear."""

from __future__ import annotations

import pytest
import torch

from kvserve import LLM, SamplingParams
from kvserve.models import cpu_linear

pytestmark = pytest.mark.skipif(
    not cpu_linear.prepack_supported(torch.device("cpu"), torch.bfloat16),
    reason="this PyTorch build has no oneDNN bf16 linear",
)


def test_packed_linear_equals_linear():
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 160, bias=True).to(torch.bfloat16)
    packed = cpu_linear.PackedLinear(lin)
    for rows in (1, 3, 64):
        x = torch.randn(rows, 96, dtype=torch.bfloat16)
        assert torch.equal(packed(x), lin(x))
    x3 = torch.randn(2, 5, 96, dtype=torch.bfloat16)
    assert torch.equal(packed(x3), lin(x3))


def test_bf16_engine_prepacks_and_matches_unpacked(tiny_llama, monkeypatch):
    folder = str(tiny_llama[0])
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=0)
    prompts = [{"prompt_token_ids": list(range(5, 5 + n))} for n in (3, 20)]
    packed = LLM(folder, dtype="bfloat16", device="cpu", num_kv_blocks=64)
    model = packed.engine.runner.model
    assert any(isinstance(m, cpu_linear.PackedLinear) for m in model.modules())
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    monkeypatch.setattr(cpu_linear, "prepack_supported", lambda device, dtype: False)
    plain = LLM(folder, dtype="bfloat16", device="cpu", num_kv_blocks=64)
    assert not any(isinstance(m, cpu_linear.PackedLinear) for m in plain.engine.runner.model.modules())
    a = packed.generate(prompts, params, use_tqdm=False)
    b = plain.generate(prompts, params, use_tqdm=False)
    for x, y in zip(a, b):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        assert x.outputs[0].cumulative_logprob == y.outputs[0].cumulative_logprob
