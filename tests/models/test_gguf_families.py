"""GGUF files of Qwen3-MoE, Mixtral and Phi-3 / Phi-4-mini, written as llama.cpp's converter lays
them out from tiny random HF models: greedy tokens equal HF transformers in fp32 on the same
weights, batched and one at a time.

- F32 files against HF on the original weights (Qwen3-MoE with and without renormalized top-k and
  a dense layer; Mixtral with stacked `ffn_*_exps` experts, Q/K rows permuted as llama.cpp does,
  and an old file with one tensor per expert; Phi-3 with fused `attn_qkv` / `ffn_up` and a
  sliding window; Phi-4-mini-style LongRoPE from `rope_factors_long/short` with partial rotary).
- F16 / BF16 files against HF on the weights rounded to those types.
- Q8_0 / Q4_0 files: the experts' blocks stay quantized (each expert's `Linear` takes the GGML
  linear method, its parts views of its rows of the stacked tensor), against the same file
  dequantized with activations rounded as the integer kernels round them; the dequantized file
  (`quantization="none"`) against HF on the dequantized weights.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from kvserve import LLM, SamplingParams
from kvserve.kernels import cpu_quant
from kvserve.loader.gguf import GGUFFile, load_gguf_config
from kvserve.models.linear import DenseLinearMethod, Linear
from tests.conftest import TINY_VOCAB, _save_tokenizer
from tests.models.test_ggml_quantized import _Int8Reference
from tests.models.test_gguf import MERGES, _finish, _llama_cpp_permute, _tiny_vocab
from tests.models.test_parity import NEW_TOKENS, _prompts, assert_batched_and_alone_match_hf, hf_greedy

ORIGINAL_MAX = 48  # Phi-4-mini-style LongRoPE's switch point (the prompts cross it)

# HF layer names (after `model.layers.N.`) -> llama.cpp's (after `blk.N.`).
_LAYER = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "mlp.gate": "ffn_gate_inp", "block_sparse_moe.gate": "ffn_gate_inp",
}
_EXPERT = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}


def _hf_model(kind: str, folder: Path):
    """A tiny random HF model of `kind`, weights scaled so routing and tokens are not flat, saved
    (legacy per-expert tensor names) with a tokenizer to `folder`."""
    import transformers as tf

    common = dict(vocab_size=TINY_VOCAB, max_position_embeddings=512, eos_token_id=2, bos_token_id=1, pad_token_id=0)
    moe = dict(common, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    if kind == "qwen3_moe":  # renormalized top-2 of 6; layer 1 dense
        cfg = tf.Qwen3MoeConfig(**moe, intermediate_size=96, moe_intermediate_size=32, head_dim=16, num_experts=6,
                                num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[1])
    elif kind == "qwen3_moe_raw":  # top-3 of 5 weights as the softmax gives them
        cfg = tf.Qwen3MoeConfig(**moe, intermediate_size=96, moe_intermediate_size=32, head_dim=16, num_experts=5,
                                num_experts_per_tok=3, norm_topk_prob=False)
    elif kind == "qwen3_moe_tf":  # what transformers' GGUF reader can rebuild (its default widths)
        cfg = tf.Qwen3MoeConfig(**dict(moe, num_hidden_layers=1), intermediate_size=96, moe_intermediate_size=768,
                                head_dim=128, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True)
    elif kind.startswith("mixtral"):
        cfg = tf.MixtralConfig(**moe, intermediate_size=32, num_local_experts=5, num_experts_per_tok=2,
                               sliding_window=None)
    else:  # phi3: 3 query heads over 1 KV head; phi4: LongRoPE and 0.75 partial rotary
        phi = dict(common, hidden_size=96, intermediate_size=128, num_hidden_layers=2, num_attention_heads=3,
                   num_key_value_heads=1, sliding_window=8 if kind == "phi3" else None)
        if kind == "phi3_tp":  # heads that split two ways
            phi.update(hidden_size=128, num_attention_heads=4, num_key_value_heads=2)
        if kind == "phi4":
            phi.update(partial_rotary_factor=0.75, original_max_position_embeddings=ORIGINAL_MAX, rope_parameters={
                "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                "original_max_position_embeddings": ORIGINAL_MAX,
                "short_factor": [1.0 + 0.05 * i for i in range(12)], "long_factor": [1.0 + 0.5 * i for i in range(12)],
            })
        cfg = tf.Phi3Config(**phi)
    torch.manual_seed(0)
    hf = tf.AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.dim() >= 2:
                p.mul_(8.0 if "lm_head" in name else 4.0 if "emb" in name else 2.0)  # sharp logits
            elif "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
    hf.save_pretrained(folder)
    _save_tokenizer(folder)
    return hf


def _state(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return {k: v.astype(np.float32) for k, v in load_file(str(folder / "model.safetensors")).items()}


def _store(x: np.ndarray, qtype: Q) -> tuple[np.ndarray, np.ndarray]:
    """(the array written to the file, its values as read back) for one tensor in `qtype`."""
    if qtype == Q.F32:
        return x, x
    if qtype == Q.F16:
        return x.astype(np.float16), x.astype(np.float16).astype(np.float32)
    if qtype == Q.BF16:
        bits = torch.from_numpy(x).bfloat16().view(torch.int16).numpy().view(np.uint16)
        return bits, torch.from_numpy(x).bfloat16().float().numpy()
    raw = gguf.quants.quantize(x, qtype)
    return raw, gguf.quants.dequantize(raw, qtype).astype(np.float32)


def _write_gguf(kind: str, folder: Path, path: Path, formats: dict[str, Q] | None = None,
                stacked: bool = True) -> dict[str, np.ndarray]:
    """The HF checkpoint in `folder` as a llama.cpp GGUF at `path`. `formats` picks each matrix's
    type by its role ("attn", "mlp", "experts"; F32 when absent; norms, router, embedding and
    head stay F32, as llama.cpp keeps the router). Returns the HF state as the file holds it."""
    hf_cfg = json.loads((folder / "config.json").read_text())
    arch = "phi3" if kind.startswith(("phi3", "phi4")) else "qwen3moe" if kind.startswith("qwen3_moe") else "llama"
    formats = formats or {}
    state = _state(folder)
    read_back = dict(state)
    heads, kv_heads = hf_cfg["num_attention_heads"], hf_cfg["num_key_value_heads"]
    head_dim = hf_cfg.get("head_dim") or hf_cfg["hidden_size"] // heads

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(hf_cfg["num_hidden_layers"])
    w.add_context_length(hf_cfg["max_position_embeddings"])
    w.add_embedding_length(hf_cfg["hidden_size"])
    w.add_feed_forward_length(hf_cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(hf_cfg["rms_norm_eps"])
    w.add_rope_freq_base(hf_cfg.get("rope_theta") or hf_cfg["rope_parameters"]["rope_theta"])
    if arch == "phi3":  # llama.cpp's Phi-3 converter: rotary dims, sliding window (0: none)
        rope = hf_cfg.get("rope_parameters") or {}
        w.add_rope_dimension_count(int(head_dim * hf_cfg.get("partial_rotary_factor", 1.0)))
        w.add_sliding_window(hf_cfg.get("sliding_window") or 0)
        if rope.get("rope_type") == "longrope":
            orig = rope["original_max_position_embeddings"]
            w.add_rope_scaling_orig_ctx_len(orig)
            scale = hf_cfg["max_position_embeddings"] / orig
            w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(orig)))
            w.add_tensor("rope_factors_long.weight", np.array(rope["long_factor"], np.float32))
            w.add_tensor("rope_factors_short.weight", np.array(rope["short_factor"], np.float32))
    else:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        experts = hf_cfg.get("num_experts") or hf_cfg.get("num_local_experts")
        w.add_expert_count(experts)
        w.add_expert_used_count(hf_cfg["num_experts_per_tok"])
        if arch == "qwen3moe":
            w.add_expert_feed_forward_length(hf_cfg["moe_intermediate_size"])
            if not hf_cfg["norm_topk_prob"]:
                w.add_expert_weights_norm(False)
    tokens, _ = _tiny_vocab()
    tokens += [f"<t{i}>" for i in range(TINY_VOCAB - len(tokens))]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * TINY_VOCAB)  # all normal: HF may sample any id, so may we
    w.add_token_merges(MERGES)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)

    def put(gname: str, hf_names: list[str], role: str | None, permute: int = 0) -> None:
        x = np.stack([state[n] for n in hf_names]) if len(hf_names) > 1 or gname.endswith("_exps.weight") else state[hf_names[0]]
        qtype = formats.get(role, Q.F32) if role is not None else Q.F32
        raw, back = _store(x, qtype)
        for i, n in enumerate(hf_names):
            read_back[n] = back[i] if back.ndim == 3 else back
        if permute:  # llama.cpp's row order for Q/K (rows are quantized independently)
            raw = _llama_cpp_permute(raw, permute)
        w.add_tensor(gname, raw, raw_dtype=qtype if qtype not in (Q.F32, Q.F16) else None)

    put("token_embd.weight", ["model.embed_tokens.weight"], None)
    put("output_norm.weight", ["model.norm.weight"], None)
    if "lm_head.weight" in state and not hf_cfg.get("tie_word_embeddings"):
        put("output.weight", ["lm_head.weight"], None)
    experts: dict[tuple[str, str], dict[int, str]] = {}
    for name in state:
        if not name.startswith("model.layers."):
            continue
        layer, rest = name[len("model.layers."):].split(".", 1)
        module = rest.rsplit(".", 1)[0]
        if ".experts." in rest:  # ...experts.E.proj.weight
            e, proj = rest.split(".experts.")[1].split(".")[:2]
            experts.setdefault((layer, _EXPERT[proj]), {})[int(e)] = name
            continue
        role = None if "norm" in module or module.endswith(".gate") else "attn" if "self_attn" in module else "mlp"
        permute = 0
        if arch == "llama" and module in ("self_attn.q_proj", "self_attn.k_proj"):
            permute = heads if module.endswith("q_proj") else kv_heads
        put(f"blk.{layer}.{_LAYER[module]}.weight", [name], role, permute)
    for (layer, proj), by_index in experts.items():
        names = [by_index[e] for e in sorted(by_index)]
        if stacked:
            put(f"blk.{layer}.ffn_{proj}_exps.weight", names, "experts")
        else:  # Mixtral files from before llama.cpp stacked experts
            for e, n in enumerate(names):
                put(f"blk.{layer}.ffn_{proj}.{e}.weight", [n], "experts")
    _finish(w)
    return read_back


def _reference_model(folder: Path, state: dict[str, np.ndarray], out: Path):
    """HF on `state` (weights as a GGUF file holds them), via a copy of `folder`."""
    import transformers as tf
    from safetensors.numpy import save_file

    out.mkdir()
    shutil.copy(folder / "config.json", out / "config.json")
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(out / "model.safetensors"))
    return tf.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()


def _int8_reference(path: Path, quantized: LLM) -> LLM:
    """The file dequantized to fp32, each projection that `quantized` multiplies from GGML blocks
    rounding its input to 8-bit blocks as the integer kernels do (the router and the F32 head
    stay exact in both)."""
    ref = LLM(str(path), quantization="none", dtype="float32", device="cpu", num_kv_blocks=64)
    # each projection's rows from which it dequantizes (and stops rounding its input), as
    # `ggml_linear` takes it: the lowest of its quantized parts' `cpu_quant.dequant_min_rows`
    blocks = {n: min(cpu_quant.dequant_min_rows(p.qtype) for p in m.parts if p.qtype)
              for n, m in quantized.engine.runner.model.named_modules()
              if isinstance(m, Linear) and any(p.qtype for p in getattr(m, "parts", None) or [])}
    for n, m in ref.engine.runner.model.named_modules():
        if n in blocks:
            m.method = _Int8Reference(blocks[n])
    return ref


def _assert_close_runs(got, want, tol: float) -> None:
    """Same greedy tokens and logprobs within `tol` until the reference's top-two margin falls
    below `tol` (a near-tie 8-bit activations may flip); most tokens must be compared."""
    checked = total = 0
    for a, b in zip(got, want):
        total += len(b.outputs[0].token_ids)
        for tok_a, tok_b, lp_a, lp_b in zip(a.outputs[0].token_ids, b.outputs[0].token_ids,
                                            a.outputs[0].logprobs, b.outputs[0].logprobs):
            top = sorted((v.logprob for v in lp_b.values()), reverse=True)
            if top[0] - top[1] < tol:
                break
            assert tok_a == tok_b
            assert abs(lp_a[tok_a].logprob - lp_b[tok_b].logprob) < tol
            checked += 1
    assert checked >= total // 4, f"only {checked} of {total} tokens compared (near-ties)"


def _check_hf(llm: LLM, hf, prompts: list[list[int]], alone: int | None = 2) -> None:
    refs = [hf_greedy(hf, p, NEW_TOKENS) for p in prompts]
    assert_batched_and_alone_match_hf(llm, prompts, refs, alone=alone)


def _long_prompts() -> list[list[int]]:
    """Prompts within and past Phi-4-mini-style LongRoPE's original length."""
    import random

    rng = random.Random(7)
    return [[rng.randrange(3, TINY_VOCAB) for _ in range(n)] for n in (5, ORIGINAL_MAX - NEW_TOKENS, ORIGINAL_MAX + 12)]


