"""GGUF quantized weights kept quantized (`platform/ggml_linear.py`, `platform/ggml_stack.py`):
each format's engine output against the same file dequantized to fp32 (the reference), the
one-call decoder stack against the op-by-op layers, the plain-C build against the native one,
HF checkpoints quantized at load, and the built-in model."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as Q

from kvserve import LLM, SamplingParams
from kvserve.kernels import cpu_quant
from kvserve.models.linear import DenseLinearMethod, Linear
from kvserve.platform.ggml_linear import GGMLEmbedding, GGMLLinearMethod
from tests.conftest import requires_smollm2
from tests.kernels.test_cpu_quant import random_weight
from tests.models.test_gguf import MERGES, _finish, _tiny_vocab

FORMATS = ["Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K"]
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, LAYERS = 256, 4, 2, 64, 512, 2
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=2)
# The reference is the same file dequantized to fp32, with each projection's input rounded to
# 8-bit blocks as the integer kernels round it (~0.5% relative error per product, as in
# llama.cpp): what remains between the two is summation order, and the 8-bit rounding steps it
# can tip over. Random models amplify both (without the rounding in the reference, a random
# Q6_K model's logprobs differ by up to 6), so the rounding must be in the reference.
REF_TOL = 0.05
# Paths that share the block arithmetic (one-call stack vs layers, plain-C vs native builds):
# they differ in summation order (and the stack's attention is its own C loop), which can tip
# an activation's 8-bit rounding at a random model's logit scale: ~1e-3 seen.
SAME_TOL = 5e-3
PROMPTS = [{"prompt_token_ids": [5, 9, 13, 40, 7]}, {"prompt_token_ids": list(range(20, 58))}]


def _write(path: Path, fmt: str, mixed: bool = False) -> Path:
    """A 2-layer Llama GGUF whose projections are all `fmt` blocks (with `mixed`, as a Q4_K_M
    file: v in Q6_K, down in Q8_0), a Q8_0 tied embedding and random fp32 norms."""
    rng = np.random.default_rng(FORMATS.index(fmt))
    tokens, types = _tiny_vocab()
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(LAYERS)
    w.add_context_length(512)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(0)
    w.add_eos_token_id(2)
    embed = (0.3 * rng.standard_normal((len(tokens), HIDDEN))).astype(np.float32)  # logits of a few units
    w.add_tensor("token_embd.weight", gguf.quants.quantize(embed, Q.Q8_0), raw_dtype=Q.Q8_0)
    w.add_tensor("output_norm.weight", (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32))
    seed = 0
    for i in range(LAYERS):
        shapes = {
            "attn_q": (HEADS * HEAD_DIM, HIDDEN), "attn_k": (KV_HEADS * HEAD_DIM, HIDDEN),
            "attn_v": (KV_HEADS * HEAD_DIM, HIDDEN), "attn_output": (HIDDEN, HEADS * HEAD_DIM),
            "ffn_gate": (FFN, HIDDEN), "ffn_up": (FFN, HIDDEN), "ffn_down": (HIDDEN, FFN),
        }
        for name, (rows, cols) in shapes.items():
            kind = {"attn_v": "Q6_K", "ffn_down": "Q8_0"}.get(name, fmt) if mixed else fmt
            seed += 1
            raw = random_weight(kind, rows, cols, seed=seed).numpy()
            w.add_tensor(f"blk.{i}.{name}.weight", raw, raw_dtype=Q[kind])  # [rows, row_bytes]
        for name in ("attn_norm", "ffn_norm"):
            w.add_tensor(f"blk.{i}.{name}.weight", (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32))
    _finish(w)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("ggml")
    out = {fmt: _write(folder / f"tiny-{fmt}.gguf", fmt) for fmt in FORMATS}
    out["mixed"] = _write(folder / "tiny-mixed.gguf", "Q4_K", mixed=True)
    return out


def _llm(path: Path, **kw) -> LLM:
    return LLM(str(path), device="cpu", num_kv_blocks=64, **kw)


class _Int8Reference(DenseLinearMethod):
    """fp32 dense product of the input rounded like the int8 path (below `min_rows`, the row
    count from which `cpu_quant.linear` dequantizes the weight and skips the rounding: see
    `cpu_quant.dequant_min_rows`, which depends on the format and the loaded build)."""

    def __init__(self, min_rows: float = cpu_quant.DEQUANT_MIN_ROWS) -> None:
        super().__init__()
        self.min_rows = min_rows

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, layer.in_features)
        if x2.shape[0] < self.min_rows:
            x2 = cpu_quant.quantize_act_reference(x2)
        return F.linear(x2, layer.weight, layer.bias).view(*x.shape[:-1], layer.out_features)


def _reference(path: Path, int8: bool = True) -> LLM:
    """The file dequantized to fp32 (`quantization="none"`), rounding activations as above."""
    llm = _llm(path, quantization="none", dtype="float32")
    linears = [m for m in llm.engine.runner.model.modules() if isinstance(m, Linear)]
    assert linears and all(m.weight is not None for m in linears)
    if int8:
        for m in linears:
            m.method = _Int8Reference()
    return llm


def _assert_close_runs(got, want, logprob_tol: float) -> None:
    """Same greedy tokens until the reference's top-two margin is within the tolerance (a
    near-tie the quantized activations may flip), with close logprobs along the way."""
    for a, b in zip(got, want):
        checked = 0
        for tok_a, tok_b, lp_a, lp_b in zip(a.outputs[0].token_ids, b.outputs[0].token_ids,
                                            a.outputs[0].logprobs, b.outputs[0].logprobs):
            top = sorted((v.logprob for v in lp_b.values()), reverse=True)
            if len(top) > 1 and top[0] - top[1] < logprob_tol:
                break
            assert tok_a == tok_b
            assert abs(lp_a[tok_a].logprob - lp_b[tok_b].logprob) < logprob_tol
            checked += 1
        assert checked >= 3, "too few tokens compared: a near-tie at the start"


@pytest.mark.parametrize("fmt", FORMATS)
def test_format_matches_dequantized_reference(files, fmt):
    llm = _llm(files[fmt])
    model = llm.engine.runner.model
    assert llm.engine.loaded.dtype == torch.float32
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert all(isinstance(m.method, GGMLLinearMethod) and m.weight is None for m in linears)
    assert {p.qtype for m in model.layers.modules() if isinstance(m, Linear) for p in m.parts} == {cpu_quant.QTYPES[fmt]}
    assert isinstance(model.embed_tokens, GGMLEmbedding) and model.embed_tokens.qtype == 8
    assert model.lm_head.parts[0].data is model.embed_tokens.data  # tied: one copy
    ref = _reference(files[fmt])
    _assert_close_runs(llm.generate(PROMPTS, GREEDY, use_tqdm=False), ref.generate(PROMPTS, GREEDY, use_tqdm=False), REF_TOL)


def test_mixed_formats_like_q4_k_m(files):
    llm = _llm(files["mixed"])
    attn = llm.engine.runner.model.layers[0].self_attn
    assert [p.qtype for p in attn.qkv_proj.parts] == [12, 12, 14]
    ref = _reference(files["mixed"])
    _assert_close_runs(llm.generate(PROMPTS, GREEDY, use_tqdm=False), ref.generate(PROMPTS, GREEDY, use_tqdm=False), REF_TOL)


@pytest.mark.parametrize("fmt", ["Q4_1", "Q6_K"])
def test_one_call_stack_equals_op_by_op(files, fmt):
    llm = _llm(files[fmt])
    model = llm.engine.runner.model
    fast = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    stack = model.cpu_decoder
    assert stack and stack.num_steps >= GREEDY.max_tokens - 1, "decode steps did not use the stack"
    model.cpu_decoder = False
    slow = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    _assert_close_runs(fast, slow, SAME_TOL)


def test_plain_c_build_matches_native(files, monkeypatch):
    """The baseline (plain C) build, forced on any machine, gives the native build's tokens."""
    native = _llm(files["Q4_K"]).generate(PROMPTS, GREEDY, use_tqdm=False)
    monkeypatch.setenv("KVSERVE_CPU_ISA", "baseline")
    assert cpu_quant.isa_level() == "baseline"
    llm = _llm(files["Q4_K"])
    assert llm.engine.platform.level == "baseline"
    _assert_close_runs(llm.generate(PROMPTS, GREEDY, use_tqdm=False), native, SAME_TOL)


