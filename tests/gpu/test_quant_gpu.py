"""Quantized weights on the GPU (`platform/cuda_quant.py`, `kernels/triton_quant.py`).

- kernels at Llama-sized shapes against the fp64 product of the dequantized weight: the
  one-row GEMV (+ SiLU·mul, + RoPE and the K/V store), the dequantizing GEMM, the dequantize
  kernel, FP8 activation scaling, and the method's large-row paths (dequantize + cuBLAS,
  `torch._scaled_mm`);
- engine: greedy tokens in fp32 of each format (int8, int4, fp8 from an HF checkpoint; GGUF
  Q8_0 / Q4_0 / Q4_1 / Q4_K and a Q4_K_M-style mix) equal the CPU engine's on the same weights
  dequantized (the reference in fp32 math), CUDA graphs on and off; bf16 logprobs near the
  dequantized bf16 model's;
- KVSERVE_FP8_FUSED_ACT=1 (norm and SiLU·mul kernels also write the FP8 activations): the
  kernels equal the unfused path bit for bit at Llama-3.1-8B and Qwen3-0.6B widths, the FP8
  layer takes the pair instead of quantizing again, and an fp8 engine's greedy tokens are the
  same with the option on and off;
- the int32-word GEMVs (KVSERVE_INT4_GEMV / KVSERVE_INT8_GEMV=words): every tile config against
  the dequantized product, epilogues, CUDA graphs, engine greedy tokens;
- the half-math GEMVs (KVSERVE_INT4_GEMV / KVSERVE_INT8_GEMV=half): every tile config against the dequantized
  product, bf16 and fp16, SiLU·mul, RoPE + K/V store, the norm kernels' activation pairs (bit for
  bit), the switch, CUDA graphs, bf16 engine logprobs.
"""

from __future__ import annotations

import functools

import pytest
import torch

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from kvserve import LLM, SamplingParams  # noqa: E402
from tests.gpu import fp8_act_checks, quant_checks  # noqa: E402

FP8 = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
SCHEMES = ["int8", "int4"] + (["fp8"] if FP8 else [])


@pytest.mark.parametrize("n,k", [(4096, 4096), (1024, 14336), (384, 96 * 32)])
def test_products_bf16(n, k):
    quant_checks.check_products(n, k, "cuda", torch.bfloat16, [1, 2, 5, 16, 64], tol=1.5e-2)


@pytest.mark.parametrize("n,k", [(4096, 4096), (1024, 14336), (384, 96 * 32)])
def test_qmm4_bf16(n, k):
    """The 4-bit word GEMM (KVSERVE_INT4_QMM=words|raw) at its default tiles from 2 to 512
    rows, and with split K."""
    quant_checks.check_qmm4(n, k, "cuda", torch.bfloat16, [2, 5, 16, 64, 200, 512], tol=1.5e-2)
    quant_checks.check_qmm4(n, k, "cuda", torch.bfloat16, [16], tol=1.5e-2,
                            configs=((16, 64, 128, 4, 4, 4), (16, 128, 64, 4, 3, 2), (32, 32, 32, 4, 4, 1),
                                     (16, 128, 128, 4, 4, 1, 1), (16, 64, 128, 4, 4, 4, 1), (128, 128, 128, 8, 3, 1, 1)))


@pytest.mark.skipif(not FP8, reason="FP8 needs compute capability 8.9+")
def test_fp8_scale_after():
    quant_checks.check_fp8_scale_after(4096, 4096, "cuda", torch.bfloat16, [2, 16, 64, 256], tol=1.5e-2)
    quant_checks.check_fp8_scale_after(512, 1024, "cuda", torch.float32, [3, 40], tol=1e-5)


def test_qmm4_fp16_fp32():
    quant_checks.check_qmm4(512, 1024, "cuda", torch.float16, [3, 40], tol=2e-3)
    quant_checks.check_qmm4(512, 1024, "cuda", torch.float32, [3, 40], tol=1e-5)