F32_CASES = ["qwen3_moe", "qwen3_moe_raw", "mixtral", "mixtral_per_expert", "phi3", "phi4"]


@pytest.mark.parametrize("kind", F32_CASES)
def test_f32_gguf_matches_hf(kind, tmp_path):
    from kvserve.models.moe import SparseMoE

    hf = _hf_model(kind, tmp_path / "hf")
    path = tmp_path / f"{kind}.gguf"
    _write_gguf(kind, tmp_path / "hf", path, stacked=kind != "mixtral_per_expert")
    cfg = load_gguf_config(path)
    want = {"qwen3_moe": "Qwen3MoeForCausalLM", "mixtral": "MixtralForCausalLM", "phi3": "Phi3ForCausalLM"}
    assert cfg["architectures"] == [next(v for k, v in want.items() if kind.startswith(k) or (k == "phi3" and kind == "phi4"))]
    # Chunked prefill (a 24-token budget under the 40-token prompt); the one-at-a-time runs repeat
    # the batched prompts, so they start from prefix-cache hits. Not for LongRoPE: a prompt past
    # original_max whose first chunk is not would rotate that chunk with the short factors, where
    # HF uses the long ones for the whole prompt (models/phi3.py, `LongRope.long_rows`).
    chunk = {} if kind == "phi4" else {"max_num_batched_tokens": 24}
    llm = LLM(str(path), dtype="float32", device="cpu", num_kv_blocks=64, **chunk)
    model = llm.engine.runner.model
    if kind.startswith("qwen3_moe"):
        assert cfg["norm_topk_prob"] == (kind == "qwen3_moe")
        assert cfg["mlp_only_layers"] == ([1] if kind == "qwen3_moe" else [])
        assert [isinstance(l.mlp, SparseMoE) for l in model.layers] == [True, kind != "qwen3_moe"]
        assert model.layers[0].mlp.top_k == (2 if kind == "qwen3_moe" else 3)
    elif kind.startswith("mixtral"):
        assert all(isinstance(l.mlp, SparseMoE) and l.mlp.renorm for l in model.layers)
    elif kind == "phi3":
        assert model.layers[0].self_attn.sliding_window == 8 and "rope_scaling" not in cfg
    else:
        assert cfg["rope_scaling"]["rope_type"] == "longrope" and cfg["partial_rotary_factor"] == 0.75
        assert model.rotary_dim == 24 and model.rotary.mscale > 1.0
        assert model.layers[0].self_attn.sliding_window is None
    prompts = _long_prompts() if kind == "phi4" else _prompts()[1:]
    _check_hf(llm, hf, prompts)