def test_pytorch_fallback_without_kernels(files, monkeypatch):
    """KVSERVE_CPU_KERNELS=0 (or no compiler): the blocks stay quantized and PyTorch multiplies
    them dequantized (no activation rounding), which is the plain fp32 reference."""
    want = _reference(files["Q4_K"], int8=False).generate(PROMPTS, GREEDY, use_tqdm=False)
    monkeypatch.setenv("KVSERVE_CPU_KERNELS", "0")
    llm = _llm(files["Q4_K"])
    got = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert not llm.engine.runner.model.cpu_decoder
    _assert_close_runs(got, want, 1e-3)


@pytest.mark.parametrize("quant,qtype,tol", [("q8_0", 8, 0.01), ("q4_0", 2, 0.1)])
def test_hf_checkpoint_quantized_at_load(tiny_model_factory, quant, qtype, tol):
    """--quantization q8_0 | q4_0 on a safetensors model: projections in that format, embedding
    and head in Q8_0, teacher-forced logprobs near the fp32 model's (4-bit moves them more)."""
    folder, _ = tiny_model_factory("llama")
    llm = LLM(str(folder), device="cpu", num_kv_blocks=64, quantization=quant)
    model = llm.engine.runner.model
    parts = [p for m in model.layers.modules() if isinstance(m, Linear) for p in m.parts]
    assert parts and {p.qtype for p in parts} == {qtype}
    assert model.embed_tokens.qtype == 8 and {p.qtype for p in model.lm_head.parts} == {8}
    ref = LLM(str(folder), device="cpu", num_kv_blocks=64, dtype="float32")
    score = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
    prompt = [{"prompt_token_ids": [(7 * i + 3) % 500 + 1 for i in range(40)]}]
    got = llm.generate(prompt, score, use_tqdm=False)[0].prompt_logprobs[1:]
    want = ref.generate(prompt, score, use_tqdm=False)[0].prompt_logprobs[1:]
    diffs = [abs(next(iter(a.values())).logprob - next(iter(b.values())).logprob) for a, b in zip(got, want)]
    assert sum(diffs) / len(diffs) < tol, (quant, sum(diffs) / len(diffs), max(diffs))