def test_products_fp32():
    quant_checks.check_products(512, 1024, "cuda", torch.float32, [1, 3, 40], tol=1e-5)


def test_epilogues():
    quant_checks.check_silu(2048, 4096, "cuda", torch.bfloat16, tol=1.5e-2)
    quant_checks.check_silu(256, 512, "cuda", torch.float32, tol=1e-5)
    quant_checks.check_rope("cuda", torch.bfloat16, tol=1.5e-2, hq=32, hkv=8, d=128, k=4096)
    quant_checks.check_rope("cuda", torch.float32, tol=1e-5)
    quant_checks.check_act_quant("cuda")


@pytest.mark.parametrize("mode", ["words", "raw", "auto", "codes"])
@pytest.mark.parametrize("m", [2, 16, 200, 2048])
def test_method_paths_int4_words(mode, m, monkeypatch):
    """KVSERVE_INT4_QMM=words|raw|auto (auto the default): the int4 layer's products up to
    INT4_QMM_MAX_ROWS rows take the word GEMM (split K at few rows: in a CUDA graph too), more rows
    dequantize + cuBLAS; "codes" the code-at-a-time GEMM (not for groups of 32)."""
    from kvserve.kernels import triton_quant

    monkeypatch.setattr(triton_quant, "INT4_QMM", mode)
    test_method_paths("int4", m)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("m", [1, 16, 200, 2048])
def test_method_paths(scheme, m):
    """Every row count goes through the method's dispatch (GEMV, Triton GEMM, dequantize +
    cuBLAS or FP8 _scaled_mm) and lands near the reference."""
    from kvserve.models.linear import Linear
    from kvserve.platform.cuda_quant import CudaQuantLinearMethod

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(m)
    layer = Linear(2048, [1024, 1024], True, CudaQuantLinearMethod(scheme, dev, torch.bfloat16))
    w = torch.randn(2048, 2048, device=dev, generator=g) * 0.05
    layer.load_shard(w[:1024], 0)
    layer.load_shard(w[1024:], 1)
    layer.bias = torch.nn.Parameter(torch.randn(2048, device=dev, generator=g).bfloat16(), requires_grad=False)
    layer.method.finish(layer)
    x = torch.randn(m, 2048, device=dev, generator=g).bfloat16()
    ref = x.double() @ layer.qweight.dequantize(torch.float64).T + layer.bias.double()
    tol = 6e-2 if scheme == "fp8" and m > 64 else 1.5e-2  # _scaled_mm also rounds x to e4m3
    assert quant_checks.rel_err(layer(x), ref) < tol
    if m <= 16:  # inside a CUDA graph too
        out = layer(x)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = layer(x)
        x.copy_(torch.randn(m, 2048, device=dev, generator=g).bfloat16())
        graph.replay()
        ref = x.double() @ layer.qweight.dequantize(torch.float64).T + layer.bias.double()
        assert quant_checks.rel_err(out, ref) < tol


# -- engine ---------------------------------------------------------------------------------
COMMON = dict(max_model_len=256, max_num_seqs=8)


def _prompts(n: int = 6, vocab: int = 500) -> list[dict]:
    import random

    rng = random.Random(5)
    return [{"prompt_token_ids": [rng.randrange(3, vocab) for _ in range(rng.randrange(4, 60))]} for _ in range(n)]


def _greedy(llm: LLM, logprobs: int | None = None):
    sp = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, logprobs=logprobs)
    # ids below the model's vocabulary (the tiny GGUF files have a few hundred tokens)
    vocab = min(500, llm.engine.model_config.vocab_size)
    return llm.generate(_prompts(vocab=vocab), sp, use_tqdm=False)


CASES = [(a, s) for a in ("llama", "smollm2") for s in SCHEMES] + [("qwen3", "int4")]