@pytest.mark.parametrize("kind", ["qwen3_moe_tf", "phi3", "phi4"])
def test_writer_matches_transformers_gguf_reader(kind, tmp_path):
    """The files these tests write hold llama.cpp's names and layouts: transformers' own GGUF
    reader rebuilds the original weights from them exactly (it has no Mixtral mapping, and it
    ignores Phi-3's LongRoPE and rotary metadata, which the greedy tests above cover)."""
    import transformers as tf

    hf = _hf_model(kind, tmp_path)
    _write_gguf(kind, tmp_path, tmp_path / "m.gguf")
    theirs = tf.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).state_dict()
    ours = hf.state_dict()
    assert sorted(theirs) == sorted(ours)
    for name, t in ours.items():
        assert torch.equal(theirs[name], t), name


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral"])
def test_f16_bf16_gguf_matches_hf_on_rounded_weights(kind, tmp_path):
    """Attention in F16, experts in BF16 (llama.cpp's unquantized types), read as float32."""
    _hf_model(kind, tmp_path / "hf")
    path = tmp_path / f"{kind}.gguf"
    state = _write_gguf(kind, tmp_path / "hf", path, {"attn": Q.F16, "mlp": Q.F16, "experts": Q.BF16})
    hf = _reference_model(tmp_path / "hf", state, tmp_path / "ref")
    llm = LLM(str(path), dtype="float32", device="cpu", num_kv_blocks=64)
    _check_hf(llm, hf, _prompts()[1:], alone=1)