def test_bad_quantization_is_a_value_error(tiny_llama):
    with pytest.raises(ValueError, match="quantization"):
        LLM(str(tiny_llama[0]), device="cpu", quantization="q3_k")


@requires_smollm2
@pytest.mark.slow
def test_builtin_model_kept_quantized_says_paris():
    """The built-in Q4_1 GGUF with every default: blocks kept (one copy, views of the file),
    fp32 activations where bf16 is not native, and the expected greedy answer."""
    llm = LLM("smollm2", device="cpu")
    model = llm.engine.runner.model
    kinds = {p.qtype for m in model.modules() if isinstance(m, Linear) for p in m.parts}
    assert kinds == {3, 8}  # Q4_1 projections, the Q8_0 embedding as the tied head
    out = llm.generate("The capital of France is", SamplingParams(max_tokens=3, temperature=0), use_tqdm=False)
    assert out[0].outputs[0].text.startswith(" Paris.")
    assert model.cpu_decoder and model.cpu_decoder.num_steps >= 1


@pytest.mark.parametrize("name", ["Q4_1", "mixed"])
def test_prefill_rows_dequantize_to_the_reference(files, name, monkeypatch):
    """From DEQUANT_MIN_ROWS rows a projection's parts are dequantized into one fp32 matrix and
    multiplied without activation rounding: a long prompt's logprobs equal the plain fp32
    reference's (only sgemm's blocking may differ). The threshold is pinned for every format:
    the AVX-512 VNNI build never leaves the int8 path for Q4_0 / Q4_1 / Q5_0."""
    monkeypatch.setattr(cpu_quant, "dequant_min_rows", lambda qtype, lib=None: cpu_quant.DEQUANT_MIN_ROWS)
    score = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
    prompt = [{"prompt_token_ids": [(11 * i + 5) % 250 + 3 for i in range(cpu_quant.DEQUANT_MIN_ROWS + 16)]}]
    got = _llm(files[name]).generate(prompt, score, use_tqdm=False)[0].prompt_logprobs[1:]
    want = _reference(files[name], int8=False).generate(prompt, score, use_tqdm=False)[0].prompt_logprobs[1:]
    diffs = [abs(next(iter(a.values())).logprob - next(iter(b.values())).logprob) for a, b in zip(got, want)]
    assert max(diffs) < 1e-3