@pytest.mark.parametrize("arch,scheme", CASES)
def test_engine_hf_quantized_matches_reference(tiny_model_factory, tmp_path, arch, scheme):
    folder, _ = tiny_model_factory(arch)
    ref_folder = quant_checks.dequantized_folder(folder, scheme, tmp_path / "deq")
    cpu = LLM(str(ref_folder), device="cpu", dtype="float32", **COMMON)
    want = [o.outputs[0].token_ids for o in _greedy(cpu)]
    for graphs in (True, False) if arch == "llama" else (True,):
        gpu = LLM(str(folder), device="cuda", dtype="float32", quantization=scheme, enforce_eager=not graphs, **COMMON)
        qkv = gpu.engine.runner.model.layers[0].self_attn.qkv_proj
        assert qkv.qweight is not None and qkv.qweight.kind == scheme
        assert (gpu.engine.runner.graphs is not None) == graphs
        assert [o.outputs[0].token_ids for o in _greedy(gpu)] == want, (arch, scheme, graphs)
        del gpu


@pytest.mark.parametrize("scheme", SCHEMES)
def test_engine_bf16_logprobs_near_dequantized(tiny_model_factory, tmp_path, scheme):
    folder, _ = tiny_model_factory("llama")
    ref = LLM(str(quant_checks.dequantized_folder(folder, scheme, tmp_path / "deq")), device="cuda", dtype="bfloat16", **COMMON)
    q = LLM(str(folder), device="cuda", dtype="bfloat16", quantization=scheme, **COMMON)
    a, b = _greedy(ref, logprobs=3), _greedy(q, logprobs=3)
    for ra, rb in zip(a, b):
        first_a, first_b = ra.outputs[0].logprobs[0], rb.outputs[0].logprobs[0]
        common = set(first_a) & set(first_b)
        assert common
        for t in common:
            assert abs(first_a[t].logprob - first_b[t].logprob) < 0.15


@pytest.mark.parametrize("fmt", ["Q8_0", "Q4_0", "Q4_1", "Q4_K", "mixed"])
def test_engine_gguf_matches_dequantized(tmp_path, fmt):
    from tests.models.test_ggml_quantized import _write

    path = _write(tmp_path / f"m-{fmt}.gguf", "Q4_K" if fmt == "mixed" else fmt, mixed=fmt == "mixed")
    cpu = LLM(str(path), device="cpu", dtype="float32", quantization="none", **COMMON)
    want = [o.outputs[0].token_ids for o in _greedy(cpu)]
    gpu = LLM(str(path), device="cuda", dtype="float32", **COMMON)
    layer = gpu.engine.runner.model.layers[0]
    if fmt != "mixed":
        assert layer.mlp.gate_up_proj.qweight is not None
    else:  # gate/up stay Q4_K -> int4; qkv (v in Q6_K) falls back to dense
        assert layer.mlp.gate_up_proj.qweight.kind == "int4" and layer.self_attn.qkv_proj.qweight is None
    assert [o.outputs[0].token_ids for o in _greedy(gpu)] == want


# -- the int32-word GEMVs (KVSERVE_INT4_GEMV / KVSERVE_INT8_GEMV=words; opt-in until timed) -------
from tests.gpu import quant_w4_checks  # noqa: E402

# the one-row RoPE kernel's word tiles checked beside the default: (PAIRS, BLOCK_K, warps, PREFETCH)
_WORD_ROPE_CFGS = {4: [None, (1, 1024, 4, False), (4, 1024, 2, True), (8, 1024, 2, False), (16, 1024, 4, False)],
                   8: [None, (1, 1024, 4, False), (4, 2048, 4, True), (8, 1024, 4, False), (2, 2048, 2, False)]}


def _word_configs(bits: int):
    from kvserve.kernels import triton_quant

    return [None] + (triton_quant.INT4_WORDS_SWEEP if bits == 4 else triton_quant.INT8_WORDS_SWEEP)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("n,k", [(4096, 4096), (1024, 14336), (16384, 4096), (384, 96 * 32)])
def test_words_gemv_bf16(bits, n, k):
    """Every sweep tile at one shape, the defaults (wide and narrow) at the others; every layout the
    word GEMV takes (4-bit: HF groups of 128 / 32, Q4_0 / Q4_1 / Q4_K, no offsets; 8-bit: per
    channel, Q8_0, groups of 128)."""
    quant_w4_checks.check_gemv(n, k, "cuda", torch.bfloat16, tol=1.5e-2, bits=bits,
                               configs=_word_configs(bits) if (n, k) == (4096, 4096) else [None])