QUANT = {"attn": Q.Q8_0, "mlp": Q.Q4_0, "experts": Q.Q4_0}
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=2)
# The reference rounds activations exactly where the kernels do; what remains is summation
# order, which now and then tips one 8-bit rounding step (~1e-2 seen, most runs agree to 1e-4).
REF_TOL = 0.02


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral", "mixtral_per_expert", "phi3"])
def test_quantized_gguf_keeps_expert_blocks(kind, tmp_path):
    from kvserve.platform.ggml_linear import GGMLLinearMethod

    _hf_model(kind, tmp_path / "hf")
    path = tmp_path / f"{kind}-q.gguf"
    state = _write_gguf(kind, tmp_path / "hf", path, QUANT, stacked=kind != "mixtral_per_expert")
    llm = LLM(str(path), device="cpu", num_kv_blocks=64)
    model = llm.engine.runner.model
    layer = model.layers[0]
    if kind != "phi3":
        moe = layer.mlp
        assert isinstance(moe.gate.method, DenseLinearMethod)  # the router stays dense
        tensors = GGUFFile(path).tensors
        for e, ex in enumerate(moe.experts):
            file_bytes = (tensors["blk.0.ffn_up_exps.weight"].data[e] if "blk.0.ffn_up_exps.weight" in tensors
                          else tensors[f"blk.0.ffn_up.{e}.weight"].data)
            assert isinstance(ex.gate_up_proj.method, GGMLLinearMethod)
            assert [p.qtype for p in ex.gate_up_proj.parts] == [cpu_quant.QTYPES["Q4_0"]] * 2
            assert [p.qtype for p in ex.down_proj.parts] == [cpu_quant.QTYPES["Q4_0"]]
            # Each expert holds its rows of the stacked tensor, byte for byte.
            assert np.array_equal(ex.gate_up_proj.parts[1].data.numpy(), file_bytes)
    else:
        assert [p.qtype for p in layer.mlp.gate_up_proj.parts] == [cpu_quant.QTYPES["Q4_0"]] * 2
    assert {p.qtype for p in layer.self_attn.qkv_proj.parts} == {cpu_quant.QTYPES["Q8_0"]}

    # Kept quantized vs the same file dequantized, activations rounded like the int kernels.
    prompts = [{"prompt_token_ids": p} for p in _prompts()[1:]]
    ref = _int8_reference(path, llm)
    want = ref.generate(prompts, GREEDY, use_tqdm=False)
    _assert_close_runs(llm.generate(prompts, GREEDY, use_tqdm=False), want, REF_TOL)
    # One at a time against the reference one at a time (the rows a step rounds differ).
    alone = [[m.generate(p, GREEDY, use_tqdm=False)[0] for p in prompts] for m in (llm, ref)]
    _assert_close_runs(*alone, REF_TOL)

    # The dequantized file (per-expert dequantization) equals HF on the dequantized weights.
    dense = LLM(str(path), quantization="none", dtype="float32", device="cpu", num_kv_blocks=64)
    assert all(m.weight is not None for m in dense.engine.runner.model.modules() if isinstance(m, Linear))
    _check_hf(dense, _reference_model(tmp_path / "hf", state, tmp_path / "ref"), _prompts()[1:4], alone=1)


