"""CPU bf16 linears (`platform/cpu_linear.py`): oneDNN-prepacked (bit-identical to nn.Linear)
and, for a few rows, the streaming GEMV kernel (fp32 accumulation rounded once, so within one
bf16 ulp of fp32 math). Skipped where oneDNN has no bf16 path on this CPU (AVX2 only): there the
platform keeps bf16 layers dense (`test_platform.py`)."""

from __future__ import annotations

import pytest
import torch

from kvserve import LLM, SamplingParams
from kvserve.models import cpu_kernels
from kvserve.models.linear import Linear
from kvserve.platform import cpu_linear
from kvserve.platform.cpu_linear import PackedBf16LinearMethod

pytestmark = pytest.mark.skipif(
    not cpu_linear.onednn_bf16_supported(), reason="oneDNN has no bf16 linear on this CPU"
)


def _packed(lin: torch.nn.Linear) -> Linear:
    """`lin` as a Linear on the prepacked bf16 method (the GEMV kernel where it loads)."""
    method = PackedBf16LinearMethod(use_gemv=True)
    layer = Linear(lin.in_features, lin.out_features, lin.bias is not None, method, dtype=torch.bfloat16)
    layer.weight.data.copy_(lin.weight)
    if lin.bias is not None:
        layer.bias.data.copy_(lin.bias)
    method.finish(layer)
    return layer


needs_gemv = pytest.mark.skipif(cpu_kernels.load() is None, reason="no AVX512-BF16 CPU or C compiler")


@pytest.fixture
def no_gemv(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "load", lambda: None)


def test_packed_linear_equals_linear(no_gemv):
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 160, bias=True).to(torch.bfloat16)
    packed = _packed(lin)
    for rows in (1, 3, 64):
        x = torch.randn(rows, 96, dtype=torch.bfloat16)
        assert torch.equal(packed(x), lin(x))
    x3 = torch.randn(2, 5, 96, dtype=torch.bfloat16)
    assert torch.equal(packed(x3), lin(x3))


def test_packed_linear_above_gemv_rows_equals_linear():
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 160, bias=True).to(torch.bfloat16)
    packed = _packed(lin)
    x = torch.randn(cpu_kernels.MAX_ROWS + 1, 96, dtype=torch.bfloat16)
    assert torch.equal(packed(x), lin(x))


def _within_one_ulp(got: torch.Tensor, exact: torch.Tensor, magnitude: torch.Tensor) -> bool:
    """bf16 `got` is within one bf16 ulp of the fp32 value `exact`, give or take the fp32
    summation-order error (`magnitude` = the sum of the absolute products)."""
    ulp = exact.to(torch.bfloat16).float().abs() * 2.0**-7
    return bool(((got.float() - exact).abs() <= ulp + 1e-6 * magnitude).all())


@needs_gemv
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("in_f,out_f", [(576, 960), (96, 7), (100, 37), (33, 64), (1536, 576)])
def test_gemv_kernel_matches_fp32_math(in_f, out_f, threads):
    torch.manual_seed(in_f + out_f)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for bias in (False, True):
            lin = torch.nn.Linear(in_f, out_f, bias=bias).to(torch.bfloat16)
            packed = _packed(lin)
            for rows in range(1, cpu_kernels.MAX_ROWS + 1):
                x = torch.randn(rows, in_f, dtype=torch.bfloat16)
                exact = x.float() @ lin.weight.float().T + (lin.bias.float() if bias else 0)
                magnitude = x.float().abs() @ lin.weight.float().abs().T
                got = packed(x)
                assert got.dtype == torch.bfloat16 and got.shape == (rows, out_f)
                assert _within_one_ulp(got, exact, magnitude), (rows, bias)
            x3 = torch.randn(2, in_f * 2, dtype=torch.bfloat16)[:, ::2]  # not contiguous
            exact = x3.float() @ lin.weight.float().T + (lin.bias.float() if bias else 0)
            assert _within_one_ulp(packed(x3), exact, x3.float().abs() @ lin.weight.float().abs().T)
    finally:
        torch.set_num_threads(old)


@needs_gemv
def test_bf16_engine_uses_gemv_and_agrees_with_onednn(tiny_llama, monkeypatch):
    folder = str(tiny_llama[0])
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=1)
    prompts = [{"prompt_token_ids": list(range(5, 5 + n))} for n in (3, 20)]
    calls = []
    real = cpu_kernels.gemv
    monkeypatch.setattr(cpu_kernels, "gemv", lambda *a: calls.append(1) or real(*a))
    fast = LLM(folder, dtype="bfloat16", device="cpu", num_kv_blocks=64)
    a = fast.generate(prompts, params, use_tqdm=False)
    assert calls, "decode steps did not use the GEMV kernel"
    monkeypatch.setattr(cpu_kernels, "load", lambda: None)
    b = LLM(folder, dtype="bfloat16", device="cpu", num_kv_blocks=64).generate(prompts, params, use_tqdm=False)
    for x, y in zip(a, b):
        # Same tokens until the reference's top-two margin is a bf16 near-tie.
        for tok_a, tok_b, lp_a, lp_b in zip(x.outputs[0].token_ids, y.outputs[0].token_ids,
                                            x.outputs[0].logprobs, y.outputs[0].logprobs):
            top = sorted((v.logprob for v in lp_b.values()), reverse=True)
            if len(top) > 1 and top[0] - top[1] < 0.05:
                break
            assert tok_a == tok_b
            assert abs(lp_a[tok_a].logprob - lp_b[tok_b].logprob) < 0.05


def test_bf16_engine_prepacks_and_matches_unpacked(tiny_llama, monkeypatch, no_gemv):
    folder = str(tiny_llama[0])
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=0)
    prompts = [{"prompt_token_ids": list(range(5, 5 + n))} for n in (3, 20)]
    packed = LLM(folder, dtype="bfloat16", device="cpu", num_kv_blocks=64)
    model = packed.engine.runner.model
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert linears and all(getattr(m, "packed_weight", None) is not None for m in linears)
    monkeypatch.setattr(cpu_linear, "onednn_bf16_supported", lambda: False)
    plain = LLM(folder, dtype="bfloat16", device="cpu", num_kv_blocks=64)
    assert not any(getattr(m, "packed_weight", None) is not None for m in plain.engine.runner.model.modules())
    a = packed.generate(prompts, params, use_tqdm=False)
    b = plain.generate(prompts, params, use_tqdm=False)
    for x, y in zip(a, b):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        assert x.outputs[0].cumulative_logprob == y.outputs[0].cumulative_logprob