@pytest.mark.parametrize("bits", [4, 8])
def test_words_gemv_fp32_fp16(bits):
    quant_w4_checks.check_gemv(512, 1024, "cuda", torch.float32, tol=1e-5, bits=bits,
                               configs=_word_configs(bits)[: None if bits == 4 else 4])
    quant_w4_checks.check_gemv(512, 1024, "cuda", torch.float16, tol=2e-3, bits=bits)


@pytest.mark.parametrize("bits", [4, 8])
def test_words_epilogues(bits):
    check = functools.partial(quant_w4_checks.check_silu, bits=bits)
    check(2048, 4096, "cuda", torch.bfloat16, tol=1.5e-2, configs=_word_configs(bits)[:4])
    check(8192, 4096, "cuda", torch.bfloat16, tol=1.5e-2)  # the wide default
    check(256, 512, "cuda", torch.float32, tol=1e-5)
    rope_cfgs = _WORD_ROPE_CFGS[bits]
    quant_w4_checks.check_rope("cuda", torch.bfloat16, tol=1.5e-2, hq=32, hkv=8, d=128, k=4096, configs=rope_cfgs,
                               bits=bits)
    quant_w4_checks.check_rope("cuda", torch.float32, tol=1e-5, configs=rope_cfgs, bits=bits)
    quant_w4_checks.check_env_switch("cuda", bits=bits)


@pytest.mark.parametrize("bits", [4, 8])
def test_words_in_cuda_graph(bits):
    """Captured with the word decode, replayed on new activations: the same as a direct call."""
    from kvserve.kernels import triton_quant

    qw = quant_w4_checks.word_formats(bits, 4096, 4096, "cuda")["int4-g128" if bits == 4 else "int8"]
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    out = triton_quant.qgemv(x, qw, words=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = triton_quant.qgemv(x, qw, words=True)
    x.copy_(torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16))
    graph.replay()
    assert torch.equal(out, triton_quant.qgemv(x, qw, words=True))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_engine_words_matches_reference(monkeypatch, tiny_model_factory, tmp_path, arch, bits):
    monkeypatch.setenv(f"KVSERVE_INT{bits}_GEMV", "words")
    scheme = f"int{bits}"
    folder, _ = tiny_model_factory(arch)
    cpu = LLM(str(quant_checks.dequantized_folder(folder, scheme, tmp_path / "deq")), device="cpu", dtype="float32",
              **COMMON)
    want = [o.outputs[0].token_ids for o in _greedy(cpu)]
    for graphs in (True, False):
        gpu = LLM(str(folder), device="cuda", dtype="float32", quantization=scheme, enforce_eager=not graphs, **COMMON)
        assert [o.outputs[0].token_ids for o in _greedy(gpu)] == want, (arch, graphs)
        del gpu


@pytest.mark.parametrize("fmt", ["Q4_0", "Q4_1", "Q4_K", "Q8_0"])
def test_engine_gguf_words_matches_dequantized(monkeypatch, tmp_path, fmt):
    from tests.models.test_ggml_quantized import _write

    bits = 8 if fmt == "Q8_0" else 4
    monkeypatch.setenv(f"KVSERVE_INT{bits}_GEMV", "words")
    path = _write(tmp_path / f"m-{fmt}.gguf", fmt)
    cpu = LLM(str(path), device="cpu", dtype="float32", quantization="none", **COMMON)
    want = [o.outputs[0].token_ids for o in _greedy(cpu)]
    gpu = LLM(str(path), device="cuda", dtype="float32", quantization="gguf", **COMMON)
    assert gpu.engine.runner.model.layers[0].mlp.gate_up_proj.qweight.kind == f"int{bits}"
    assert [o.outputs[0].token_ids for o in _greedy(gpu)] == want