def test_unsupported_gguf_architecture_lists_the_new_families(tmp_path):
    path = tmp_path / "mamba.gguf"
    w = gguf.GGUFWriter(str(path), "mamba")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    _finish(w)
    with pytest.raises(ValueError, match=r"'mamba'.*supported: .*phi3.*qwen3moe.*Mixtral"):
        load_gguf_config(path)


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral", "phi3_tp"])
def test_quantized_gguf_tensor_parallel_matches_tp1(kind, tmp_path):
    """TP=2 on CPU processes: each rank takes its rows of every expert's GGML blocks (and of
    Mixtral's permuted Q/K, of Phi-3's fused qkv and gate ‖ up) and its columns of the down
    projections."""
    _hf_model(kind, tmp_path / "hf")
    path = tmp_path / f"{kind}-q.gguf"
    _write_gguf(kind, tmp_path / "hf", path, QUANT)
    prompts = [{"prompt_token_ids": p} for p in _prompts()[1:4]]
    common = dict(device="cpu", num_kv_blocks=48, max_model_len=128)
    want = LLM(str(path), **common).generate(prompts, GREEDY, use_tqdm=False)
    llm = LLM(str(path), tensor_parallel_size=2, **common)
    try:
        # Partial sums add up in another order: the 8-bit rounding may tip as against the reference.
        _assert_close_runs(llm.generate(prompts, GREEDY, use_tqdm=False), want, REF_TOL)
    finally:
        llm.engine.shutdown()


@pytest.mark.parametrize("kind", ["qwen3_moe", "phi4"])
def test_trace_cli_on_gguf(kind, tmp_path, capsys):
    """`kvserve trace` on a quantized Qwen3-MoE file and a LongRoPE Phi-4-mini-style file."""
    from kvserve.entrypoints import cli

    _hf_model(kind, tmp_path / "hf")
    path = tmp_path / f"{kind}.gguf"
    _write_gguf(kind, tmp_path / "hf", path, QUANT)
    args = ["trace", "Hello world", "--json", "--model", str(path), "--device", "cpu", "--steps", "3", "--layer", "1"]
    assert cli.main(args) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["num_heads"], data["num_kv_heads"]) == ((4, 2) if kind == "qwen3_moe" else (3, 1))
    assert [s["stage"] for s in data["steps"]] == ["prefill", "decode", "decode"]