# -- FP8 activations written by the norm / SiLU·mul kernels (KVSERVE_FP8_FUSED_ACT=1) ----------
@pytest.mark.skipif(not FP8, reason="FP8 needs compute capability 8.9+")
@pytest.mark.parametrize("t,h,inter", [(300, 4096, 14336), (257, 1024, 3072), (65, 2048, 8192)])
def test_fp8_act_kernels_bf16(t, h, inter):
    fp8_act_checks.check_norms(t, h, "cuda", torch.bfloat16)
    fp8_act_checks.check_silu(t, inter, "cuda", torch.bfloat16)


@pytest.mark.skipif(not FP8, reason="FP8 needs compute capability 8.9+")
def test_fp8_act_ops_and_method(monkeypatch):
    """The ops write the pair only above `fp8_act_rows` rows; the FP8 layer uses it (no
    act_quant_fp8 launch) and gets the same output bits as quantizing itself."""
    from kvserve.kernels import triton_quant
    from kvserve.models import fused_ops
    from kvserve.models.linear import Linear
    from kvserve.platform.cuda_quant import FP8_QMM_MAX_ROWS, CudaQuantLinearMethod

    fp8_act_checks.check_ops("cuda", torch.bfloat16)
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    layer = Linear(1024, 3072, False, CudaQuantLinearMethod("fp8", dev, torch.bfloat16))
    layer.load_shard(torch.randn(3072, 1024, device=dev, generator=g) * 0.05)
    layer.method.finish(layer)
    w = torch.randn(1024, device=dev, generator=g).bfloat16()
    x = torch.randn(FP8_QMM_MAX_ROWS + 100, 1024, device=dev, generator=g).bfloat16()
    plain = fused_ops.rmsnorm(x, w, 1e-6)
    want = layer(plain)
    calls = []
    real = triton_quant.act_quant_fp8
    monkeypatch.setattr(triton_quant, "act_quant_fp8", lambda t: calls.append(t.shape) or real(t))
    fused = fused_ops.rmsnorm_fp8(x, w, 1e-6)
    assert torch.equal(layer(fused), want) and not calls
    layer(plain)
    assert calls == [plain.shape]  # without the pair the layer quantizes itself


@pytest.mark.skipif(not FP8, reason="FP8 needs compute capability 8.9+")
def test_engine_fp8_fused_act_same_tokens(tiny_model_factory, monkeypatch):
    """bf16, fp8 weights: greedy tokens with KVSERVE_FP8_FUSED_ACT=1 equal those without (eager
    and CUDA graphs), with prefills and decode batches past FP8_QMM_MAX_ROWS rows; eager, the
    fused engine launches fewer act_quant_fp8 (only the o_proj and LM head ones are left)."""
    import random

    from kvserve.kernels import triton_quant

    folder, _ = tiny_model_factory("llama")
    rng = random.Random(7)
    prompts = [{"prompt_token_ids": [rng.randrange(3, 500) for _ in range(rng.randrange(4, 40))]} for _ in range(96)]
    sp = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    real = triton_quant.act_quant_fp8
    calls = []
    monkeypatch.setattr(triton_quant, "act_quant_fp8", lambda t: calls.append(t.shape) or real(t))
    runs = {}
    for fused in ("0", "1"):
        monkeypatch.setenv("KVSERVE_FP8_FUSED_ACT", fused)
        for graphs in (False, True):
            calls.clear()
            llm = LLM(str(folder), device="cuda", dtype="bfloat16", quantization="fp8", enforce_eager=not graphs,
                      max_model_len=256, max_num_seqs=128)
            ops = llm.engine.runner.model.layers[0].input_layernorm.ops
            assert (ops.fp8_act_rows is not None) == (fused == "1")
            runs[fused, graphs] = ([o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)],
                                   len(calls))
            del llm
    assert runs["1", False][0] == runs["0", False][0]
    assert runs["1", True][0] == runs["0", True][0]
    assert 0 < runs["1", False][1] < runs["0", False][1]


# -- the half-math GEMVs (KVSERVE_INT4_GEMV / KVSERVE_INT8_GEMV=half; opt-in until timed) --------
from tests.gpu import quant_half_checks  # noqa: E402


def _half_configs():
    from kvserve.kernels import triton_qgemv_half

    return [None] + triton_qgemv_half.HALF_SWEEP


@pytest.mark.parametrize("n,k", [(4096, 4096), (1024, 14336), (16384, 4096), (384, 96 * 32), (100, 4000)])
def test_half_gemv(n, k):
    """Every sweep tile at one shape, the default at the others (a last partial K step: 14336 and
    3072 columns, 4000 = 125 blocks); every 4-bit and int8 layout; bf16 and fp16; the activation
    pairs."""
    quant_half_checks.check_gemv(n, k, "cuda", torch.bfloat16, tol=1e-2,
                               configs=_half_configs() if (n, k) == (4096, 4096) else [None])
    quant_half_checks.check_gemv(n, k, "cuda", torch.float16, tol=2e-3)
    quant_half_checks.check_pairs("cuda")


def test_half_epilogues_switch_and_graph():
    quant_half_checks.check_silu(2048, 4096, "cuda", torch.bfloat16, tol=1.5e-2, configs=_half_configs()[:4])
    quant_half_checks.check_silu(512, 1024, "cuda", torch.float16, tol=2e-3)
    quant_half_checks.check_env_switch("cuda")
    quant_half_checks.check_norm_pairs("cuda")
    quant_half_checks.check_rope("cuda", torch.bfloat16, tol=1.5e-2, hq=32, hkv=8, d=128, k=4096,
                                 configs=[None, (1, 128, 4, False), (4, 64, 2, True), (8, 32, 1, False)])
    quant_half_checks.check_rope("cuda", torch.float16, tol=2e-3)
    from kvserve.kernels import triton_qgemv_half

    qw = quant_half_checks.int4_formats(4096, 4096, "cuda")["int4-g128"]
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    out = triton_qgemv_half.qgemv_half(x, qw)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = triton_qgemv_half.qgemv_half(x, qw)
    x.copy_(torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16))
    graph.replay()
    assert torch.equal(out, triton_qgemv_half.qgemv_half(x, qw))


@pytest.mark.parametrize("scheme", ["int4", "int8"])
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_engine_half_logprobs_near_dequantized(monkeypatch, tiny_model_factory, tmp_path, arch, scheme):
    """bf16 engine with the half-math GEMV: logprobs near the dequantized bf16 model's, CUDA
    graphs on and off; eagerly, products after a norm take the pairs the norm wrote."""
    monkeypatch.setenv(f"KVSERVE_INT{scheme[-1]}_GEMV", "half")
    folder, _ = tiny_model_factory(arch)
    ref = LLM(str(quant_checks.dequantized_folder(folder, scheme, tmp_path / "deq")), device="cuda", dtype="bfloat16",
              **COMMON)
    a = _greedy(ref, logprobs=3)
    del ref
    from kvserve.kernels import triton_qgemv_half

    given = []  # eager run: whether each half-math product got its activation pairs from the norm
    pairs_of = triton_qgemv_half.pairs_of
    monkeypatch.setattr(triton_qgemv_half, "pairs_of", lambda x, pairs: given.append(pairs is not None) or
                        pairs_of(x, pairs))
    for graphs in (True, False):
        q = LLM(str(folder), device="cuda", dtype="bfloat16", quantization=scheme, enforce_eager=not graphs, **COMMON)
        given.clear()
        for ra, rb in zip(a, _greedy(q, logprobs=3)):
            first_a, first_b = ra.outputs[0].logprobs[0], rb.outputs[0].logprobs[0]
            common = set(first_a) & set(first_b)
            assert common
            for t in common:
                assert abs(first_a[t].logprob - first_b[t].logprob) < 0.15, (arch, graphs)
        if not graphs:  # qkv and gate/up (and, int8, the head) read the norm's pairs; o and down make theirs
            assert any(given) and not all(given), given[:12]
        del q
